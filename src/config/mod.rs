//! `gateway.toml` and `SLUICE_*` environment variables, loaded in two
//! phases: each subsystem's section deserialized into the serde struct that
//! lives beside its code (unknown keys rejected, every default documented),
//! layered by figment from the file and the environment; then each section
//! checked by its own rules and the rules that span sections checked here,
//! into the typed [`Config`]. Errors name the key and where its value came
//! from (the file or the variable).
//!
//! Every key can be overridden by an environment variable named
//! `SLUICE_<SECTION>__<KEY>` (double underscore between levels), for example
//! `SLUICE_STORE__URL=postgres://...` or `SLUICE_QUEUE__CONSUMER__FETCH_WAIT_MAX_MS=1`.
//! A variable's value is a string, read as a number or a boolean only where
//! the key is one, so `SLUICE_UPSTREAM__API_KEY=12345` is the string `"12345"`.

mod env;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;

pub use crate::backends::affinity::ResponsesConfig;
pub use crate::backends::cache::{CacheBackend, CacheConfig, CacheScope};
pub use crate::backends::queue::kafka::KafkaConfig;
pub use crate::backends::queue::{QueueBackend, QueueConfig, QueueSection};
pub use crate::backends::replay::ResumeConfig;
pub use crate::backends::store::{StoreConfig, StoreKind};
pub use crate::batch::BatchConfig;
pub use crate::console::ConsoleConfig;
pub use crate::edge::{AdminConfig, CorsConfig, ServerConfig};
pub use crate::fleet::{Balance, ModelConfig, UpstreamConfig, WorkerConfig};
pub use crate::observe::{LogConfig, LogFormat, OtlpProtocol, TelemetryConfig};
pub use crate::plugins::{
    HostSetup, MAX_PLUGIN_MEMORY, OnError, PluginConfig, PluginHostConfig, PluginSection,
    PluginSource,
};
use crate::settings::Invalid;
pub use crate::settings::redact_url;
pub use crate::tenancy::auth::AuthConfig;
pub use crate::tenancy::limits::{LimitsConfig, OnLimiterDown};
pub use env::Origins;
use env::{EnvOverride, describe};

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "SLUICE_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config key `{key}`{origin}: {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
}

/// `gateway.toml` as written: each section in its subsystem's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: ServerConfig,
    pub cors: CorsConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    pub responses: ResponsesConfig,
    pub resume: ResumeConfig,
    pub batch: BatchConfig,
    pub admin: AdminConfig,
    pub console: ConsoleConfig,
    pub queue: QueueSection,
    pub worker: WorkerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub plugin_host: PluginHostConfig,
    pub plugins: Vec<PluginSection>,
    pub models: Vec<ModelConfig>,
}

/// The typed, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub cors: CorsConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    /// `[responses]`: the map of stored responses to their replicas.
    pub responses: ResponsesConfig,
    /// `[resume]`: resumable streams and their replay buffer.
    pub resume: ResumeConfig,
    /// `[batch]`: the Files and Batch APIs.
    pub batch: BatchConfig,
    pub admin: AdminConfig,
    /// `[console]`: the operator console on the admin listener.
    pub console: ConsoleConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub plugin_host: PluginHostConfig,
    /// The enabled plugins, in chain order.
    pub plugins: Vec<PluginConfig>,
    /// `[[models]]`: each model's pool of vLLM endpoints. Empty: one pool,
    /// `upstream.urls`, serves every model.
    pub models: Vec<ModelConfig>,
    /// The config file, watched for plugin changes.
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        RawConfig::default()
            .validate(&Origins {
                figment: Figment::new(),
                file: None,
            })
            .expect("the built-in defaults are valid")
    }
}

impl Config {
    /// Loads `path` and the process's environment overrides and validates them.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (raw, origins) = RawConfig::load_with_env(path, env)?;
        raw.validate(&origins)
    }

    /// What the plugin host starts with: its section, the chain, and the
    /// config file to watch (read again, with this process's environment,
    /// when it changes).
    /// The Redis URL of the map of stored responses, if it is in Redis:
    /// `responses.url`, or unset, the limits' Redis, else the cache's.
    pub fn responses_redis(&self) -> Option<&str> {
        let cache = match self.cache.backend() {
            CacheBackend::Redis => Some(secrecy::ExposeSecret::expose_secret(&self.cache.url)),
            _ => None,
        };
        match self.responses.in_process() {
            true => None,
            false => self
                .responses
                .redis_url()
                .or(self.limits.redis_url())
                .or(cache),
        }
    }

    /// The Redis URL of the replay buffer of resumable streams, if it is in
    /// Redis: `resume.url`, or unset, the Redis of stored responses.
    pub fn resume_redis(&self) -> Option<&str> {
        match self.resume.in_process() {
            true => None,
            false => self.resume.redis_url().or(self.responses_redis()),
        }
    }

    pub fn plugin_setup(&self) -> HostSetup {
        HostSetup {
            host: self.plugin_host.clone(),
            plugins: self.plugins.clone(),
            source: self.source.clone().map(|path| {
                let file = path.clone();
                PluginSource {
                    path,
                    load: Arc::new(move || {
                        Config::load(Some(&file))
                            .map(|config| config.plugins)
                            .map_err(|err| err.to_string())
                    }),
                }
            }),
            max_body_bytes: self.server.max_body_bytes.get(),
        }
    }
}

impl RawConfig {
    /// Reads `path` (if given) and applies `SLUICE_*` overrides from `env`.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Origins), ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            // figment reads a missing file as an empty one; a named file must exist.
            std::fs::metadata(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        for (var, value) in env {
            if let Some(env) = EnvOverride::parse(var, value) {
                figment = figment.merge(env);
            }
        }
        let raw = figment.extract_lossy::<RawConfig>().map_err(|err| {
            if err.path.is_empty() {
                // The file itself does not parse.
                ConfigError::Parse {
                    origin: path
                        .map_or_else(|| "configuration".into(), |p| p.display().to_string()),
                    message: err.kind.to_string(),
                }
            } else {
                ConfigError::Invalid {
                    key: key_name(&err.path),
                    origin: describe(err.metadata.as_ref()),
                    message: err.kind.to_string(),
                }
            }
        })?;
        let file = path.map(Path::to_path_buf);
        Ok((raw, Origins { figment, file }))
    }

    /// Each section by its own rules, then the rules that span sections.
    pub fn validate(self, origins: &Origins) -> Result<Config, ConfigError> {
        let located = |invalid: Invalid| ConfigError::Invalid {
            origin: origins.describe(&invalid.key),
            key: invalid.key,
            message: invalid.message,
        };
        self.cors.validate().map_err(located)?;
        self.admin.validate().map_err(located)?;
        self.auth.validate().map_err(located)?;
        self.store.validate().map_err(located)?;
        self.cache.validate().map_err(located)?;
        self.limits.validate().map_err(located)?;
        self.responses.validate().map_err(located)?;
        self.resume.validate().map_err(located)?;
        self.batch.validate().map_err(located)?;
        self.console.validate().map_err(located)?;
        self.upstream.validate(&self.models).map_err(located)?;
        self.log.validate().map_err(located)?;
        self.telemetry.validate().map_err(located)?;
        self.plugin_host.validate().map_err(located)?;
        let mut queue = self.queue.validate().map_err(located)?;
        if let QueueBackend::Kafka(kafka) = &mut queue.backend
            && !self.models.is_empty()
        {
            kafka.worker_models = self.models.iter().map(|m| m.name.clone()).collect();
        }
        if matches!(queue.backend, QueueBackend::Memory { .. }) && !self.worker.in_process {
            return Err(located(Invalid::new(
                "worker.in_process",
                "the memory:// queue is served only by the in-process worker; use kafka:// for separate workers",
            )));
        }
        let base_dir = origins
            .file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let plugins = crate::plugins::chain(self.plugins, &base_dir).map_err(located)?;
        Ok(Config {
            server: self.server,
            cors: self.cors,
            auth: self.auth,
            store: self.store,
            cache: self.cache,
            limits: self.limits,
            responses: self.responses,
            resume: self.resume,
            batch: self.batch,
            console: self.console,
            admin: self.admin,
            queue,
            worker: self.worker,
            upstream: self.upstream,
            log: self.log,
            telemetry: self.telemetry,
            plugin_host: self.plugin_host,
            plugins,
            models: self.models,
            source: origins.file.clone(),
        })
    }
}

/// A key as errors name it: `models[1].balance` (figment's path is
/// `models.1.balance`; validation names keys the same bracketed way).
fn key_name(path: &[String]) -> String {
    let mut key = String::new();
    for segment in path {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{segment}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    key
}
