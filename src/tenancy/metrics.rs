//! Tenancy's metric families: key lookups, refusals by limits, and the
//! limiter's fallbacks while its Redis is down.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec};

use crate::observe::metrics::{MetricsRegistry, Roles};

pub struct TenancyMetrics {
    pub auth_lookups: IntCounterVec,
    pub limited: IntCounterVec,
    pub limiter_fallbacks: IntCounter,
    /// The registry's `sluice_backend_up` (the limiter reports its Redis as `limits`).
    pub backend_up: IntGaugeVec,
}

impl TenancyMetrics {
    /// The families, every known label value at 0.
    pub fn new(registry: &MetricsRegistry) -> Self {
        let metrics = Self::families(registry);
        for result in ["found", "unknown", "limited"] {
            metrics.auth_lookups.with_label_values(&[result]);
        }
        for reason in ["requests", "tokens", "concurrency", "model", "unavailable"] {
            metrics.limited.with_label_values(&[reason]);
        }
        metrics
    }

    fn families(registry: &MetricsRegistry) -> Self {
        Self {
            auth_lookups: registry.counter_vec(
                Roles::EDGE,
                "sluice_auth_lookups_total",
                "API key lookups in the store by result: found, unknown, or limited (refused without a lookup)",
                &["result"],
            ),
            limited: registry.counter_vec(
                Roles::EDGE,
                "sluice_limited_requests_total",
                "Requests refused by a key's or team's limits, by reason: requests, tokens, concurrency, model, expired, or unavailable (the limiter's Redis is down and on_unavailable = refuse)",
                &["reason"],
            ),
            limiter_fallbacks: registry.counter(
                Roles::EDGE,
                "sluice_limiter_fallbacks_total",
                "Limit checks that could not reach the limiter's Redis (then checked in process, or refused, per limits.on_unavailable)",
            ),
            backend_up: registry.backend_up.clone(),
        }
    }
}
