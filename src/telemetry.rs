//! Logs and traces. Logs go to stderr through `tracing` (text or JSON lines).
//! Traces are exported over OTLP/HTTP when an endpoint is configured
//! (`telemetry.otlp_endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); the batch exporter runs on its own
//! thread, so an unreachable collector never slows a request. `http/protobuf`
//! goes through [`crate::otlp`], `http/json` through `opentelemetry-otlp`.
//!
//! Trace context follows a request everywhere: from the client's `traceparent`
//! header, into the queue message headers (Kafka included), to the worker and
//! on to vLLM.
//!
//! Sampling is decided once per request, where its trace starts (the edge),
//! before any span exists ([`RequestTrace::start`]). An unsampled request
//! creates no OpenTelemetry spans at all: its root span is one only the log
//! layer sees (target `sluice::unsampled`) and its stage spans are disabled,
//! because the OpenTelemetry layer costs microseconds per span whether or not
//! the SDK keeps it. The decision travels on as the `traceparent` sampled flag,
//! and workers follow it.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing::level_filters::LevelFilter;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{Directive, Targets, filter_fn};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
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
    let with_traces_path = |endpoint: &str| {
        let endpoint = endpoint.trim_end_matches('/');
        if endpoint.ends_with("/v1/traces") {
            endpoint.to_string()
        } else {
            format!("{endpoint}/v1/traces")
        }
    };
    // The standard variables win over the config file; with neither, no export.
    let endpoint = match std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Ok(traces) if !traces.trim().is_empty() => traces,
        _ => match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Ok(base) if !base.trim().is_empty() => with_traces_path(&base),
            _ => with_traces_path(config.otlp_endpoint.as_deref()?),
        },
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(config.service_name.clone());
    }
    // Only sampled requests reach the SDK (see `HeadSampler`): it keeps every span it sees.
    let builder = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_sampler(Sampler::AlwaysOn);
    let protocol = crate::otlp::otlp_env("PROTOCOL");
    let json = match protocol.as_deref().map(str::trim) {
        None => config.json,
        Some("http/json") => true,
        Some("http/protobuf") => false,
        Some(other) => {
            eprintln!(
                "sluice: OTLP protocol {other:?} is not supported (http/protobuf or http/json); using {}",
                if config.json {
                    "http/json"
                } else {
                    "http/protobuf"
                }
            );
            config.json
        }
    };
    let provider = if json {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(endpoint)
            .build()
            .map(|exporter| builder.with_batch_exporter(exporter).build())
            .map_err(|err| err.to_string())
    } else {
        crate::otlp::ProtobufSpanExporter::from_env(endpoint)
            .map(|exporter| builder.with_batch_exporter(exporter).build())
    };
    let provider = match provider {
        Ok(provider) => provider,
        Err(err) => {
            eprintln!("sluice: cannot set up the OTLP trace exporter ({err}); traces are off");
            return None;
        }
    };
    let _ = HEAD_SAMPLER.set(HeadSampler::from_env(config.sample_ratio));
    Some(provider)
}

/// Which requests are traced: set once, when trace export is set up; without
/// it, no request is.
static HEAD_SAMPLER: OnceLock<HeadSampler> = OnceLock::new();

/// The sampling decision for a trace that starts here, from `telemetry.sample_ratio`
/// or the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HeadSampler {
    ratio: f64,
    /// Follow the sampled flag of an incoming `traceparent` (the `parentbased_*` samplers).
    parent_based: bool,
}

impl HeadSampler {
    fn from_env(default_ratio: f64) -> Self {
        let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").unwrap_or_default();
        Self::from_spec(sampler.trim(), arg.trim(), default_ratio)
    }

    fn from_spec(sampler: &str, arg: &str, default_ratio: f64) -> Self {
        let ratio_arg = || {
            arg.parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .unwrap_or(1.0)
        };
        let (ratio, parent_based) = match sampler {
            "always_on" => (1.0, false),
            "always_off" => (0.0, false),
            "traceidratio" => (ratio_arg(), false),
            "parentbased_always_on" => (1.0, true),
            "parentbased_always_off" => (0.0, true),
            "parentbased_traceidratio" => (ratio_arg(), true),
            _ => (default_ratio, true),
        };
        Self {
            ratio,
            parent_based,
        }
    }

    fn sample(&self, parent: Option<&TraceParent<'_>>) -> bool {
        match parent {
            Some(parent) if self.parent_based => parent.sampled,
            // As the SDK's TraceIdRatioBased: the trace id's low 64 bits against the ratio.
            Some(parent) => {
                let low = u64::from_str_radix(&parent.trace_id[16..], 16).unwrap_or(0);
                (low >> 1) < (self.ratio * (1u64 << 63) as f64) as u64
            }
            None => self.ratio >= 1.0 || rand::random::<f64>() < self.ratio,
        }
    }
}

/// A W3C `traceparent` header (version 00).
#[derive(Debug, PartialEq)]
struct TraceParent<'a> {
    trace_id: &'a str,
    parent_id: &'a str,
    sampled: bool,
}

impl<'a> TraceParent<'a> {
    fn parse(value: &'a str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        let valid = version == "00"
            && parts.next().is_none()
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && nonzero(trace_id)
            && nonzero(parent_id);
        valid.then(|| Self {
            trace_id,
            parent_id,
            sampled: u8::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1),
        })
    }

    fn find(pairs: &'a [(String, String)]) -> Option<Self> {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
            .and_then(|(_, v)| Self::parse(v))
    }
}

/// One request's trace: its root span, and whether the trace is recorded.
pub struct RequestTrace {
    pub span: tracing::Span,
    /// Whether this request's spans are exported; stage spans exist only then.
    pub sampled: bool,
    /// Unsampled requests: the headers that carry the trace id on with the sampled flag off.
    unsampled_context: Vec<(String, String)>,
}

impl RequestTrace {
    /// Starts the trace of a request arriving at the edge, continuing `incoming`
    /// (the client's `traceparent`/`tracestate`, if any) and deciding whether it is sampled.
    pub fn start(request_id: &str, incoming: &[(String, String)]) -> Self {
        let parent = TraceParent::find(incoming);
        let sampled = HEAD_SAMPLER
            .get()
            .is_some_and(|sampler| sampler.sample(parent.as_ref()));
        let span = if sampled {
            tracing::info_span!(
                "request",
                otel.name = "POST /v1/completions",
                otel.kind = "server",
                request_id,
            )
        } else {
            tracing::info_span!(target: UNSAMPLED_TARGET, "request", request_id)
        };
        Self::new(span, sampled, parent.as_ref(), incoming)
    }

    /// Continues, on a worker, the trace of a request from the queue: sampled
    /// exactly when the edge sampled it.
    pub fn continue_job(request_id: &str, incoming: &[(String, String)]) -> Self {
        let parent = TraceParent::find(incoming);
        let sampled = HEAD_SAMPLER.get().is_some() && parent.as_ref().is_some_and(|p| p.sampled);
        let span = if sampled {
            tracing::info_span!("worker.upstream", otel.kind = "consumer", request_id,)
        } else {
            tracing::info_span!(target: UNSAMPLED_TARGET, "worker.upstream", request_id)
        };
        Self::new(span, sampled, parent.as_ref(), incoming)
    }

    /// A sampled span continues `incoming`; an unsampled one passes it on unsampled.
    fn new(
        span: tracing::Span,
        sampled: bool,
        parent: Option<&TraceParent<'_>>,
        incoming: &[(String, String)],
    ) -> Self {
        let unsampled_context = if sampled {
            continue_from_pairs(&span, incoming);
            Vec::new()
        } else {
            not_sampled(parent, incoming)
        };
        Self {
            span,
            sampled,
            unsampled_context,
        }
    }

    /// The headers that continue this trace from `span` (a stage span of this
    /// request, or its root) in another process.
    pub fn context_for(&self, span: &tracing::Span) -> Vec<(String, String)> {
        if self.sampled {
            context_of(span)
        } else {
            self.unsampled_context.clone()
        }
    }
}

/// The `traceparent` (and `tracestate`) that pass a trace on unsampled.
fn not_sampled(
    parent: Option<&TraceParent<'_>>,
    incoming: &[(String, String)],
) -> Vec<(String, String)> {
    let Some(parent) = parent else {
        return Vec::new();
    };
    let mut pairs = vec![(
        "traceparent".to_string(),
        format!("00-{}-{}-00", parent.trace_id, parent.parent_id),
    )];
    pairs.extend(
        incoming
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("tracestate"))
            .cloned(),
    );
    pairs
}

/// The target of an unsampled request's root span: seen by the log layer only.
const UNSAMPLED_TARGET: &str = "sluice::unsampled";

/// The target of stage spans. Only traces see them: a log line inside a stage
/// reports the request's root span (and its `request_id`), and the log layer
/// does not format the fields of spans it never prints.
pub const STAGE_TARGET: &str = "sluice::stage";

/// A stage span of a request: a real span when the request is sampled, a
/// disabled one (which costs nothing) otherwise.
#[macro_export]
macro_rules! stage_span {
    ($sampled:expr, $($span:tt)+) => {
        if $sampled {
            ::tracing::info_span!(target: $crate::telemetry::STAGE_TARGET, $($span)+)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// Installs logging (and trace export, when configured) for the process.
/// `RUST_LOG`, when set, overrides `log.level` for logs; traces always get
/// sluice's spans at info level.
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> Telemetry {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| log.level.clone());
    // Lines are written by a thread of their own, so a slow stderr never
    // stalls a request; under a flood, lines are dropped rather than queued without bound.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stderr());
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(crate::log_format::JsonLines)
            .fmt_fields(crate::log_format::JsonSpanFields)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    };
    let provider = tracer_provider(telemetry);
    let otel = provider.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // No busy/idle timing, thread, target or source-location attributes,
        // and no context activation on span entry (trace context is passed on
        // from spans explicitly): each costs clock reads, allocations or
        // export bytes on every span. Log events join a trace only from
        // `warn` up; the request's info line repeats its root span's attributes.
        // A filter decided per callsite, once: `EnvFilter` would take a lock
        // on every span's creation, entry, exit and close.
        let traced = filter_fn(|meta| {
            let target = meta.target();
            let least = if meta.is_span() && target.starts_with("sluice") {
                Level::INFO
            } else {
                Level::WARN
            };
            target != UNSAMPLED_TARGET && *meta.level() <= least
        });
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sluice"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_context_activation(false)
            .with_filter(traced)
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(log_filter(&spec)))
        .with(otel)
        .try_init();
    Telemetry {
        provider,
        _log_writer: Some(guard),
    }
}

/// What the log layer shows: `spec` (`log.level` or `RUST_LOG`), never stage
/// spans. Plain `target=level` lists become a `Targets` filter, decided once
/// per callsite; directives on spans or fields need an `EnvFilter`, which
/// takes a lock on every span's creation, entry, exit and close.
pub(crate) fn log_filter<S>(spec: &str) -> Box<dyn Filter<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    if !spec.contains('[')
        && let Ok(targets) = spec.parse::<Targets>()
    {
        return Box::new(targets.with_target(STAGE_TARGET, LevelFilter::OFF));
    }
    let stage_off = Directive::from_str(&format!("{STAGE_TARGET}=off"));
    let filter = EnvFilter::new(spec);
    Box::new(match stage_off {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    })
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

/// The client's W3C trace headers (`traceparent`, `tracestate`), if it sent any.
pub fn trace_headers(headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
    if !headers.contains_key("traceparent") {
        return Vec::new();
    }
    ["traceparent", "tracestate"]
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

/// Makes `span` a child of the context carried in `pairs` (trace headers).
fn continue_from_pairs(span: &tracing::Span, pairs: &[(String, String)]) {
    if !pairs.is_empty() {
        let cx = TraceContextPropagator::new().extract(&PairsExtractor(pairs));
        let _ = span.set_parent(cx);
    }
}

/// The W3C headers (`traceparent`, `tracestate`) that continue `span`'s trace elsewhere.
fn context_of(span: &tracing::Span) -> Vec<(String, String)> {
    let mut injector = MapInjector(HashMap::new());
    TraceContextPropagator::new().inject_context(&span.context(), &mut injector);
    let mut pairs: Vec<(String, String)> = injector.0.into_iter().collect();
    pairs.sort();
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    #[test]
    fn parses_traceparent() {
        let parsed = TraceParent::parse(SAMPLED).expect("valid");
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.parent_id, "00f067aa0ba902b7");
        assert!(parsed.sampled);
        assert!(!TraceParent::parse(UNSAMPLED).expect("valid").sampled);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f35-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn samplers_follow_the_standard_variables() {
        let parent_sampled = TraceParent::parse(SAMPLED);
        let parent_unsampled = TraceParent::parse(UNSAMPLED);
        let default = HeadSampler::from_spec("", "", 1.0);
        assert!(default.parent_based && default.ratio == 1.0);
        assert!(default.sample(None));
        assert!(default.sample(parent_sampled.as_ref()));
        assert!(!default.sample(parent_unsampled.as_ref()));

        let off = HeadSampler::from_spec("parentbased_always_off", "", 1.0);
        assert!(!off.sample(None));
        assert!(off.sample(parent_sampled.as_ref()), "a sampled parent wins");

        let always = HeadSampler::from_spec("always_on", "", 0.0);
        assert!(always.sample(parent_unsampled.as_ref()), "parent ignored");

        let never = HeadSampler::from_spec("traceidratio", "0", 1.0);
        assert!(!never.sample(None) && !never.sample(parent_sampled.as_ref()));
        assert_eq!(
            HeadSampler::from_spec("traceidratio", "bad", 0.0).ratio,
            1.0
        );
    }

    #[test]
    fn ratio_sampling_keeps_about_that_share() {
        let sampler = HeadSampler::from_spec("parentbased_traceidratio", "0.1", 1.0);
        let sampled = (0..20_000).filter(|_| sampler.sample(None)).count();
        assert!((1_600..2_400).contains(&sampled), "{sampled} of 20000");
    }

    #[test]
    fn unsampled_requests_pass_the_trace_on_unsampled() {
        let incoming = vec![
            ("traceparent".to_string(), SAMPLED.to_string()),
            ("tracestate".to_string(), "vendor=x".to_string()),
        ];
        // No exporter is installed in unit tests, so nothing is sampled.
        let trace = RequestTrace::start("req", &incoming);
        assert!(!trace.sampled);
        assert_eq!(
            trace.context_for(&trace.span),
            vec![
                ("traceparent".to_string(), UNSAMPLED.to_string()),
                ("tracestate".to_string(), "vendor=x".to_string()),
            ]
        );
        assert!(
            RequestTrace::start("req", &[])
                .context_for(&tracing::Span::none())
                .is_empty()
        );
        let worker = RequestTrace::continue_job("req", &trace.context_for(&trace.span));
        assert!(!worker.sampled);
    }
}
