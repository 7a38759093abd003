//! The fleet's metric families: the worker's requests and each endpoint's
//! health, load and results.

use prometheus::{HistogramVec, IntCounterVec, IntGauge, IntGaugeVec};

use crate::backends::queue::Priority;
use crate::observe::metrics::{LATENCY_BUCKETS, MetricsRegistry, Roles};

pub struct FleetMetrics {
    pub worker_inflight: IntGauge,
    pub worker_requests: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub endpoint_up: IntGaugeVec,
    pub endpoint_in_flight: IntGaugeVec,
    pub endpoint_requests: IntCounterVec,
    pub continuations: IntCounterVec,
    /// Requests waiting for room on a full pool, by priority class.
    pub waiting: IntGaugeVec,
    pub wait_seconds: HistogramVec,
}

impl FleetMetrics {
    /// The families, every known outcome and kind at 0 (each endpoint's
    /// series are made with the fleet).
    pub fn new(registry: &MetricsRegistry) -> Self {
        let metrics = Self::families(registry);
        for outcome in ["completed", "upstream_error", "cancelled", "expired"] {
            metrics.worker_requests.with_label_values(&[outcome]);
        }
        for kind in [
            "connect",
            "timeout",
            "status",
            "stream_error",
            "body",
            "truncated",
        ] {
            metrics.upstream_errors.with_label_values(&[kind]);
        }
        for outcome in ["continued", "not_continuable", "failed"] {
            metrics.continuations.with_label_values(&[outcome]);
        }
        for class in Priority::ALL {
            metrics.waiting.with_label_values(&[class.name()]);
            metrics.wait_seconds.with_label_values(&[class.name()]);
        }
        metrics
    }

    fn families(registry: &MetricsRegistry) -> Self {
        Self {
            worker_inflight: registry.gauge(
                Roles::WORKER,
                "sluice_worker_inflight_requests",
                "Upstream requests a worker is running",
            ),
            worker_requests: registry.counter_vec(
                Roles::WORKER,
                "sluice_worker_requests_total",
                "Requests finished by a worker, by outcome",
                &["outcome"],
            ),
            upstream_errors: registry.counter_vec(
                Roles::WORKER,
                "sluice_upstream_errors_total",
                "Upstream failures by kind",
                &["kind"],
            ),
            endpoint_up: registry.gauge_vec(
                Roles::WORKER,
                "sluice_endpoint_up",
                "1 when the vLLM endpoint takes requests (its health check passes and it is not ejected after a failure)",
                &["model", "endpoint"],
            ),
            endpoint_in_flight: registry.gauge_vec(
                Roles::WORKER,
                "sluice_endpoint_in_flight",
                "Requests this process runs on the vLLM endpoint now",
                &["model", "endpoint"],
            ),
            endpoint_requests: registry.counter_vec(
                Roles::WORKER,
                "sluice_endpoint_requests_total",
                "Requests sent to the vLLM endpoint by result: ok (its first chunk arrived) or failed (before the first byte; another endpoint was tried)",
                &["model", "endpoint", "result"],
            ),
            continuations: registry.counter_vec(
                Roles::WORKER,
                "sluice_stream_continuations_total",
                "Streams whose endpoint failed after their first chunk: continued on another endpoint, not continuable (the client got the error), or failed again",
                &["outcome"],
            ),
            waiting: registry.gauge_vec(
                Roles::WORKER,
                "sluice_waiting_requests",
                "Requests waiting in the worker for room on a full pool, by priority class",
                &["class"],
            ),
            wait_seconds: registry.histogram_vec(
                Roles::WORKER,
                "sluice_wait_seconds",
                "Time requests waited in the worker for room on their pool, by priority class (0 for those that found room at once)",
                &["class"],
                LATENCY_BUCKETS,
            ),
        }
    }
}
