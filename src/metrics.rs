//! Prometheus metrics. One registry per gateway instance (tests run several
//! in one process); names and units follow Prometheus conventions, and every
//! label has a small, bounded set of values.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Per-token and per-call buckets from 1 µs to 1 s.
const FINE_BUCKETS: &[f64] = &[
    0.000_001, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    pub active_streams: IntGauge,
    pub cache_lookups: IntCounterVec,
    pub queue_wait: Histogram,
    pub queue_produce: Histogram,
    pub queue_consume_delay: Histogram,
    pub queue_messages_skipped: IntCounterVec,
    pub queue_retries: IntCounter,
    pub worker_inflight: IntGauge,
    pub worker_requests: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub plugin_calls: IntCounterVec,
    pub plugin_call_duration: HistogramVec,
    pub plugin_traps: IntCounterVec,
    pub plugin_timeouts: IntCounterVec,
    pub plugin_reloads: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub inference_log_dropped: IntCounter,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let backend_up = IntGaugeVec::new(
            Opts::new(
                "sluice_backend_up",
                "1 when the backend (store, cache, queue) answered its last check",
            ),
            &["backend"],
        )
        .expect("valid metric");
        r.register(Box::new(backend_up.clone()))
            .expect("unique metric");
        Self {
            requests: counter_vec(
                &r,
                "sluice_requests_total",
                "Completion requests by route, transport and HTTP status class (499, client gone, counts as 4xx)",
                &["route", "transport", "status"],
            ),
            request_duration: histogram_vec(
                &r,
                "sluice_request_duration_seconds",
                "Time from request received to last byte sent",
                &["route", "transport", "status"],
                LATENCY_BUCKETS,
            ),
            time_to_first_token: histogram_vec(
                &r,
                "sluice_time_to_first_token_seconds",
                "Time from request received to the first chunk sent to the client",
                &["transport", "cache"],
                LATENCY_BUCKETS,
            ),
            inter_token_latency: histogram(
                &r,
                "sluice_inter_token_latency_seconds",
                "Time between consecutive chunks sent to a client",
                FINE_BUCKETS,
            ),
            prompt_tokens: counter_vec(
                &r,
                "sluice_prompt_tokens_total",
                "Prompt tokens of completed requests",
                &["model"],
            ),
            completion_tokens: counter_vec(
                &r,
                "sluice_completion_tokens_total",
                "Completion tokens sent to clients",
                &["model"],
            ),
            active_streams: gauge(
                &r,
                "sluice_active_streams",
                "Responses currently being delivered",
            ),
            cache_lookups: counter_vec(
                &r,
                "sluice_cache_lookups_total",
                "Cache lookups by result: hit, miss, bypass (plugin or uncacheable), error",
                &["result"],
            ),
            queue_wait: histogram(
                &r,
                "sluice_queue_first_chunk_seconds",
                "Time from queue submission to the first chunk back from a worker",
                LATENCY_BUCKETS,
            ),
            queue_produce: histogram(
                &r,
                "sluice_queue_produce_seconds",
                "Time to hand one message to the queue (Kafka: until acknowledged)",
                LATENCY_BUCKETS,
            ),
            queue_consume_delay: histogram(
                &r,
                "sluice_queue_consume_delay_seconds",
                "Age of a queue message when consumed",
                LATENCY_BUCKETS,
            ),
            queue_messages_skipped: counter_vec(
                &r,
                "sluice_queue_messages_skipped_total",
                "Malformed, foreign or stale queue messages skipped",
                &["topic", "reason"],
            ),
            queue_retries: counter(
                &r,
                "sluice_queue_retries_total",
                "Requests resubmitted after their worker was lost before sending anything",
            ),
            worker_inflight: gauge(
                &r,
                "sluice_worker_inflight_requests",
                "Upstream requests a worker is running",
            ),
            worker_requests: counter_vec(
                &r,
                "sluice_worker_requests_total",
                "Requests finished by a worker, by outcome",
                &["outcome"],
            ),
            upstream_errors: counter_vec(
                &r,
                "sluice_upstream_errors_total",
                "Upstream failures by kind",
                &["kind"],
            ),
            plugin_calls: counter_vec(
                &r,
                "sluice_plugin_calls_total",
                "Plugin hook calls",
                &["plugin", "hook"],
            ),
            plugin_call_duration: histogram_vec(
                &r,
                "sluice_plugin_call_duration_seconds",
                "Plugin hook call latency",
                &["plugin", "hook"],
                FINE_BUCKETS,
            ),
            plugin_traps: counter_vec(
                &r,
                "sluice_plugin_traps_total",
                "Plugin calls that trapped or returned invalid results",
                &["plugin", "hook"],
            ),
            plugin_timeouts: counter_vec(
                &r,
                "sluice_plugin_timeouts_total",
                "Plugin calls stopped at their CPU deadline",
                &["plugin", "hook"],
            ),
            plugin_reloads: counter_vec(
                &r,
                "sluice_plugin_reloads_total",
                "Plugin (re)loads by result: ok or failed",
                &["plugin", "result"],
            ),
            backend_up,
            inference_log_dropped: counter(
                &r,
                "sluice_inference_log_dropped_total",
                "Inference-log rows dropped because the store fell behind",
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
