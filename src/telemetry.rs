//! Logs and traces. Logs go to stderr through `tracing` (text or JSON lines).
//! Traces are exported over OTLP/HTTP when an endpoint is configured
//! (`telemetry.otlp_endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); the batch exporter runs on its own
//! thread, so an unreachable collector never slows a request.
//!
//! Trace context follows a request everywhere: from the client's `traceparent`
//! header, into the queue message headers (Kafka included), to the worker and
//! on to vLLM.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, TelemetryConfig};

/// Keeps the log writer and the trace exporter alive; flushes both on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _log_writer: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl Telemetry {
    /// Exports every finished span now (tests, shutdown).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }

    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

fn tracer_provider(config: &TelemetryConfig) -> Option<SdkTracerProvider> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let from_env =
        env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    if config.otlp_endpoint.is_none() && !from_env {
        return None;
    }
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(if config.json {
            Protocol::HttpJson
        } else {
            Protocol::HttpBinary
        });
    // The standard variables win over the config file.
    if let (Some(endpoint), false) = (&config.otlp_endpoint, from_env) {
        let endpoint = endpoint.trim_end_matches('/');
        let endpoint = if endpoint.ends_with("/v1/traces") {
            endpoint.to_string()
        } else {
            format!("{endpoint}/v1/traces")
        };
        builder = builder.with_endpoint(endpoint);
    }
    let exporter = match builder.build() {
        Ok(exporter) => exporter,
        Err(err) => {
            eprintln!("sluice: cannot set up the OTLP trace exporter ({err}); traces are off");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if !env_set("OTEL_TRACES_SAMPLER") {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(config.sample_ratio),
        )));
    }
    Some(provider.build())
}

/// Installs logging (and trace export, when configured) for the process.
/// `RUST_LOG`, when set, overrides `log.level` for logs; traces always get
/// sluice's spans at info level.
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> Telemetry {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(&log.level));
    // Lines are written by a thread of their own, so a slow stderr never
    // stalls a request; under a flood, lines are dropped rather than queued without bound.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stderr());
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    };
    let provider = tracer_provider(telemetry);
    let otel = provider.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // No busy/idle timing, thread or source-location attributes: each costs
        // clock reads or allocations on every span enter and exit.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sluice"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_filter(EnvFilter::new("sluice=info,warn"))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Telemetry {
        provider,
        _log_writer: Some(guard),
    }
}

struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct PairsExtractor<'a>(&'a [(String, String)]);

impl Extractor for PairsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

struct MapInjector(HashMap<String, String>);

impl Injector for MapInjector {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// Makes `span` a child of the client's `traceparent`, if it sent one.
pub fn continue_from_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of the context carried in queue message headers.
pub fn continue_from_pairs(span: &tracing::Span, pairs: &[(String, String)]) {
    if !pairs.is_empty() {
        let cx = TraceContextPropagator::new().extract(&PairsExtractor(pairs));
        let _ = span.set_parent(cx);
    }
}

/// The W3C headers (`traceparent`, `tracestate`) that continue `span`'s trace elsewhere.
pub fn context_of(span: &tracing::Span) -> Vec<(String, String)> {
    let mut injector = MapInjector(HashMap::new());
    TraceContextPropagator::new().inject_context(&span.context(), &mut injector);
    let mut pairs: Vec<(String, String)> = injector.0.into_iter().collect();
    pairs.sort();
    pairs
}
