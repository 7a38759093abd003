//! The pipeline's metric families: requests by route, transport and status,
//! their latencies, tokens, and the streams being delivered now.

use prometheus::{Histogram, HistogramVec, IntCounterVec, IntGauge};

use crate::observe::metrics::{FINE_BUCKETS, LATENCY_BUCKETS, MetricsRegistry, Roles};
use crate::protocol::Route;

/// The transports a request may come by (the `transport` label).
pub const TRANSPORTS: [&str; 3] = ["sse", "json", "ws"];
/// The status classes of the `status` label.
const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

pub struct RequestMetrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    pub active_streams: IntGauge,
}

impl RequestMetrics {
    /// The families, with every series whose labels are known up front
    /// (routes, transports, status classes, and `models`) at 0, so a
    /// dashboard sees zero rather than no data before the first request.
    pub fn new(registry: &MetricsRegistry, models: &[String]) -> Self {
        let metrics = Self::families(registry);
        for route in Route::ALL {
            for transport in TRANSPORTS {
                for status in STATUS_CLASSES {
                    let labels = [route.path(), transport, status];
                    metrics.requests.with_label_values(&labels);
                    metrics.request_duration.with_label_values(&labels);
                }
            }
        }
        for transport in TRANSPORTS {
            for cache in ["hit", "miss"] {
                metrics
                    .time_to_first_token
                    .with_label_values(&[transport, cache]);
            }
        }
        for model in models {
            metrics.prompt_tokens.with_label_values(&[model]);
            metrics.completion_tokens.with_label_values(&[model]);
        }
        metrics
    }

    fn families(registry: &MetricsRegistry) -> Self {
        Self {
            requests: registry.counter_vec(
                Roles::EDGE,
                "sluice_requests_total",
                "Inference requests by route, transport and HTTP status class (499, client gone, counts as 4xx)",
                &["route", "transport", "status"],
            ),
            request_duration: registry.histogram_vec(
                Roles::EDGE,
                "sluice_request_duration_seconds",
                "Time from request received to last byte sent",
                &["route", "transport", "status"],
                LATENCY_BUCKETS,
            ),
            time_to_first_token: registry.histogram_vec(
                Roles::EDGE,
                "sluice_time_to_first_token_seconds",
                "Time from request received to the first chunk sent to the client",
                &["transport", "cache"],
                LATENCY_BUCKETS,
            ),
            inter_token_latency: registry.histogram(
                Roles::EDGE,
                "sluice_inter_token_latency_seconds",
                "Time between consecutive chunks sent to a client",
                FINE_BUCKETS,
            ),
            prompt_tokens: registry.counter_vec(
                Roles::EDGE,
                "sluice_prompt_tokens_total",
                "Prompt tokens of completed requests",
                &["model"],
            ),
            completion_tokens: registry.counter_vec(
                Roles::EDGE,
                "sluice_completion_tokens_total",
                "Completion tokens sent to clients",
                &["model"],
            ),
            active_streams: registry.gauge(
                Roles::EDGE,
                "sluice_active_streams",
                "Responses currently being delivered",
            ),
        }
    }
}
