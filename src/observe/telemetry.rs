//! Logs and traces. Logs go to stderr through `tracing` (text, or
//! `tracing-subscriber`'s JSON lines), written by a thread of their own.
//! Traces go through the OpenTelemetry SDK: a tracer whose batch span
//! processor exports over OTLP (`http/protobuf`, `http/json` or `grpc`) from
//! its own thread, so an unreachable collector never slows a request.
//!
//! Trace context follows a request everywhere: from the client's
//! `traceparent` header (W3C, through the SDK's propagator), into the queue
//! message headers (Kafka included), to the worker and on to vLLM.
//!
//! Sampling is decided once per trace, where it starts, by the SDK's sampler:
//! `telemetry.sample_ratio` (parent-based), or the standard
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. An unsampled request
//! records nothing for export; its stage spans are [`StageSpan::none`], and
//! the decision travels on as the `traceparent` sampled flag.
//!
//! Spans go through the OpenTelemetry API directly rather than through the
//! `tracing` bridge: the bridge keeps OpenTelemetry data beside every
//! `tracing` span and looks spans up in the registry for every attribute,
//! which cost several times what the spans themselves do.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, SpanRef, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use super::{LogConfig, LogFormat, OtlpProtocol, TelemetryConfig};
use crate::observe::outage::{Outage, Transition};

/// The tracer of this process, set once when trace export is set up;
/// without it, no request is traced.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// How many requests a second a client's `traceparent` may have sampled
/// (`telemetry.max_client_sampled_per_second`); beyond it they are not traced.
static CLIENT_SAMPLED: OnceLock<governor::DefaultDirectRateLimiter> = OnceLock::new();

/// Keeps the log writer and the trace exporter alive; flushes both on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _log_writer: tracing_appender::non_blocking::WorkerGuard,
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

/// Installs logging, and trace export when an endpoint is configured, for the
/// process. `RUST_LOG`, when set, overrides `log.level`. The gRPC exporter
/// needs a Tokio runtime: call this inside one.
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
    let _ = tracing_subscriber::registry()
        .with(log_filter(&spec))
        .with(log_lines(log.format, writer))
        .try_init();
    if let Some(rate) = std::num::NonZeroU32::new(telemetry.max_client_sampled_per_second) {
        let _ = CLIENT_SAMPLED.set(governor::RateLimiter::direct(governor::Quota::per_second(
            rate,
        )));
    }
    let provider = tracer_provider(telemetry).and_then(|provider| {
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "sluice");
        if TRACER.set(tracer).is_err() {
            tracing::warn!("trace export is already set up in this process");
            return None;
        }
        Some(provider)
    });
    Telemetry {
        provider,
        _log_writer: guard,
    }
}

/// The tracer provider for the configured exporter, if traces are to be exported.
fn tracer_provider(config: &TelemetryConfig) -> Option<SdkTracerProvider> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let env_endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if env_endpoint.is_none() && config.otlp_endpoint.is_none() {
        return None;
    }
    let protocol = match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
    {
        None => config.protocol,
        Some(name) => OtlpProtocol::parse(&name).unwrap_or_else(|| {
            tracing::warn!(
                protocol = name,
                using = config.protocol.name(),
                "unknown OTLP protocol (grpc, http/protobuf or http/json)"
            );
            config.protocol
        }),
    };
    // The standard variables win over the config file: the exporter reads
    // them itself when no endpoint is given here.
    let endpoint = match (&env_endpoint, &config.otlp_endpoint) {
        (None, Some(base)) if protocol == OtlpProtocol::Grpc => Some(base.clone()),
        (None, Some(base)) => Some(with_traces_path(base)),
        _ => None,
    };
    let exporter = match protocol {
        OtlpProtocol::Grpc => {
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            match endpoint {
                Some(endpoint) => builder.with_endpoint(endpoint).build(),
                None => builder.build(),
            }
        }
        OtlpProtocol::HttpProtobuf | OtlpProtocol::HttpJson => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(if protocol == OtlpProtocol::HttpJson {
                    Protocol::HttpJson
                } else {
                    Protocol::HttpBinary
                });
            match endpoint {
                Some(endpoint) => builder.with_endpoint(endpoint).build(),
                None => builder.build(),
            }
        }
    };
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(err) => {
            tracing::error!(%err, "cannot set up the OTLP trace exporter; traces are off");
            return None;
        }
    };
    // The SDK's resource: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and
    // the `telemetry.sdk.*` attributes; the config's name when the variable is unset.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_span_processor(BatchSpanProcessor::builder(LoggedExporter::new(exporter)).build());
    // With `OTEL_TRACES_SAMPLER` set, the SDK's own choice stands.
    if env("OTEL_TRACES_SAMPLER").is_none() {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))));
    }
    Some(builder.build())
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn with_traces_path(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The OTLP exporter, logging each export outage once when it starts and
/// once when it ends instead of once per failed batch.
#[derive(Debug)]
struct LoggedExporter<E> {
    inner: E,
    outage: Outage,
}

impl<E> LoggedExporter<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            outage: Outage::default(),
        }
    }

    fn observe(&self, result: &OTelSdkResult) {
        match (self.outage.observe(result.is_ok()), result) {
            (Some(Transition::Started), Err(err)) => tracing::warn!(
                %err,
                "trace export failed; spans are dropped until the collector answers again"
            ),
            (Some(Transition::Ended), _) => tracing::info!("trace export works again"),
            _ => {}
        }
    }
}

impl<E: SpanExporter> SpanExporter for LoggedExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.observe(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The log layer: one line per event, as text or as JSON lines in
/// `tracing-subscriber`'s JSON shape ([`crate::observe::log_format`]).
fn log_lines<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => crate::observe::log_format::layer(writer).boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    }
}

/// What is logged: `spec` (`log.level` or `RUST_LOG`), as a filter for the
/// whole subscriber. Plain `target=level` lists become a `Targets` filter,
/// decided once per callsite; directives on spans or fields need an
/// `EnvFilter`, which takes a lock on every span's creation, entry, exit and close.
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

/// Trace headers as name/value pairs: what the SDK's propagator reads from
/// and writes to.
struct Headers<'a>(&'a [(String, String)]);

impl Extractor for Headers<'_> {
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

struct HeaderSink(Vec<(String, String)>);

impl Injector for HeaderSink {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

fn extract(headers: &[(String, String)]) -> Context {
    if headers.is_empty() {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// A client's context, its sampled flag cleared once clients have had their
/// share of sampled requests this second: a client cannot make the gateway
/// trace everything. Without a tracer the flag passes through untouched.
fn within_client_cap(parent: Context, cap: Option<&governor::DefaultDirectRateLimiter>) -> Context {
    let remote = parent.span().span_context().clone();
    let over = remote.is_sampled()
        && remote.is_remote()
        && TRACER.get().is_some()
        && cap.is_some_and(|cap| cap.check().is_err());
    if !over {
        return parent;
    }
    let unsampled = opentelemetry::trace::SpanContext::new(
        remote.trace_id(),
        remote.span_id(),
        opentelemetry::trace::TraceFlags::default(),
        true,
        remote.trace_state().clone(),
    );
    Context::new().with_remote_span_context(unsampled)
}

fn inject(cx: &Context) -> Vec<(String, String)> {
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut sink = HeaderSink(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(cx, &mut sink);
    sink.0
}

/// Whether spans under `cx` are recorded: a tracer is installed and the
/// parent span was sampled.
fn records_children(cx: &Context) -> bool {
    TRACER.get().is_some() && cx.span().span_context().is_sampled() && cx.has_active_span()
}

/// One request's trace: its root `tracing` span, whose log lines carry the
/// request id, and the OpenTelemetry context of the same request, whose span
/// (when sampled) is the parent of its stage spans. The span ends when the
/// `RequestTrace` is dropped.
pub struct RequestTrace {
    pub span: tracing::Span,
    cx: Context,
}

impl RequestTrace {
    /// Starts the trace of a request arriving at the edge, continuing `incoming`
    /// (the client's `traceparent`/`tracestate`, if any); `name` is the
    /// server span's (`POST /v1/chat/completions`).
    pub fn start(name: &'static str, request_id: &str, incoming: &[(String, String)]) -> Self {
        let span = tracing::info_span!("request", request_id);
        let parent = within_client_cap(extract(incoming), CLIENT_SAMPLED.get());
        let cx = Self::root_under(name, SpanKind::Server, request_id, parent);
        Self { span, cx }
    }

    /// Continues, on a worker, the trace of a request from the queue.
    pub fn continue_job(request_id: &str, incoming: &[(String, String)]) -> Self {
        let span = tracing::info_span!("worker.upstream", request_id);
        let cx = Self::root("worker.upstream", SpanKind::Consumer, request_id, incoming);
        Self { span, cx }
    }

    /// This process's span of the request, a child of the incoming context.
    /// Without a tracer, the incoming context passes through unchanged.
    fn root(
        name: &'static str,
        kind: SpanKind,
        request_id: &str,
        incoming: &[(String, String)],
    ) -> Context {
        Self::root_under(name, kind, request_id, extract(incoming))
    }

    fn root_under(
        name: &'static str,
        kind: SpanKind,
        request_id: &str,
        parent: Context,
    ) -> Context {
        let Some(tracer) = TRACER.get() else {
            return parent;
        };
        let mut span = tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(tracer, &parent);
        if opentelemetry::trace::Span::is_recording(&span) {
            opentelemetry::trace::Span::set_attribute(
                &mut span,
                KeyValue::new("request_id", request_id.to_string()),
            );
        }
        parent.with_span(span)
    }

    /// Whether this request's spans are exported.
    pub fn sampled(&self) -> bool {
        self.cx.span().is_recording()
    }

    /// The context that hooks' spans are children of.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// A stage span, a child of the request's span; records nothing when unsampled.
    pub fn stage(&self, name: &'static str) -> StageSpan {
        StageSpan::child_of(&self.cx, name, SpanKind::Internal)
    }

    /// A stage span of another kind (a producer, a client).
    pub fn stage_of_kind(&self, name: &'static str, kind: SpanKind) -> StageSpan {
        StageSpan::child_of(&self.cx, name, kind)
    }

    /// The headers that continue this trace from the request's span in another process.
    pub fn headers(&self) -> Vec<(String, String)> {
        inject(&self.cx)
    }

    /// The headers that continue this trace from `stage` in another process.
    pub fn headers_from(&self, stage: &StageSpan) -> Vec<(String, String)> {
        match &stage.0 {
            Some(span) => inject(&self.cx.with_remote_span_context(
                opentelemetry::trace::Span::span_context(span.as_ref()).clone(),
            )),
            None => self.headers(),
        }
    }

    /// Sets attributes (or the status) of the request's span, when sampled.
    pub fn record(&self, f: impl FnOnce(&SpanRef<'_>)) {
        let span = self.cx.span();
        if span.is_recording() {
            f(&span);
        }
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        // Hooks may still hold clones of the context; the span ends now.
        self.cx.span().end();
    }
}

/// Marks a span as failed, with `description`.
pub fn fail(span: &SpanRef<'_>, description: impl Into<std::borrow::Cow<'static, str>>) {
    span.set_status(Status::error(description));
}

/// One stage of a request (auth, cache lookup, a plugin hook, queue
/// submission, stream delivery): a child of the request's span, ended when
/// dropped. Holds nothing when the request is not sampled. Boxed: an SDK
/// span is several hundred bytes, and every future that holds a stage would
/// carry (and move) them even when nothing is recorded.
pub struct StageSpan(Option<Box<opentelemetry_sdk::trace::Span>>);

impl StageSpan {
    /// A span that records nothing.
    pub fn none() -> Self {
        Self(None)
    }

    /// A child of the span in `parent`, when that span is sampled.
    pub fn child_of(parent: &Context, name: &'static str, kind: SpanKind) -> Self {
        if !records_children(parent) {
            return Self::none();
        }
        Self(TRACER.get().map(|tracer| {
            Box::new(
                tracer
                    .span_builder(name)
                    .with_kind(kind)
                    .start_with_context(tracer, parent),
            )
        }))
    }

    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(span) = &mut self.0 {
            opentelemetry::trace::Span::set_attribute(span.as_mut(), KeyValue::new(key, value));
        }
    }

    /// Sets an attribute whose value is only computed when the span records.
    pub fn set_with<V: Into<Value>>(&mut self, key: &'static str, value: impl FnOnce() -> V) {
        if self.0.is_some() {
            self.set(key, value());
        }
    }

    /// Runs `future` as this stage; the span ends when it completes.
    pub async fn during<F: Future>(self, future: F) -> F::Output {
        let output = future.await;
        drop(self);
        output
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

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn pairs(traceparent: &str) -> Vec<(String, String)> {
        vec![
            ("traceparent".to_string(), traceparent.to_string()),
            ("tracestate".to_string(), "vendor=x".to_string()),
        ]
    }

    #[test]
    fn without_a_tracer_the_clients_context_passes_through() {
        // No tracer is installed in unit tests.
        let trace = RequestTrace::start("POST /v1/completions", "req", &pairs(SAMPLED));
        assert!(!trace.sampled());
        assert!(!trace.stage("auth").is_recording());
        assert_eq!(trace.headers(), pairs(SAMPLED));
        assert!(
            RequestTrace::start("POST /v1/completions", "req", &[])
                .headers()
                .is_empty()
        );
        let worker = RequestTrace::continue_job("req", &trace.headers());
        assert_eq!(worker.headers(), pairs(SAMPLED));
    }

    #[test]
    fn malformed_traceparents_start_no_context() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "not a traceparent",
        ] {
            assert!(
                RequestTrace::start("POST /v1/completions", "req", &pairs(bad))
                    .headers()
                    .is_empty(),
                "{bad}"
            );
        }
    }

    #[test]
    fn trace_export_endpoints_get_the_traces_path_once() {
        assert_eq!(
            with_traces_path("http://c:4318/"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            with_traces_path("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    /// What the log layer writes, with `spec` as the filter.
    fn logged(format: LogFormat, spec: &str, emit: impl FnOnce()) -> String {
        let buffer = crate::observe::log_format::tests::Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(log_filter(spec))
            .with(log_lines(format, move || sink.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        buffer.text()
    }

    #[test]
    fn json_log_lines_carry_the_request_id() {
        let out = logged(LogFormat::Json, "info", || {
            let trace = RequestTrace::start("POST /v1/completions", "req-7", &[]);
            trace
                .span
                .in_scope(|| tracing::info!(status = 200_u16, "request finished"));
        });
        let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
        assert_eq!(line["span"]["request_id"], "req-7");
        assert_eq!(line["fields"]["status"], 200);
    }

    #[test]
    fn levels_and_span_directives_filter_what_is_logged() {
        let emit = || {
            tracing::info!("outside");
            let span = tracing::info_span!("request", request_id = "r");
            span.in_scope(|| tracing::debug!("inside"));
        };
        let out = logged(LogFormat::Text, "warn", emit);
        assert!(out.is_empty(), "{out}");
        let out = logged(LogFormat::Text, "info", emit);
        assert!(out.contains("outside") && !out.contains("inside"), "{out}");
        let out = logged(LogFormat::Text, "info,[request]=debug", emit);
        assert!(out.contains("outside") && out.contains("inside"), "{out}");
    }

    #[derive(Debug)]
    struct Failing;

    impl SpanExporter for Failing {
        async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
            Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                "down".into(),
            ))
        }
    }

    #[test]
    fn export_failures_mark_one_outage() {
        let exporter = LoggedExporter::new(Failing);
        for _ in 0..3 {
            let result = futures::executor::block_on(exporter.export(Vec::new()));
            assert!(result.is_err());
        }
        assert!(exporter.outage.is_down());
        exporter.observe(&Ok(()));
        assert!(!exporter.outage.is_down());
    }
}
