//! Configuration, in two phases: raw serde structs that mirror `gateway.toml`
//! (unknown keys rejected, every default documented), then [`RawConfig::validate`]
//! into the typed [`Config`] the rest of the gateway uses.
//!
//! Every key can be overridden by an environment variable named
//! `SLUICE_<SECTION>__<KEY>` (double underscore between levels), for example
//! `SLUICE_STORE__URL=postgres://...` or `SLUICE_QUEUE__CONSUMER__FETCH_WAIT_MAX_MS=1`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// Largest `max_memory_bytes` a plugin may be given.
pub const MAX_PLUGIN_MEMORY: u64 = 64 * 1024 * 1024;

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "SLUICE_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`{origin}: {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Phase 1: raw structs, exactly the shape of gateway.toml.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub auth: RawAuth,
    pub store: RawStore,
    pub cache: RawCache,
    pub queue: RawQueue,
    pub worker: RawWorker,
    pub upstream: RawUpstream,
    pub log: RawLog,
    pub telemetry: RawTelemetry,
    pub plugin_host: RawPluginHost,
    pub plugins: Vec<RawPlugin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Address the edge listens on.
    pub listen: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// How long in-flight streams may run on after a shutdown signal.
    pub shutdown_grace_ms: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            shutdown_grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    /// How long a key lookup is remembered. Bounds how late a revocation takes effect.
    pub cache_ttl_ms: u64,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self { cache_ttl_ms: 500 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST:PORT/DB`.
    pub url: String,
    pub max_connections: u32,
    /// Inference-log rows buffered before new rows are dropped (and counted).
    pub log_buffer: usize,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: "sqlite://sluice.db".into(),
            max_connections: 8,
            log_buffer: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    /// `memory://` (in-process), `redis://HOST:PORT[/DB]`, or `off`.
    pub url: String,
    pub ttl_secs: u64,
    /// Bound on the in-process cache, in bytes of stored chunks.
    pub max_bytes: u64,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Redis commands slower than this count as failures (the request is served uncached).
    pub timeout_ms: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            url: "memory://".into(),
            ttl_secs: 3600,
            max_bytes: 256 * 1024 * 1024,
            key_prefix: "sluice:".into(),
            timeout_ms: 250,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawQueue {
    /// `memory://` (in-process channels) or `kafka://HOST:PORT[,HOST:PORT...]`.
    pub url: String,
    /// In-process queue: requests waiting for a worker before submitters wait.
    pub capacity: usize,
    /// Longest a request may wait for a worker to pick it up.
    pub queue_timeout_ms: u64,
    /// Longest a picked-up request may go without any sign of life from its worker.
    pub worker_timeout_ms: u64,
    /// How often a worker signals life on a request that produces no chunks.
    pub heartbeat_ms: u64,
    /// Attempts for a request whose worker was lost before it sent anything.
    pub max_attempts: u32,
    pub request_topic: String,
    pub response_topic: String,
    pub cancel_topic: String,
    /// Partitions of topics created at startup.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Identity of this edge on the response topic; empty means a random id per process.
    pub edge_id: String,
    /// Response-topic partition this edge reads; -1 derives it from the edge id.
    pub reply_partition: i32,
    /// Consumer group of the workers.
    pub worker_group: String,
    /// librdkafka settings for every producer (`"linger.ms" = 1`).
    pub producer: BTreeMap<String, toml::Value>,
    /// librdkafka settings for every consumer (`"fetch.wait.max.ms" = 5`).
    pub consumer: BTreeMap<String, toml::Value>,
}

impl Default for RawQueue {
    fn default() -> Self {
        Self {
            url: "memory://".into(),
            capacity: 1024,
            queue_timeout_ms: 30_000,
            worker_timeout_ms: 10_000,
            heartbeat_ms: 1_000,
            max_attempts: 3,
            request_topic: "sluice.requests".into(),
            response_topic: "sluice.responses".into(),
            cancel_topic: "sluice.cancels".into(),
            partitions: 16,
            replication_factor: 1,
            edge_id: String::new(),
            reply_partition: -1,
            worker_group: "sluice-workers".into(),
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWorker {
    /// Whether `sluice serve` runs a worker in the same process as the edge.
    pub in_process: bool,
    /// Upstream requests a worker runs at once.
    pub concurrency: usize,
    /// Metrics and health listener of a standalone `sluice worker`.
    pub listen: String,
}

impl Default for RawWorker {
    fn default() -> Self {
        Self {
            in_process: true,
            concurrency: 256,
            listen: "127.0.0.1:9464".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    /// vLLM base URLs (without `/v1`); requests are spread round-robin.
    #[serde(deserialize_with = "string_or_list")]
    pub urls: Vec<String>,
    /// Bearer token for vLLM's `--api-key`, if set.
    pub api_key: String,
    pub connect_timeout_ms: u64,
    /// Longest wait for the response headers and the first chunk.
    pub first_chunk_timeout_ms: u64,
    /// Longest silence between two chunks.
    pub idle_timeout_ms: u64,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            urls: vec!["http://127.0.0.1:8000".into()],
            api_key: String::new(),
            connect_timeout_ms: 2_000,
            first_chunk_timeout_ms: 60_000,
            idle_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// A `tracing` filter: `info`, `sluice=debug,info`, ...
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// OTLP/HTTP endpoint (`http://collector:4318`); empty disables trace export
    /// unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: String,
    pub service_name: String,
    /// Fraction of new traces sampled, decided at the edge (a client's `traceparent` sampled flag is followed).
    pub sample_ratio: f64,
    /// OTLP/HTTP encoding: `http/protobuf` or `http/json`.
    pub protocol: String,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "sluice".into(),
            sample_ratio: 1.0,
            protocol: "http/protobuf".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPluginHost {
    /// Watch plugin files and this config file and hot-reload on change.
    pub watch: bool,
    /// Granularity of plugin CPU deadlines.
    pub epoch_tick_ms: u64,
    /// Plugin instances that can exist at once (the pooling allocator's size:
    /// each reserves `MAX_PLUGIN_MEMORY` plus a guard of address space, not memory).
    pub max_instances: u32,
    /// Initialised instances kept for reuse per plugin, once for the request
    /// hooks and once for token filters. More spare bursts of concurrent
    /// streams an instantiation each, and keep that many guests' memory
    /// resident and that many `max_instances` slots taken. Default: 16, or
    /// half of `max_instances` if that is less.
    pub max_idle_instances: Option<u32>,
}

impl Default for RawPluginHost {
    fn default() -> Self {
        Self {
            watch: true,
            epoch_tick_ms: 1,
            max_instances: 4096,
            max_idle_instances: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    pub name: String,
    /// Path to the component (`.wasm`), relative to the config file.
    pub path: String,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Position in the chain; lower runs first. Defaults to the entry's position.
    #[serde(default)]
    pub order: Option<i64>,
    /// `fail-open` (skip the plugin) or `fail-closed` (fail the request).
    #[serde(default = "default_on_error")]
    pub on_error: String,
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
    pub config: toml::Table,
}

fn default_true() -> bool {
    true
}
fn default_on_error() -> String {
    "fail-open".into()
}
fn default_plugin_memory() -> u64 {
    16 * 1024 * 1024
}
fn default_plugin_timeout() -> u64 {
    20
}

fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

// ---------------------------------------------------------------------------
// Loading: file, then environment overrides.
// ---------------------------------------------------------------------------

/// Where a raw config came from, so errors can point at the right source.
#[derive(Debug, Default, Clone)]
pub struct Origins {
    /// Config keys (dotted) set from environment variables, with the variable name.
    pub env: BTreeMap<String, String>,
    pub file: Option<PathBuf>,
}

impl Origins {
    fn describe(&self, key: &str) -> String {
        if let Some(var) = self.env.get(key) {
            return format!(" (from ${var})");
        }
        match &self.file {
            Some(file) => format!(" (in {})", file.display()),
            None => String::new(),
        }
    }
}

impl RawConfig {
    /// Reads `path` (if given and present) and applies `SLUICE_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<(Self, Origins), ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &vars)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<(Self, Origins), ConfigError> {
        let mut origins = Origins::default();
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                origins.file = Some(path.to_path_buf());
                toml::from_str::<toml::Table>(&text).map_err(|err| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: err.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            // Every key lives in a section, so an override always has a `__`;
            // other SLUICE_* variables (SLUICE_CONFIG, tooling's own) are not config keys.
            let Some(rest) = name
                .strip_prefix(ENV_PREFIX)
                .filter(|rest| rest.contains("__"))
            else {
                continue;
            };
            let segments: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            let segments = normalize_env_segments(segments);
            origins.env.insert(segments.join("."), name.clone());
            set_path(&mut table, &segments, guess_value(value));
        }
        let raw = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| {
            let key = err.path().to_string();
            let origin = origins.describe(&key);
            // toml appends "in `section`" on a second line; the key already says where.
            let message = err.into_inner().to_string();
            ConfigError::Invalid {
                key,
                origin,
                message: message.lines().next().unwrap_or_default().to_string(),
            }
        })?;
        Ok((raw, origins))
    }
}

/// librdkafka settings use dots (`fetch.wait.max.ms`); environment variables cannot,
/// so `SLUICE_QUEUE__CONSUMER__FETCH_WAIT_MAX_MS` maps to `fetch.wait.max.ms`.
fn normalize_env_segments(mut segments: Vec<String>) -> Vec<String> {
    if segments.len() == 3
        && segments[0] == "queue"
        && (segments[1] == "producer" || segments[1] == "consumer")
    {
        segments[2] = segments[2].replace('_', ".");
    }
    segments
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                set_path(inner, rest, value);
            }
        }
    }
}

/// Environment values are strings; read `true`/`false`, integers, floats and
/// TOML arrays as such, everything else as a string.
fn guess_value(raw: &str) -> toml::Value {
    let trimmed = raw.trim();
    if trimmed == "true" || trimmed == "false" {
        return toml::Value::Boolean(trimmed == "true");
    }
    if let Ok(n) = trimmed.parse::<i64>() {
        return toml::Value::Integer(n);
    }
    if trimmed.contains('.')
        && !trimmed.contains(':')
        && let Ok(f) = trimmed.parse::<f64>()
    {
        return toml::Value::Float(f);
    }
    if trimmed.starts_with('[')
        && let Ok(toml::Value::Table(t)) = format!("v = {trimmed}").parse::<toml::Value>()
        && let Some(v) = t.get("v")
    {
        return v.clone();
    }
    toml::Value::String(raw.to_string())
}

// ---------------------------------------------------------------------------
// Phase 2: the typed, validated configuration.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub plugin_host: PluginHostConfig,
    pub plugins: Vec<PluginConfig>,
    /// The config file, watched for plugin changes.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Full URL, credentials included: never log it; use [`redact_url`].
    pub url: String,
    pub max_connections: u32,
    pub log_buffer: usize,
}

#[derive(Debug, Clone)]
pub enum CacheBackend {
    Disabled,
    Memory {
        max_bytes: u64,
    },
    Redis {
        url: String,
        key_prefix: String,
        timeout: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub backend: CacheBackend,
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub enum QueueBackend {
    Memory { capacity: usize },
    Kafka(KafkaConfig),
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub request_topic: String,
    pub response_topic: String,
    pub cancel_topic: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub edge_id: String,
    pub reply_partition: Option<i32>,
    pub worker_group: String,
    pub producer: BTreeMap<String, String>,
    pub consumer: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub backend: QueueBackend,
    pub queue_timeout: Duration,
    pub worker_timeout: Duration,
    pub heartbeat: Duration,
    pub max_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub in_process: bool,
    pub concurrency: usize,
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub urls: Vec<Url>,
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    pub first_chunk_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    pub sample_ratio: f64,
    /// `true` for `http/json`, `false` for `http/protobuf`.
    pub json: bool,
}

#[derive(Debug, Clone)]
pub struct PluginHostConfig {
    pub watch: bool,
    pub epoch_tick: Duration,
    pub max_instances: u32,
    pub max_idle_instances: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    FailOpen,
    FailClosed,
}

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

impl Default for Config {
    fn default() -> Self {
        RawConfig::default()
            .validate(&Origins::default())
            .expect("the built-in defaults are valid")
    }
}

impl Config {
    /// Loads, overrides from the environment and validates in one step.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (raw, origins) = RawConfig::load(path)?;
        raw.validate(&origins)
    }
}

impl RawConfig {
    pub fn validate(self, origins: &Origins) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            origin: origins.describe(key),
            message,
        };
        let ms = Duration::from_millis;
        let positive = |key: &str, value: u64| {
            if value == 0 {
                Err(invalid(key, "must be greater than 0".into()))
            } else {
                Ok(value)
            }
        };

        let server = ServerConfig {
            listen: self.server.listen.parse().map_err(|e| {
                invalid(
                    "server.listen",
                    format!(
                        "`{}` is not an address like 127.0.0.1:8080 ({e})",
                        self.server.listen
                    ),
                )
            })?,
            max_body_bytes: positive("server.max_body_bytes", self.server.max_body_bytes as u64)?
                as usize,
            shutdown_grace: ms(self.server.shutdown_grace_ms),
        };

        let auth = AuthConfig {
            cache_ttl: ms(self.auth.cache_ttl_ms),
        };
        if self.auth.cache_ttl_ms > 1000 {
            return Err(invalid(
                "auth.cache_ttl_ms",
                "must be at most 1000 so that a revoked key stops working within a second".into(),
            ));
        }

        let store_kind = match scheme(&self.store.url) {
            _ if self.store.url.starts_with("sqlite:") => StoreKind::Sqlite,
            Some("postgres") | Some("postgresql") => StoreKind::Postgres,
            _ => {
                return Err(invalid(
                    "store.url",
                    format!(
                        "`{}` must start with sqlite:// or postgres://",
                        redact_url(&self.store.url)
                    ),
                ));
            }
        };
        let store = StoreConfig {
            kind: store_kind,
            url: self.store.url.clone(),
            max_connections: positive(
                "store.max_connections",
                u64::from(self.store.max_connections),
            )? as u32,
            log_buffer: positive("store.log_buffer", self.store.log_buffer as u64)? as usize,
        };

        let cache_backend = match self.cache.url.as_str() {
            "off" | "none" | "" => CacheBackend::Disabled,
            url => match scheme(url) {
                Some("memory") => CacheBackend::Memory {
                    max_bytes: positive("cache.max_bytes", self.cache.max_bytes)?,
                },
                Some("redis") | Some("rediss") => CacheBackend::Redis {
                    url: url.to_string(),
                    key_prefix: self.cache.key_prefix.clone(),
                    timeout: ms(positive("cache.timeout_ms", self.cache.timeout_ms)?),
                },
                _ => {
                    return Err(invalid(
                        "cache.url",
                        format!(
                            "`{}` must be memory://, redis://HOST:PORT or off",
                            redact_url(url)
                        ),
                    ));
                }
            },
        };
        let cache = CacheConfig {
            backend: cache_backend,
            ttl: Duration::from_secs(positive("cache.ttl_secs", self.cache.ttl_secs)?),
        };

        let q = self.queue;
        let queue_backend = match scheme(&q.url) {
            Some("memory") => QueueBackend::Memory {
                capacity: positive("queue.capacity", q.capacity as u64)? as usize,
            },
            Some("kafka") => {
                let brokers = q
                    .url
                    .trim_start_matches("kafka://")
                    .trim_end_matches('/')
                    .to_string();
                if brokers.is_empty() {
                    return Err(invalid(
                        "queue.url",
                        "kafka:// needs at least one HOST:PORT".into(),
                    ));
                }
                for (key, topic) in [
                    ("queue.request_topic", &q.request_topic),
                    ("queue.response_topic", &q.response_topic),
                    ("queue.cancel_topic", &q.cancel_topic),
                ] {
                    if topic.is_empty()
                        || !topic
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                    {
                        return Err(invalid(
                            key,
                            format!("`{topic}` is not a valid Kafka topic name"),
                        ));
                    }
                }
                if q.partitions < 1 {
                    return Err(invalid("queue.partitions", "must be at least 1".into()));
                }
                let reply_partition = match q.reply_partition {
                    -1 => None,
                    p if p >= 0 && p < q.partitions => Some(p),
                    p => {
                        return Err(invalid(
                            "queue.reply_partition",
                            format!(
                                "{p} is outside the response topic's 0..{} partitions",
                                q.partitions
                            ),
                        ));
                    }
                };
                QueueBackend::Kafka(KafkaConfig {
                    brokers,
                    request_topic: q.request_topic.clone(),
                    response_topic: q.response_topic.clone(),
                    cancel_topic: q.cancel_topic.clone(),
                    partitions: q.partitions,
                    replication_factor: q.replication_factor.max(1),
                    edge_id: if q.edge_id.is_empty() {
                        format!("edge-{}", uuid::Uuid::new_v4().simple())
                    } else {
                        q.edge_id.clone()
                    },
                    reply_partition,
                    worker_group: q.worker_group.clone(),
                    producer: stringify_settings("queue.producer", &q.producer, &invalid)?,
                    consumer: stringify_settings("queue.consumer", &q.consumer, &invalid)?,
                })
            }
            _ => {
                return Err(invalid(
                    "queue.url",
                    format!(
                        "`{}` must be memory:// or kafka://HOST:PORT[,HOST:PORT]",
                        redact_url(&q.url)
                    ),
                ));
            }
        };
        let queue = QueueConfig {
            backend: queue_backend,
            queue_timeout: ms(positive("queue.queue_timeout_ms", q.queue_timeout_ms)?),
            worker_timeout: ms(positive("queue.worker_timeout_ms", q.worker_timeout_ms)?),
            heartbeat: ms(positive("queue.heartbeat_ms", q.heartbeat_ms)?),
            max_attempts: positive("queue.max_attempts", u64::from(q.max_attempts))? as u32,
        };
        if queue.heartbeat >= queue.worker_timeout {
            return Err(invalid(
                "queue.heartbeat_ms",
                "must be shorter than queue.worker_timeout_ms, or live workers would be presumed lost".into(),
            ));
        }

        let worker = WorkerConfig {
            in_process: self.worker.in_process,
            concurrency: positive("worker.concurrency", self.worker.concurrency as u64)? as usize,
            listen: self.worker.listen.parse().map_err(|e| {
                invalid(
                    "worker.listen",
                    format!("`{}` is not an address ({e})", self.worker.listen),
                )
            })?,
        };
        if matches!(queue.backend, QueueBackend::Memory { .. }) && !worker.in_process {
            return Err(invalid(
                "worker.in_process",
                "the memory:// queue is served only by the in-process worker; use kafka:// for separate workers".into(),
            ));
        }

        if self.upstream.urls.is_empty() {
            return Err(invalid(
                "upstream.urls",
                "at least one vLLM URL is required".into(),
            ));
        }
        let urls = self
            .upstream
            .urls
            .iter()
            .map(|u| {
                let url =
                    Url::parse(u).map_err(|e| invalid("upstream.urls", format!("`{u}`: {e}")))?;
                if url.scheme() != "http" && url.scheme() != "https" {
                    return Err(invalid(
                        "upstream.urls",
                        format!("`{u}` must be http:// or https://"),
                    ));
                }
                Ok(url)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let upstream = UpstreamConfig {
            urls,
            api_key: Some(self.upstream.api_key).filter(|k| !k.is_empty()),
            connect_timeout: ms(positive(
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            )?),
            first_chunk_timeout: ms(positive(
                "upstream.first_chunk_timeout_ms",
                self.upstream.first_chunk_timeout_ms,
            )?),
            idle_timeout: ms(positive(
                "upstream.idle_timeout_ms",
                self.upstream.idle_timeout_ms,
            )?),
        };

        let log = LogConfig {
            level: self.log.level.clone(),
            format: match self.log.format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(invalid(
                        "log.format",
                        format!("`{other}` must be text or json"),
                    ));
                }
            },
        };
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a valid log filter", log.level),
            ));
        }

        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                "must be between 0 and 1".into(),
            ));
        }
        let telemetry = TelemetryConfig {
            otlp_endpoint: Some(self.telemetry.otlp_endpoint).filter(|e| !e.is_empty()),
            service_name: self.telemetry.service_name,
            sample_ratio: self.telemetry.sample_ratio,
            json: match self.telemetry.protocol.as_str() {
                "http/protobuf" => false,
                "http/json" => true,
                other => {
                    return Err(invalid(
                        "telemetry.protocol",
                        format!("`{other}` must be http/protobuf or http/json"),
                    ));
                }
            },
        };

        let max_instances = match self.plugin_host.max_instances {
            n @ 16..=65_536 => n,
            n => {
                return Err(invalid(
                    "plugin_host.max_instances",
                    format!("{n} must be between 16 and 65536"),
                ));
            }
        };
        let plugin_host = PluginHostConfig {
            watch: self.plugin_host.watch,
            epoch_tick: ms(positive(
                "plugin_host.epoch_tick_ms",
                self.plugin_host.epoch_tick_ms,
            )?),
            max_instances,
            max_idle_instances: match self.plugin_host.max_idle_instances {
                None => 16.min(max_instances / 2) as usize,
                Some(n) if n <= max_instances / 2 => n as usize,
                Some(n) => {
                    return Err(invalid(
                        "plugin_host.max_idle_instances",
                        format!(
                            "{n} is more than half of plugin_host.max_instances ({max_instances})"
                        ),
                    ));
                }
            },
        };

        let base_dir = origins
            .file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut plugins = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (position, plugin) in self.plugins.into_iter().enumerate() {
            let key = format!("plugins[{position}]");
            if plugin.name.is_empty() {
                return Err(invalid(&format!("{key}.name"), "must not be empty".into()));
            }
            if !seen.insert(plugin.name.clone()) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("`{}` is used by two plugins", plugin.name),
                ));
            }
            if !plugin.enabled {
                continue;
            }
            let on_error = match plugin.on_error.as_str() {
                "fail-open" => OnError::FailOpen,
                "fail-closed" => OnError::FailClosed,
                other => {
                    return Err(invalid(
                        &format!("{key}.on_error"),
                        format!("`{other}` must be fail-open or fail-closed"),
                    ));
                }
            };
            let config_json = serde_json::to_string(&plugin.config)
                .map_err(|e| invalid(&format!("{key}.config"), e.to_string()))?;
            let path = PathBuf::from(&plugin.path);
            let order = plugin.order.unwrap_or(position as i64);
            plugins.push((
                order,
                position,
                PluginConfig {
                    name: plugin.name,
                    path: if path.is_absolute() { path } else { base_dir.join(path) },
                    on_error,
                    max_memory_bytes: match plugin.max_memory_bytes {
                        0 => return Err(invalid(&format!("{key}.max_memory_bytes"), "must be greater than 0".into())),
                        n if n > MAX_PLUGIN_MEMORY => {
                            return Err(invalid(
                                &format!("{key}.max_memory_bytes"),
                                format!("{n} is over the {MAX_PLUGIN_MEMORY}-byte limit of the plugin runtime"),
                            ));
                        }
                        n => n,
                    },
                    timeout: ms(positive(&format!("{key}.timeout_ms"), plugin.timeout_ms)?),
                    keys: plugin.keys,
                    config_json,
                },
            ));
        }
        plugins.sort_by_key(|(order, position, _)| (*order, *position));

        Ok(Config {
            server,
            auth,
            store,
            cache,
            queue,
            worker,
            upstream,
            log,
            telemetry,
            plugin_host,
            plugins: plugins.into_iter().map(|(_, _, p)| p).collect(),
            source: origins.file.clone(),
        })
    }
}

fn stringify_settings(
    key: &str,
    settings: &BTreeMap<String, toml::Value>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<BTreeMap<String, String>, ConfigError> {
    settings
        .iter()
        .map(|(name, value)| {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(invalid(
                        &format!("{key}.{name}"),
                        format!("librdkafka settings are scalars, not {}", other.type_str()),
                    ));
                }
            };
            Ok((name.clone(), text))
        })
        .collect()
}

fn scheme(url: &str) -> Option<&str> {
    url.split_once("://").map(|(scheme, _)| scheme)
}

/// A URL with any password replaced by `***`, safe for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml_text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (raw, origins) = RawConfig::load_with_env(Some(&path), &env)?;
        raw.validate(&origins)
    }

    #[test]
    fn the_shipped_gateway_toml_is_valid() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml")).unwrap();
        load(&text, &[]).unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = load("[server]\nlisten = \"127.0.0.1:1\"\nlisnen = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisnen"), "{err}");
        assert!(err.contains("server"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = load("[store]\nurl = \"mysql://x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.url"), "{err}");
        let err = load("[server]\nmax_body_bytes = \"big\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.max_body_bytes"), "{err}");
        let err = load("[plugin_host]\nmax_instances = 8\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("plugin_host.max_instances"), "{err}");
        let config = load("[plugin_host]\nmax_instances = 64\n", &[]).unwrap();
        assert_eq!(config.plugin_host.max_instances, 64);
        assert_eq!(config.plugin_host.max_idle_instances, 16);
        let config = load("[plugin_host]\nmax_instances = 16\n", &[]).unwrap();
        assert_eq!(config.plugin_host.max_idle_instances, 8, "the default fits");
        let err = load(
            "[plugin_host]\nmax_instances = 64\nmax_idle_instances = 33\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("plugin_host.max_idle_instances"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file_and_is_named_in_errors() {
        let config = load(
            "[store]\nurl = \"sqlite://a.db\"\n",
            &[
                ("SLUICE_STORE__URL", "sqlite://b.db"),
                ("SLUICE_WORKER__CONCURRENCY", "7"),
            ],
        )
        .unwrap();
        assert_eq!(config.store.url, "sqlite://b.db");
        assert_eq!(config.worker.concurrency, 7);
        let err = load("", &[("SLUICE_CACHE__URL", "memcached://x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLUICE_CACHE__URL"), "{err}");
    }

    #[test]
    fn other_sluice_variables_are_not_config_keys() {
        let config = load(
            "",
            &[
                ("SLUICE_CONFIG", "x.toml"),
                ("SLUICE_PYTHON", "/usr/bin/python3"),
            ],
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 8080);
        let err = load("", &[("SLUICE_SERVER__LISEN", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLUICE_SERVER__LISEN"), "{err}");
    }

    #[test]
    fn kafka_settings_from_env_use_dotted_names() {
        let config = load(
            "[queue]\nurl = \"kafka://127.0.0.1:9092\"\n[worker]\nin_process = false\n",
            &[("SLUICE_QUEUE__CONSUMER__FETCH_WAIT_MAX_MS", "1")],
        )
        .unwrap();
        let QueueBackend::Kafka(kafka) = config.queue.backend else {
            panic!("not kafka")
        };
        assert_eq!(
            kafka.consumer.get("fetch.wait.max.ms").map(String::as_str),
            Some("1")
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
