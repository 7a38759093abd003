//! What the plugin host has loaded, for operators: each plugin's file digest,
//! WIT version, hooks and call counts, and how the last (re)load went.

use std::time::SystemTime;

use super::PluginHost;

/// The host at one moment.
#[derive(Debug, Clone)]
pub struct HostStatus {
    /// The chain's version: 1 at startup, one more at each change.
    pub version: u64,
    pub plugins: Vec<PluginStatus>,
    pub last_reload: Option<ReloadReport>,
}

/// One loaded plugin.
#[derive(Debug, Clone)]
pub struct PluginStatus {
    pub name: String,
    pub path: String,
    /// SHA-256 of its file, hex.
    pub digest: String,
    /// The WIT package it was built against (`sluice:plugin@0.4.0`).
    pub wit: &'static str,
    pub hooks: Vec<HookStatus>,
}

/// One hook of a plugin, with its counters since the process started.
#[derive(Debug, Clone)]
pub struct HookStatus {
    pub hook: &'static str,
    pub calls: u64,
    pub traps: u64,
    pub timeouts: u64,
}

/// The last load or reload: when, and each plugin's result.
#[derive(Debug, Clone)]
pub struct ReloadReport {
    pub at: SystemTime,
    /// The config could not be read (no plugin was reloaded), with why.
    pub config_error: Option<String>,
    /// Each plugin that was (re)loaded: its name and, if it failed, why.
    pub results: Vec<(String, Result<(), String>)>,
}

impl PluginHost {
    /// The loaded chain and the last reload's outcome.
    pub fn status(&self) -> HostStatus {
        let chain = self.chain();
        let plugins = chain
            .plugins
            .iter()
            .map(|plugin| {
                let hooks = plugin.exports.hooks();
                let served = [
                    ("on-request", hooks.on_request),
                    ("cache-key", hooks.cache_key),
                    ("on-token", hooks.on_token),
                    ("on-tool-call", hooks.on_tool_call),
                ];
                let count = |family: &prometheus::IntCounterVec, hook: &str| {
                    family.with_label_values(&[&*plugin.name, hook]).get()
                };
                PluginStatus {
                    name: plugin.name.to_string(),
                    path: plugin.config.path.display().to_string(),
                    digest: hex::encode(plugin.digest),
                    wit: hooks.version.package(),
                    hooks: served
                        .into_iter()
                        .filter(|(_, served)| *served)
                        .map(|(hook, _)| HookStatus {
                            hook,
                            calls: count(&self.metrics.calls, hook),
                            traps: count(&self.metrics.traps, hook),
                            timeouts: count(&self.metrics.timeouts, hook),
                        })
                        .collect(),
                }
            })
            .collect();
        HostStatus {
            version: chain.version,
            plugins,
            last_reload: self
                .last_reload
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }

    pub(super) fn report_reload(&self, report: ReloadReport) {
        *self
            .last_reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report);
    }
}
