//! The pipeline's metric families: requests by route, transport and status,
//! their latencies, tokens, and the streams being delivered now.

use prometheus::{Histogram, HistogramVec, IntCounterVec, IntGauge};

use crate::observe::metrics::{FINE_BUCKETS, LATENCY_BUCKETS, MetricsRegistry, Roles};

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
    pub fn new(registry: &MetricsRegistry) -> Self {
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
