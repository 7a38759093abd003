//! Operations: what sluice tells its operators. Prometheus metrics (one
//! registry, each subsystem registering its own families), OpenTelemetry
//! traces and the request and stage spans, the JSON log format, and logging a
//! dependency's outage once.

mod config;
pub mod log_format;
pub mod metrics;
pub mod outage;
pub mod telemetry;

pub use config::{LogConfig, LogFormat, OtlpProtocol, TelemetryConfig};
