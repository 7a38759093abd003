//! The plugin host's metric families, and each loaded plugin's handles on
//! them per hook (resolved once: looking a labelled series up hashes its
//! labels and takes a lock).

use std::time::Instant;

use prometheus::{HistogramVec, IntCounterVec};

use super::runtime::{LoadedPlugin, PluginFailure};
use crate::observe::metrics::{FINE_BUCKETS, MetricsRegistry, Roles};

/// Every plugin's calls, latencies, failures and reloads.
pub struct PluginFamilies {
    pub calls: IntCounterVec,
    pub call_duration: HistogramVec,
    pub traps: IntCounterVec,
    pub timeouts: IntCounterVec,
    pub reloads: IntCounterVec,
}

impl PluginFamilies {
    /// Every series of a plugin just loaded, at 0: its hooks' calls,
    /// latencies and failures, and its reloads by result.
    pub(super) fn know(&self, plugin: &LoadedPlugin) {
        PluginMetrics::of(plugin, self);
        for result in ["ok", "failed"] {
            self.reloads.with_label_values(&[&plugin.name, result]);
        }
    }

    pub fn new(registry: &MetricsRegistry) -> Self {
        Self {
            calls: registry.counter_vec(
                Roles::EDGE,
                "sluice_plugin_calls_total",
                "Plugin hook calls",
                &["plugin", "hook"],
            ),
            call_duration: registry.histogram_vec(
                Roles::EDGE,
                "sluice_plugin_call_duration_seconds",
                "Plugin hook call latency",
                &["plugin", "hook"],
                FINE_BUCKETS,
            ),
            traps: registry.counter_vec(
                Roles::EDGE,
                "sluice_plugin_traps_total",
                "Plugin calls that trapped or returned invalid results",
                &["plugin", "hook"],
            ),
            timeouts: registry.counter_vec(
                Roles::EDGE,
                "sluice_plugin_timeouts_total",
                "Plugin calls stopped at their CPU deadline",
                &["plugin", "hook"],
            ),
            reloads: registry.counter_vec(
                Roles::EDGE,
                "sluice_plugin_reloads_total",
                "Plugin (re)loads by result: ok or failed",
                &["plugin", "result"],
            ),
        }
    }
}

/// One plugin's metrics for one hook.
pub struct HookMetrics {
    calls: prometheus::IntCounter,
    latency: prometheus::Histogram,
    pub(super) traps: prometheus::IntCounter,
    timeouts: prometheus::IntCounter,
}

impl HookMetrics {
    fn new(metrics: &PluginFamilies, plugin: &str, hook: &str) -> Self {
        let labels = [plugin, hook];
        Self {
            calls: metrics.calls.with_label_values(&labels),
            latency: metrics.call_duration.with_label_values(&labels),
            traps: metrics.traps.with_label_values(&labels),
            timeouts: metrics.timeouts.with_label_values(&labels),
        }
    }

    /// Counts a call, its latency, and a failure as a timeout or a trap
    /// (invalid results count as traps).
    pub(super) fn observe(&self, started: Instant, failure: Option<&PluginFailure>) {
        self.calls.inc();
        self.latency.observe(started.elapsed().as_secs_f64());
        match failure {
            Some(f) if f.is_timeout() => self.timeouts.inc(),
            Some(_) => self.traps.inc(),
            None => {}
        }
    }
}

/// A plugin's metric handles per hook, resolved once: looking a labelled
/// series up hashes its labels and takes a lock.
pub struct PluginMetrics {
    pub(super) on_request: HookMetrics,
    pub(super) cache_key: HookMetrics,
    pub(super) on_token: HookMetrics,
    pub(super) on_tool_call: HookMetrics,
}

impl PluginMetrics {
    /// The plugin's handles, resolved on first use for each loaded version.
    pub(super) fn of<'p>(plugin: &'p LoadedPlugin, metrics: &PluginFamilies) -> &'p Self {
        plugin.metrics.get_or_init(|| {
            let name = &*plugin.name;
            Self {
                on_request: HookMetrics::new(metrics, name, "on-request"),
                cache_key: HookMetrics::new(metrics, name, "cache-key"),
                on_token: HookMetrics::new(metrics, name, "on-token"),
                on_tool_call: HookMetrics::new(metrics, name, "on-tool-call"),
            }
        })
    }
}
