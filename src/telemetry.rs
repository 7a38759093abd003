//! Logs and traces. Logs go to stderr through `tracing` (text or JSON lines).
//! Traces are exported over OTLP/HTTP when an endpoint is configured
//! (`telemetry.otlp_endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); spans are recorded by
//! [`crate::spans`] and exported in batches by a thread of their own
//! ([`crate::otlp`]), so an unreachable collector never slows a request.
//!
//! Trace context follows a request everywhere: from the client's `traceparent`
//! header, into the queue message headers (Kafka included), to the worker and
//! on to vLLM.
//!
//! Sampling is decided once per request, where its trace starts (the edge),
//! before any span exists ([`RequestTrace::start`]). An unsampled request
//! records nothing for export: it keeps only its `tracing` span (for its log
//! lines), and its stage spans are [`StageSpan::none`]. The decision travels
//! on as the `traceparent` sampled flag, and workers follow it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, TelemetryConfig};
use crate::otlp::{BatchConfig, JsonExporter, ProtobufExporter, SpanExport};
use crate::spans::{
    Recording, SpanContext, SpanKind, SpanQueue, StageSpan, new_span_id, new_trace_id,
};

/// Keeps the log writer and the trace exporter alive; flushes both on drop.
pub struct Telemetry {
    export: Option<ExportThread>,
    _log_writer: Option<tracing_appender::non_blocking::WorkerGuard>,
}

struct ExportThread {
    queue: Arc<SpanQueue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Telemetry {
    /// Exports every finished span now (tests, shutdown).
    pub fn flush(&self) {
        if let Some(export) = &self.export {
            export.queue.flush(Duration::from_secs(30));
        }
    }

    pub fn is_exporting(&self) -> bool {
        self.export.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(export) = &mut self.export {
            export.queue.close();
            if let Some(thread) = export.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The configured span exporter, if traces are to be exported.
fn span_exporter(config: &TelemetryConfig) -> Option<Box<dyn SpanExport>> {
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
    // The SDK's resource: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and
    // the `telemetry.sdk.*` attributes.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let resource = resource.build();
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
    let exporter: Result<Box<dyn SpanExport>, String> = if json {
        JsonExporter::from_env(endpoint, &resource).map(|e| Box::new(e) as _)
    } else {
        ProtobufExporter::from_env(endpoint, &resource).map(|e| Box::new(e) as _)
    };
    match exporter {
        Ok(exporter) => Some(exporter),
        Err(err) => {
            eprintln!("sluice: cannot set up the OTLP trace exporter ({err}); traces are off");
            None
        }
    }
}

/// Starts the export thread for `exporter` and makes its queue the process's.
fn start_export(exporter: Box<dyn SpanExport>) -> Option<ExportThread> {
    let batch = BatchConfig::from_env();
    let queue = Arc::new(SpanQueue::new(batch.max_queue, batch.max_batch));
    if !SpanQueue::install(queue.clone()) {
        eprintln!("sluice: trace export is already set up in this process");
        return None;
    }
    match crate::otlp::spawn_export_thread(queue.clone(), exporter, batch.delay) {
        Ok(thread) => Some(ExportThread {
            queue,
            thread: Some(thread),
        }),
        Err(err) => {
            eprintln!("sluice: cannot start the trace export thread ({err}); traces are off");
            None
        }
    }
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

    fn trace_id_bytes(&self) -> [u8; 16] {
        let mut bytes = [0; 16];
        // Checked by `parse`: 32 lower-case hex digits.
        let _ = hex::decode_to_slice(self.trace_id, &mut bytes);
        bytes
    }

    fn parent_id_bytes(&self) -> [u8; 8] {
        let mut bytes = [0; 8];
        let _ = hex::decode_to_slice(self.parent_id, &mut bytes);
        bytes
    }

    fn find(pairs: &'a [(String, String)]) -> Option<Self> {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
            .and_then(|(_, v)| Self::parse(v))
    }
}

/// One request's trace: its root `tracing` span, whose log lines carry the
/// request id, and, when the request is sampled, the recording of the same
/// span for export, which its stage spans are children of. The recording
/// ends when the `RequestTrace` is dropped.
pub struct RequestTrace {
    pub span: tracing::Span,
    /// Set exactly when the request is sampled.
    root: Option<Box<Recording>>,
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
        let span = tracing::info_span!("request", request_id);
        let root = sampled.then(|| {
            Self::root(
                "POST /v1/completions",
                SpanKind::Server,
                request_id,
                parent.as_ref(),
                incoming,
            )
        });
        Self::new(span, root, parent.as_ref(), incoming)
    }

    /// Continues, on a worker, the trace of a request from the queue: sampled
    /// exactly when the edge sampled it.
    pub fn continue_job(request_id: &str, incoming: &[(String, String)]) -> Self {
        let parent = TraceParent::find(incoming);
        let sampled = HEAD_SAMPLER.get().is_some() && parent.as_ref().is_some_and(|p| p.sampled);
        let span = tracing::info_span!("worker.upstream", request_id);
        let root = sampled.then(|| {
            Self::root(
                "worker.upstream",
                SpanKind::Consumer,
                request_id,
                parent.as_ref(),
                incoming,
            )
        });
        Self::new(span, root, parent.as_ref(), incoming)
    }

    fn new(
        span: tracing::Span,
        root: Option<Box<Recording>>,
        parent: Option<&TraceParent<'_>>,
        incoming: &[(String, String)],
    ) -> Self {
        let unsampled_context = if root.is_none() {
            not_sampled(parent, incoming)
        } else {
            Vec::new()
        };
        Self {
            span,
            root,
            unsampled_context,
        }
    }

    /// A sampled request's span in this process: a child of `parent` when
    /// there is one, else the root of a new trace.
    fn root(
        name: &'static str,
        kind: SpanKind,
        request_id: &str,
        parent: Option<&TraceParent<'_>>,
        incoming: &[(String, String)],
    ) -> Box<Recording> {
        let trace_state = parent.and_then(|_| {
            let (_, state) = incoming
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("tracestate"))?;
            let state = state.parse::<opentelemetry::trace::TraceState>().ok()?;
            Some(state.header().into())
        });
        let context = SpanContext {
            trace_id: parent.map_or_else(new_trace_id, TraceParent::trace_id_bytes),
            span_id: new_span_id(),
            trace_state,
        };
        let parent_span_id = parent.map(TraceParent::parent_id_bytes);
        let mut recording = Recording::start(name, kind, context, parent_span_id, parent.is_some());
        // Room for the attributes the request ends with (see `RequestRecord`).
        recording.attributes.reserve_exact(10);
        recording.set("request_id", request_id.to_string());
        Box::new(recording)
    }

    /// Whether this request's spans are exported.
    pub fn sampled(&self) -> bool {
        self.root.is_some()
    }

    /// The root span's context, when the request is sampled.
    pub fn context(&self) -> Option<&SpanContext> {
        self.root.as_ref().map(|root| &root.context)
    }

    /// A stage span, a child of the root; records nothing when unsampled.
    pub fn stage(&self, name: &'static str) -> StageSpan {
        StageSpan::child_of(self.context(), name)
    }

    /// The headers that continue this trace from its root span in another process.
    pub fn headers(&self) -> Vec<(String, String)> {
        match self.context() {
            Some(context) => context.headers(),
            None => self.unsampled_context.clone(),
        }
    }

    /// The headers that continue this trace from `stage` in another process.
    pub fn headers_from(&self, stage: &StageSpan) -> Vec<(String, String)> {
        match stage.context() {
            Some(context) => context.headers(),
            None => self.headers(),
        }
    }

    /// Sets attributes (or the status) of the root span, when sampled.
    pub fn record(&mut self, f: impl FnOnce(&mut Recording)) {
        if let Some(root) = &mut self.root {
            f(root);
        }
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        if let Some(root) = self.root.take() {
            root.end();
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
    let _ = tracing_subscriber::registry()
        .with(log_filter(&spec))
        .with(fmt)
        .try_init();
    let export = span_exporter(telemetry).and_then(start_export);
    if export.is_some() {
        let _ = HEAD_SAMPLER.set(HeadSampler::from_env(telemetry.sample_ratio));
    }
    Telemetry {
        export,
        _log_writer: Some(guard),
    }
}

/// What is logged: `spec` (`log.level` or `RUST_LOG`), as a filter for the
/// whole subscriber (the log layer is its only layer, and a per-layer filter
/// would look the span up in the registry on every entry, exit and close).
/// Plain `target=level` lists become a `Targets` filter, decided once per
/// callsite; directives on spans or fields need an `EnvFilter`, which takes a
/// lock on every span's creation, entry, exit and close.
pub(crate) fn log_filter<S>(spec: &str) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    if !spec.contains('[')
        && let Ok(targets) = spec.parse::<Targets>()
    {
        return Box::new(targets);
    }
    Box::new(EnvFilter::new(spec))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::AttrValue;

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
        assert!(!trace.sampled());
        assert!(trace.stage("auth").context().is_none());
        assert_eq!(
            trace.headers(),
            vec![
                ("traceparent".to_string(), UNSAMPLED.to_string()),
                ("tracestate".to_string(), "vendor=x".to_string()),
            ]
        );
        assert!(
            RequestTrace::start("req", &[])
                .headers_from(&StageSpan::none())
                .is_empty()
        );
        let worker = RequestTrace::continue_job("req", &trace.headers());
        assert!(!worker.sampled());
    }

    #[test]
    fn a_sampled_request_is_one_trace() {
        let queue = Arc::new(SpanQueue::new(1000, 1000));
        SpanQueue::install(queue.clone());
        let incoming = vec![
            ("traceparent".to_string(), SAMPLED.to_string()),
            ("tracestate".to_string(), "vendor=x".to_string()),
        ];
        let parent = TraceParent::parse(SAMPLED);
        let root = RequestTrace::root(
            "POST /v1/completions",
            SpanKind::Server,
            "req-1",
            parent.as_ref(),
            &incoming,
        );
        let mut trace = RequestTrace::new(
            tracing::Span::none(),
            Some(root),
            parent.as_ref(),
            &incoming,
        );
        assert!(trace.sampled());
        let root_context = trace.context().cloned().unwrap();
        let mut stage = trace.stage("queue.submit").with_kind(SpanKind::Producer);
        stage.set("wait_ms", 1.5);
        let stage_context = stage.context().cloned().unwrap();
        assert_eq!(trace.headers_from(&stage), stage_context.headers());
        assert_eq!(trace.headers(), root_context.headers());
        drop(stage);
        trace.record(|root| {
            root.set("status", 500_i64);
            root.fail("upstream failed");
        });
        drop(trace);

        let spans: Vec<Recording> = queue
            .wait(Duration::ZERO, Vec::new())
            .spans
            .into_iter()
            .filter(|s| s.context.trace_id == root_context.trace_id)
            .collect();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let (stage, root) = (&spans[0], &spans[1]);
        assert_eq!(
            hex::encode(root.context.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(root.context, root_context);
        assert_eq!(root.context.trace_state.as_deref(), Some("vendor=x"));
        assert_eq!(
            root.parent_span_id.map(hex::encode).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(root.parent_is_remote);
        assert_eq!(root.name, "POST /v1/completions");
        assert_eq!(root.kind, SpanKind::Server);
        assert_eq!(
            root.attributes.as_slice(),
            [
                ("request_id", AttrValue::from("req-1".to_string())),
                ("status", AttrValue::I64(500))
            ]
        );
        assert_eq!(root.error.as_deref(), Some("upstream failed"));
        assert_eq!(stage.context, stage_context);
        assert_eq!(stage.parent_span_id, Some(root_context.span_id));
        assert!(!stage.parent_is_remote);
        assert_eq!(stage.kind, SpanKind::Producer);
        assert!(stage.end_unix_nanos >= stage.start_unix_nanos);
        assert!(root.end_unix_nanos >= stage.end_unix_nanos);
    }
}
