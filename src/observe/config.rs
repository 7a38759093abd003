//! `[log]` and `[telemetry]`: log lines and trace export.

use serde::Deserialize;

use crate::settings::{Invalid, non_empty};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `sluice=debug,info`, ...
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        match tracing_subscriber::EnvFilter::try_new(&self.level) {
            Ok(_) => Ok(()),
            Err(_) => Err(Invalid::new(
                "log.level",
                format!("`{}` is not a valid log filter", self.level),
            )),
        }
    }
}

/// OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

impl OtlpProtocol {
    /// The names of `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim() {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            "http/json" => Some(Self::HttpJson),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
            Self::HttpJson => "http/json",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP endpoint (`http://collector:4318`, or `:4317` for gRPC); unset
    /// disables trace export unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[serde(deserialize_with = "non_empty")]
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Fraction of new traces sampled, decided at the edge (a client's `traceparent` sampled flag is followed).
    pub sample_ratio: f64,
    /// `grpc`, `http/protobuf` or `http/json`.
    pub protocol: OtlpProtocol,
    /// Requests a second whose client `traceparent` may ask for tracing;
    /// beyond it they are not traced (0: no cap).
    pub max_client_sampled_per_second: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "sluice".into(),
            sample_ratio: 1.0,
            protocol: OtlpProtocol::HttpProtobuf,
            max_client_sampled_per_second: 100,
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if (0.0..=1.0).contains(&self.sample_ratio) {
            return Ok(());
        }
        Err(Invalid::new(
            "telemetry.sample_ratio",
            "must be between 0 and 1",
        ))
    }
}
