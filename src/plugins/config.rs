//! `[plugin_host]` (the WebAssembly runtime shared by every plugin) and
//! `[[plugins]]` (the chain, each plugin with its own limits and config table).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{Invalid, positive_millis};

/// Largest `max_memory_bytes` a plugin may be given.
pub const MAX_PLUGIN_MEMORY: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginHostConfig {
    /// Watch plugin files and this config file and hot-reload on change.
    pub watch: bool,
    /// Granularity of plugin CPU deadlines.
    #[serde(rename = "epoch_tick_ms", deserialize_with = "positive_millis")]
    pub epoch_tick: Duration,
    /// Plugin instances that can exist at once (the pooling allocator's size:
    /// each reserves `MAX_PLUGIN_MEMORY` plus a guard of address space, not memory).
    pub max_instances: u32,
    /// Initialised instances kept for reuse per plugin, once for the request
    /// hooks and once for token filters. More spare bursts of concurrent
    /// streams an instantiation each, and keep that many guests' memory
    /// resident and that many `max_instances` slots taken. Unset: 16, or
    /// half of `max_instances` if that is less.
    pub max_idle_instances: Option<u32>,
}

impl Default for PluginHostConfig {
    fn default() -> Self {
        Self {
            watch: true,
            epoch_tick: Duration::from_millis(1),
            max_instances: 4096,
            max_idle_instances: None,
        }
    }
}

impl PluginHostConfig {
    /// `max_idle_instances`, or its default for `max_instances`.
    pub fn idle_instances(&self) -> usize {
        self.max_idle_instances
            .unwrap_or_else(|| 16.min(self.max_instances / 2)) as usize
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        let max_instances = self.max_instances;
        if !(16..=65_536).contains(&max_instances) {
            return Err(Invalid::new(
                "plugin_host.max_instances",
                format!("{max_instances} must be between 16 and 65536"),
            ));
        }
        if let Some(n) = self.max_idle_instances
            && n > max_instances / 2
        {
            return Err(Invalid::new(
                "plugin_host.max_idle_instances",
                format!("{n} is more than half of plugin_host.max_instances ({max_instances})"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    FailOpen,
    FailClosed,
}

/// One `[[plugins]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    pub name: String,
    /// Path to the component (`.wasm`), relative to the config file.
    pub path: PathBuf,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Position in the chain; lower runs first. Defaults to the entry's position.
    #[serde(default)]
    pub order: Option<i64>,
    /// `fail-open` (skip the plugin) or `fail-closed` (fail the request).
    #[serde(default = "default_on_error")]
    pub on_error: OnError,
    /// Linear-memory cap per instance.
    #[serde(default = "default_plugin_memory")]
    pub max_memory_bytes: u64,
    /// CPU deadline per hook call.
    #[serde(default = "default_plugin_timeout")]
    pub timeout_ms: u64,
    /// Run only for these API key names (empty: every key).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Free-form table handed to the plugin as JSON when it is instantiated.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

fn default_true() -> bool {
    true
}
fn default_on_error() -> OnError {
    OnError::FailOpen
}
fn default_plugin_memory() -> u64 {
    16 * 1024 * 1024
}
fn default_plugin_timeout() -> u64 {
    20
}

/// An enabled plugin, checked, with its path made absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub name: String,
    pub path: PathBuf,
    pub on_error: OnError,
    pub max_memory_bytes: u64,
    pub timeout: Duration,
    pub keys: Vec<String>,
    /// The plugin's `config` table as JSON.
    pub config_json: String,
}

/// The enabled plugins in chain order (by `order`, then position), their
/// paths relative to `base_dir` (the config file's directory).
pub fn chain(sections: Vec<PluginSection>, base_dir: &Path) -> Result<Vec<PluginConfig>, Invalid> {
    let mut plugins = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (position, plugin) in sections.into_iter().enumerate() {
        let key = |field: &str| format!("plugins[{position}].{field}");
        if plugin.name.is_empty() {
            return Err(Invalid::new(key("name"), "must not be empty"));
        }
        if !seen.insert(plugin.name.clone()) {
            return Err(Invalid::new(
                key("name"),
                format!("`{}` is used by two plugins", plugin.name),
            ));
        }
        if !plugin.enabled {
            continue;
        }
        let max_memory_bytes = match plugin.max_memory_bytes {
            0 => {
                return Err(Invalid::new(
                    key("max_memory_bytes"),
                    "must be greater than 0",
                ));
            }
            n if n > MAX_PLUGIN_MEMORY => {
                return Err(Invalid::new(
                    key("max_memory_bytes"),
                    format!("{n} is over the {MAX_PLUGIN_MEMORY}-byte limit of the plugin runtime"),
                ));
            }
            n => n,
        };
        if plugin.timeout_ms == 0 {
            return Err(Invalid::new(key("timeout_ms"), "must be greater than 0"));
        }
        let order = plugin.order.unwrap_or(position as i64);
        plugins.push((
            order,
            position,
            PluginConfig {
                name: plugin.name,
                path: base_dir.join(plugin.path),
                on_error: plugin.on_error,
                max_memory_bytes,
                timeout: Duration::from_millis(plugin.timeout_ms),
                keys: plugin.keys,
                config_json: serde_json::Value::Object(plugin.config).to_string(),
            },
        ));
    }
    plugins.sort_by_key(|(order, position, _)| (*order, *position));
    Ok(plugins.into_iter().map(|(_, _, p)| p).collect())
}

/// Reads the `[[plugins]]` of the config file again (the host cannot parse
/// the whole file itself: that is the gateway's loader, above it).
pub type PluginsLoader = Arc<dyn Fn() -> Result<Vec<PluginConfig>, String> + Send + Sync>;

/// The config file the chain came from, watched for changes.
#[derive(Clone)]
pub struct PluginSource {
    pub path: PathBuf,
    pub load: PluginsLoader,
}

/// What the plugin host is started with.
#[derive(Clone)]
pub struct HostSetup {
    pub host: PluginHostConfig,
    pub plugins: Vec<PluginConfig>,
    /// The config file, when there is one to watch.
    pub source: Option<PluginSource>,
    /// `server.max_body_bytes`: the largest request a plugin may rewrite one into.
    pub max_body_bytes: usize,
}
