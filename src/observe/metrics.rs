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
    pub auth_lookups: IntCounterVec,
    pub limited: IntCounterVec,
    pub limiter_fallbacks: IntCounter,
    pub cache_lookups: IntCounterVec,
    pub cache_stores: IntCounterVec,
    pub queue_wait: Histogram,
    pub queue_produce: Histogram,
    pub queue_consume_delay: Histogram,
    pub queue_messages_skipped: IntCounterVec,
    pub queue_retries: IntCounter,
    pub queue_orphans_cancelled: IntCounter,
    pub queue_outbox_bytes: IntGauge,
    pub queue_outbox_full: IntCounter,
    pub queue_frames_too_large: IntCounter,
    pub queue_group_rejoins: IntCounter,
    pub queue_assigned_partitions: IntGauge,
    pub worker_inflight: IntGauge,
    pub worker_requests: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub plugin_calls: IntCounterVec,
    pub plugin_call_duration: HistogramVec,
    pub plugin_traps: IntCounterVec,
    pub plugin_timeouts: IntCounterVec,
    pub plugin_reloads: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub endpoint_up: IntGaugeVec,
    pub endpoint_in_flight: IntGaugeVec,
    pub endpoint_requests: IntCounterVec,
    pub inference_log_dropped: IntCounter,
}

/// Which metrics a process exposes: an edge's, a worker's, or both (an edge
/// with its worker in process). Every metric exists either way; only those
/// of the process's roles are registered, so a standalone worker's
/// `/metrics` shows only what a worker measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub edge: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Self = Self {
        edge: true,
        worker: true,
    };
    pub const EDGE: Self = Self {
        edge: true,
        worker: false,
    };
    pub const WORKER: Self = Self {
        edge: false,
        worker: true,
    };
}

/// Registers the metrics of the process's roles as they are made.
struct Builder {
    registry: Registry,
    roles: Roles,
}

impl Builder {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, of: Roles, metric: M) -> M {
        if (of.edge && self.roles.edge) || (of.worker && self.roles.worker) {
            self.registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
        }
        metric
    }

    fn counter_vec(&self, of: Roles, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(
            of,
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
        )
    }

    fn counter(&self, of: Roles, name: &str, help: &str) -> IntCounter {
        self.add(of, IntCounter::new(name, help).expect("valid metric"))
    }

    fn histogram_vec(
        &self,
        of: Roles,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(of, HistogramVec::new(opts, labels).expect("valid metric"))
    }

    fn histogram(&self, of: Roles, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(of, Histogram::with_opts(opts).expect("valid metric"))
    }

    fn gauge(&self, of: Roles, name: &str, help: &str) -> IntGauge {
        self.add(of, IntGauge::new(name, help).expect("valid metric"))
    }
}

impl Metrics {
    /// The metrics of a process with `roles`, with the standard `process_*`
    /// metrics (CPU, memory, open file descriptors, start time).
    pub fn new(roles: Roles) -> Self {
        let b = Builder {
            registry: Registry::new(),
            roles,
        };
        use Roles as R;
        let _ = b.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        Self {
            requests: b.counter_vec(
                R::EDGE,
                "sluice_requests_total",
                "Inference requests by route, transport and HTTP status class (499, client gone, counts as 4xx)",
                &["route", "transport", "status"],
            ),
            request_duration: b.histogram_vec(
                R::EDGE,
                "sluice_request_duration_seconds",
                "Time from request received to last byte sent",
                &["route", "transport", "status"],
                LATENCY_BUCKETS,
            ),
            time_to_first_token: b.histogram_vec(
                R::EDGE,
                "sluice_time_to_first_token_seconds",
                "Time from request received to the first chunk sent to the client",
                &["transport", "cache"],
                LATENCY_BUCKETS,
            ),
            inter_token_latency: b.histogram(
                R::EDGE,
                "sluice_inter_token_latency_seconds",
                "Time between consecutive chunks sent to a client",
                FINE_BUCKETS,
            ),
            prompt_tokens: b.counter_vec(
                R::EDGE,
                "sluice_prompt_tokens_total",
                "Prompt tokens of completed requests",
                &["model"],
            ),
            completion_tokens: b.counter_vec(
                R::EDGE,
                "sluice_completion_tokens_total",
                "Completion tokens sent to clients",
                &["model"],
            ),
            active_streams: b.gauge(
                R::EDGE,
                "sluice_active_streams",
                "Responses currently being delivered",
            ),
            auth_lookups: b.counter_vec(
                R::EDGE,
                "sluice_auth_lookups_total",
                "API key lookups in the store by result: found, unknown, or limited (refused without a lookup)",
                &["result"],
            ),
            limited: b.counter_vec(
                R::EDGE,
                "sluice_limited_requests_total",
                "Requests refused by a key's or team's limits, by reason: requests, tokens, concurrency, model, expired, or unavailable (the limiter's Redis is down and on_unavailable = refuse)",
                &["reason"],
            ),
            limiter_fallbacks: b.counter(
                R::EDGE,
                "sluice_limiter_fallbacks_total",
                "Limit checks that could not reach the limiter's Redis (then checked in process, or refused, per limits.on_unavailable)",
            ),
            cache_lookups: b.counter_vec(
                R::EDGE,
                "sluice_cache_lookups_total",
                "Cache lookups by result: hit, miss, bypass (plugin or uncacheable), error",
                &["result"],
            ),
            cache_stores: b.counter_vec(
                R::EDGE,
                "sluice_cache_stores_total",
                "Complete responses written to the cache, by result: stored or failed",
                &["result"],
            ),
            queue_wait: b.histogram(
                R::EDGE,
                "sluice_queue_first_chunk_seconds",
                "Time from queue submission to the first chunk back from a worker",
                LATENCY_BUCKETS,
            ),
            queue_produce: b.histogram(
                R::ALL,
                "sluice_queue_produce_seconds",
                "Time to hand one message to the queue (Kafka: until acknowledged)",
                LATENCY_BUCKETS,
            ),
            queue_consume_delay: b.histogram(
                R::ALL,
                "sluice_queue_consume_delay_seconds",
                "Age of a queue message when consumed",
                LATENCY_BUCKETS,
            ),
            queue_messages_skipped: b.counter_vec(
                R::ALL,
                "sluice_queue_messages_skipped_total",
                "Malformed, foreign or stale queue messages skipped",
                &["topic", "reason"],
            ),
            queue_retries: b.counter(
                R::EDGE,
                "sluice_queue_retries_total",
                "Requests resubmitted after their worker was lost before sending anything",
            ),
            queue_orphans_cancelled: b.counter(
                R::WORKER,
                "sluice_queue_orphans_cancelled_total",
                "Requests a worker cancelled because their edge went silent (died) for queue.worker_timeout_ms",
            ),
            queue_outbox_bytes: b.gauge(
                R::WORKER,
                "sluice_queue_outbox_bytes",
                "Response bytes a worker holds for edges, not yet handed to the broker",
            ),
            queue_outbox_full: b.counter(
                R::WORKER,
                "sluice_queue_outbox_full_total",
                "Times a job stopped reading from vLLM because its edge's outbox was full (queue.max_outbox_bytes): the broker is behind",
            ),
            queue_frames_too_large: b.counter(
                R::WORKER,
                "sluice_queue_frames_too_large_total",
                "Response chunks larger than the broker accepts in one message; their requests end with an error",
            ),
            queue_group_rejoins: b.counter(
                R::WORKER,
                "sluice_queue_group_rejoins_total",
                "Times a worker left and rejoined its consumer group because the group, though stable, left request partitions unread",
            ),
            queue_assigned_partitions: b.gauge(
                R::WORKER,
                "sluice_queue_assigned_partitions",
                "Request-topic partitions the consumer group assigns this worker (checked every 3 s); their sum over the workers should equal the topic's partitions",
            ),
            worker_inflight: b.gauge(
                R::WORKER,
                "sluice_worker_inflight_requests",
                "Upstream requests a worker is running",
            ),
            worker_requests: b.counter_vec(
                R::WORKER,
                "sluice_worker_requests_total",
                "Requests finished by a worker, by outcome",
                &["outcome"],
            ),
            endpoint_up: b.add(
                R::WORKER,
                IntGaugeVec::new(
                    Opts::new(
                        "sluice_endpoint_up",
                        "1 when the vLLM endpoint takes requests (its health check passes and it is not ejected after a failure)",
                    ),
                    &["model", "endpoint"],
                )
                .expect("valid metric"),
            ),
            endpoint_in_flight: b.add(
                R::WORKER,
                IntGaugeVec::new(
                    Opts::new(
                        "sluice_endpoint_in_flight",
                        "Requests this process runs on the vLLM endpoint now",
                    ),
                    &["model", "endpoint"],
                )
                .expect("valid metric"),
            ),
            endpoint_requests: b.counter_vec(
                R::WORKER,
                "sluice_endpoint_requests_total",
                "Requests sent to the vLLM endpoint by result: ok (its first chunk arrived) or failed (before the first byte; another endpoint was tried)",
                &["model", "endpoint", "result"],
            ),
            upstream_errors: b.counter_vec(
                R::WORKER,
                "sluice_upstream_errors_total",
                "Upstream failures by kind",
                &["kind"],
            ),
            plugin_calls: b.counter_vec(
                R::EDGE,
                "sluice_plugin_calls_total",
                "Plugin hook calls",
                &["plugin", "hook"],
            ),
            plugin_call_duration: b.histogram_vec(
                R::EDGE,
                "sluice_plugin_call_duration_seconds",
                "Plugin hook call latency",
                &["plugin", "hook"],
                FINE_BUCKETS,
            ),
            plugin_traps: b.counter_vec(
                R::EDGE,
                "sluice_plugin_traps_total",
                "Plugin calls that trapped or returned invalid results",
                &["plugin", "hook"],
            ),
            plugin_timeouts: b.counter_vec(
                R::EDGE,
                "sluice_plugin_timeouts_total",
                "Plugin calls stopped at their CPU deadline",
                &["plugin", "hook"],
            ),
            plugin_reloads: b.counter_vec(
                R::EDGE,
                "sluice_plugin_reloads_total",
                "Plugin (re)loads by result: ok or failed",
                &["plugin", "result"],
            ),
            backend_up: b.add(
                R::ALL,
                IntGaugeVec::new(
                    Opts::new(
                        "sluice_backend_up",
                        "1 when the backend (store, cache, queue) answered its last check",
                    ),
                    &["backend"],
                )
                .expect("valid metric"),
            ),
            inference_log_dropped: b.counter(
                R::EDGE,
                "sluice_inference_log_dropped_total",
                "Inference-log rows dropped because the store fell behind",
            ),
            registry: b.registry,
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
        Self::new(Roles::ALL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_exposes_its_own_metrics_and_the_process_metrics() {
        let worker = Metrics::new(Roles::WORKER);
        worker.worker_inflight.set(1);
        worker.requests.with_label_values(&["r", "t", "2xx"]).inc();
        let text = worker.render();
        assert!(text.contains("sluice_worker_inflight_requests 1"), "{text}");
        assert!(!text.contains("sluice_requests_total"), "{text}");
        assert!(text.contains("process_open_fds"), "{text}");
        assert!(text.contains("process_start_time_seconds"), "{text}");

        let edge = Metrics::new(Roles::EDGE);
        edge.requests.with_label_values(&["r", "t", "2xx"]).inc();
        let text = edge.render();
        assert!(text.contains("sluice_requests_total"), "{text}");
        assert!(!text.contains("sluice_worker_inflight_requests"), "{text}");
    }
}
