//! Loading and hot reload: the chain of loaded plugins, built at startup
//! and swapped atomically when the config or a plugin file changes.

use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use super::runtime::{Compiled, Hooks, LoadError, LoadedPlugin, Runtime};
use super::{
    Chain, HostSetup, PluginConfig, PluginFamilies, PluginHost, PluginHostConfig, ReloadReport,
    watch,
};

impl PluginHost {
    /// Loads every configured plugin; any that fails stops startup with its reason.
    pub async fn start(
        setup: HostSetup,
        metrics: Arc<PluginFamilies>,
    ) -> anyhow::Result<Arc<Self>> {
        let host = Arc::new(Self {
            runtime_config: setup.host.clone(),
            chain: ArcSwap::from_pointee(Chain {
                plugins: Vec::new(),
                version: 0,
            }),
            metrics,
            source: setup.source.clone(),
            max_body_bytes: setup.max_body_bytes,
            reloading: tokio::sync::Mutex::new(Default::default()),
            last_reload: std::sync::Mutex::new(None),
        });
        let mut plugins = Vec::new();
        for plugin in &setup.plugins {
            let loaded = host
                .load(plugin.clone())
                .await
                .map_err(|err| anyhow::anyhow!("plugin `{}`: {err}", plugin.name))?;
            host.metrics.know(&loaded);
            host.metrics
                .reloads
                .with_label_values(&[&plugin.name, "ok"])
                .inc();
            tracing::info!(plugin = %plugin.name, hooks = ?loaded.exports.hooks(), "plugin loaded");
            plugins.push(Arc::new(loaded));
        }
        host.report_reload(ReloadReport {
            at: std::time::SystemTime::now(),
            config_error: None,
            results: plugins
                .iter()
                .map(|p| (p.name.to_string(), Ok(())))
                .collect(),
        });
        host.chain.store(Arc::new(Chain {
            plugins,
            version: 1,
        }));
        if setup.host.watch
            && let Some(source) = setup.source
        {
            watch::spawn(host.clone(), source, &setup.plugins);
        }
        Ok(host)
    }

    /// Instantiates each loaded plugin once (fresh store, instantiate, `init`)
    /// and says how long each took: what a call pays when no idle instance is
    /// ready. For benchmarks and diagnostics.
    pub async fn time_instantiation(&self) -> Vec<(String, std::time::Duration)> {
        let mut times = Vec::new();
        for plugin in &self.chain().plugins {
            let started = std::time::Instant::now();
            if plugin.instantiate("timing").await.is_ok() {
                times.push((plugin.name.to_string(), started.elapsed()));
            }
        }
        times
    }

    /// The chain new requests use.
    pub(crate) fn chain(&self) -> Arc<Chain> {
        self.chain.load_full()
    }

    async fn load(self: &Arc<Self>, config: PluginConfig) -> Result<LoadedPlugin, LoadError> {
        let runtime = Runtime::shared(&self.runtime_config)
            .map_err(|e| LoadError::Runtime(format!("{e:#}")))?;
        load(runtime, config).await
    }

    /// Re-reads the config and the plugin files, reloads what changed, and
    /// swaps the chain. A plugin that fails to load keeps its previous version.
    pub async fn reload(self: &Arc<Self>) {
        let mut failed = self.reloading.lock().await;
        let configs = match &self.source {
            Some(source) => match (source.load)() {
                Ok(plugins) => plugins,
                Err(err) => {
                    tracing::error!(%err, "config changed but is invalid; plugins unchanged");
                    self.report_reload(ReloadReport {
                        at: std::time::SystemTime::now(),
                        config_error: Some(err.to_string()),
                        results: Vec::new(),
                    });
                    self.metrics
                        .reloads
                        .with_label_values(&["config", "failed"])
                        .inc();
                    return;
                }
            },
            None => self
                .chain()
                .plugins
                .iter()
                .map(|p| p.config.clone())
                .collect(),
        };
        let current = self.chain();
        let mut next = Vec::with_capacity(configs.len());
        let mut results = Vec::new();
        for config in configs {
            let previous = current
                .plugins
                .iter()
                .find(|p| p.config.name == config.name)
                .cloned();
            let digest: Option<[u8; 32]> = tokio::fs::read(&config.path)
                .await
                .ok()
                .map(|bytes| Sha256::digest(&bytes).into());
            let unchanged = match (&previous, digest) {
                (Some(p), Some(digest)) => p.config == config && p.digest == digest,
                _ => false,
            };
            if unchanged {
                next.push(previous.expect("checked above"));
                continue;
            }
            // The version that failed last time, still in place: already reported.
            let known_broken = digest.is_some_and(|digest| {
                failed
                    .get(&config.name)
                    .is_some_and(|(c, d)| *c == config && *d == digest)
            });
            if known_broken {
                next.extend(previous);
                continue;
            }
            let name = config.name.clone();
            let version = digest.map(|digest| (config.clone(), digest));
            match self.load(config).await {
                Ok(loaded) => {
                    self.metrics.know(&loaded);
                    failed.remove(&name);
                    tracing::info!(plugin = %name, hooks = ?loaded.exports.hooks(), "plugin reloaded");
                    results.push((name.clone(), Ok(())));
                    self.metrics.reloads.with_label_values(&[&name, "ok"]).inc();
                    next.push(Arc::new(loaded));
                }
                Err(err) => {
                    self.metrics
                        .reloads
                        .with_label_values(&[&name, "failed"])
                        .inc();
                    if let Some(version) = version {
                        failed.insert(name.clone(), version);
                    }
                    results.push((name.clone(), Err(err.to_string())));
                    match previous {
                        Some(previous) => {
                            tracing::error!(plugin = %name, %err, "plugin reload failed; the previous version keeps serving");
                            next.push(previous);
                        }
                        None => {
                            tracing::error!(plugin = %name, %err, "new plugin failed to load; not added")
                        }
                    }
                }
            }
        }
        if !results.is_empty() || next.len() != current.plugins.len() {
            self.report_reload(ReloadReport {
                at: std::time::SystemTime::now(),
                config_error: None,
                results,
            });
        }
        let changed = next.len() != current.plugins.len()
            || next
                .iter()
                .zip(&current.plugins)
                .any(|(new, old)| !Arc::ptr_eq(new, old));
        if changed {
            let version = current.version + 1;
            self.chain.store(Arc::new(Chain {
                plugins: next,
                version,
            }));
            tracing::info!(version, "plugin chain swapped");
        }
    }
}

/// Loads `plugin` as the gateway would (compiles, instantiates, runs its
/// `init`) and says which hooks it serves: `sluice plugin check`.
pub async fn check(host: &PluginHostConfig, plugin: PluginConfig) -> anyhow::Result<Hooks> {
    let runtime = Runtime::shared(host)?;
    Ok(load(runtime, plugin).await?.exports.hooks())
}

/// Compiles (on a blocking thread) and validates a plugin.
pub(super) async fn load(
    runtime: &'static Runtime,
    config: PluginConfig,
) -> Result<LoadedPlugin, LoadError> {
    let path = config.path.display().to_string();
    let compiled = tokio::task::spawn_blocking(move || Compiled::compile(runtime, &config))
        .await
        .map_err(|err| LoadError::Instantiate {
            path,
            reason: err.to_string(),
        })??;
    compiled.validate(runtime).await
}
