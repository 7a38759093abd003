//! Configuration, in two phases: serde structs in the shape of `gateway.toml`
//! (unknown keys rejected, every default documented), layered by figment from
//! the file and `SLUICE_*` environment variables, then [`RawConfig::validate`]
//! into the typed [`Config`] the rest of the gateway uses. Sections that need
//! no checking beyond their types are deserialized straight into their typed form.
//!
//! Every key can be overridden by an environment variable named
//! `SLUICE_<SECTION>__<KEY>` (double underscore between levels), for example
//! `SLUICE_STORE__URL=postgres://...` or `SLUICE_QUEUE__CONSUMER__FETCH_WAIT_MAX_MS=1`.
//! A variable's value is a string, read as a number or a boolean only where
//! the key is one, so `SLUICE_UPSTREAM__API_KEY=12345` is the string `"12345"`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
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
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config key `{key}`{origin}: {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Phase 1: the shape of gateway.toml.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: ServerConfig,
    pub cors: CorsConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    pub admin: AdminConfig,
    pub queue: RawQueue,
    pub worker: WorkerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub plugin_host: PluginHostConfig,
    pub plugins: Vec<RawPlugin>,
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the edge listens on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// How long in-flight streams may run on after a shutdown signal.
    #[serde(rename = "shutdown_grace_ms", deserialize_with = "millis")]
    pub shutdown_grace: Duration,
    /// Connections the kernel queues before they are accepted (the listen backlog).
    pub listen_backlog: u32,
    /// Open connections at once (WebSockets included); over it, new ones get
    /// 503 and are closed. Unset: the open-file limit less 256.
    pub max_connections: Option<usize>,
    /// Deadline for a request's headers; also closes a keep-alive connection
    /// that sends no new request for this long.
    #[serde(rename = "header_timeout_ms", deserialize_with = "millis")]
    pub header_timeout: Duration,
    /// Deadline for a request's whole body, once its headers are in (408 after it).
    #[serde(rename = "body_timeout_ms", deserialize_with = "millis")]
    pub body_timeout: Duration,
    /// A WebSocket with no request running that sends nothing for this long is closed.
    #[serde(rename = "ws_idle_timeout_ms", deserialize_with = "millis")]
    pub ws_idle_timeout: Duration,
    /// Requests a WebSocket client may send ahead while one streams; one
    /// more gets an error frame and close 1008.
    pub ws_max_queued_requests: usize,
    /// WebSockets one API key may hold open at once; one more is refused (4429).
    pub ws_max_sockets_per_key: usize,
    /// Largest `n` (choices per prompt) a request may ask for (OpenAI's limit).
    pub max_n: u32,
    /// Most prompts in one request's `prompt` list.
    pub max_prompts: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            listen_backlog: 4096,
            max_connections: None,
            header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            ws_idle_timeout: Duration::from_secs(300),
            ws_max_queued_requests: 16,
            ws_max_sockets_per_key: 100,
            max_n: 128,
            max_prompts: 2048,
        }
    }
}

/// Which web pages may call the gateway (CORS, and the `Origin` of WebSocket
/// upgrades). The defaults are vLLM's: any origin, method and header, no
/// credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins such as `https://app.example.com`; `"*"` allows any.
    pub allowed_origins: Vec<String>,
    /// Methods a page may use; `"*"` allows any.
    pub allowed_methods: Vec<String>,
    /// Request headers a page may send; `"*"` allows any.
    pub allowed_headers: Vec<String>,
    /// Whether pages may send credentials (cookies, HTTP authentication).
    pub allow_credentials: bool,
}

impl Default for CorsConfig {
    fn default() -> Self {
        let any = || vec!["*".to_string()];
        Self {
            allowed_origins: any(),
            allowed_methods: any(),
            allowed_headers: any(),
            allow_credentials: false,
        }
    }
}

impl CorsConfig {
    /// Whether a request with this `Origin` may proceed (no `Origin`: not a browser).
    pub fn allows_origin(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            None => true,
            Some(origin) => self
                .allowed_origins
                .iter()
                .any(|allowed| allowed == "*" || allowed.as_bytes() == origin),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a key lookup is remembered. Bounds how late a revocation takes effect.
    #[serde(rename = "cache_ttl_ms", deserialize_with = "millis")]
    pub cache_ttl: Duration,
    /// Unknown keys remembered (for `cache_ttl_ms`), apart from valid ones.
    pub max_unknown_keys: u64,
    /// Store lookups per second for keys not seen valid in the last ten
    /// minutes; beyond it such requests get 503 without a lookup.
    pub unknown_lookups_per_second: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_millis(500),
            max_unknown_keys: 100_000,
            unknown_lookups_per_second: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST:PORT/DB`,
    /// credentials included: log [`redact_url`] of it.
    pub url: SecretString,
    pub max_connections: u32,
    /// Inference-log rows buffered before new rows are dropped (and counted).
    pub log_buffer: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://sluice.db".to_string().into(),
            max_connections: 8,
            log_buffer: 10_000,
        }
    }
}

impl StoreConfig {
    /// Which database the URL names (checked at startup: one of the two).
    pub fn kind(&self) -> StoreKind {
        if self.url.expose_secret().starts_with("sqlite:") {
            StoreKind::Sqlite
        } else {
            StoreKind::Postgres
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `memory://` (in-process), `redis://HOST:PORT[/DB]`, or `off`.
    pub url: SecretString,
    #[serde(rename = "ttl_secs", deserialize_with = "secs")]
    pub ttl: Duration,
    /// Bound on the in-process cache, in bytes of stored chunks.
    pub max_bytes: u64,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Redis commands slower than this count as failures (the request is served uncached).
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
    /// Whose requests share cache entries: each API key's own (`key`), a
    /// team's keys (`team`), or everyone's (`global`).
    pub scope: CacheScope,
    /// Whether to cache requests that sample (no `seed`, and a `temperature`
    /// above 0 or none): replaying one answer changes what they asked for.
    pub sampled: bool,
}

/// Whose requests share cache entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    Key,
    Team,
    Global,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            url: "memory://".to_string().into(),
            ttl: Duration::from_secs(3600),
            max_bytes: 256 * 1024 * 1024,
            key_prefix: "sluice:".into(),
            timeout: Duration::from_millis(250),
            scope: CacheScope::Key,
            sampled: false,
        }
    }
}

/// `[limits]`: where per-key limits are counted and what applies to keys
/// without limits of their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `memory://` (this process only) or `redis://HOST:PORT[/DB]` (exact across edges).
    pub url: SecretString,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// A Redis check slower than this counts as Redis being down.
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
    /// How long a running request holds its concurrency slot at most (frees
    /// the slots of requests whose edge died).
    #[serde(rename = "lease_secs", deserialize_with = "secs")]
    pub lease: Duration,
    /// While Redis is down: `local` (each edge checks its share) or `refuse` (503).
    pub on_unavailable: OnLimiterDown,
    /// How many edges share the limits: each one's share while Redis is down.
    pub edges: u64,
    /// Tokens reserved for the output of a request without `max_tokens`.
    pub reserve_tokens: u64,
    /// Limits of keys that set none of their own (field by field).
    pub default: crate::tenancy::limits::Limits,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            url: "memory://".to_string().into(),
            key_prefix: "sluice:".into(),
            timeout: Duration::from_millis(250),
            lease: Duration::from_secs(600),
            on_unavailable: OnLimiterDown::Local,
            edges: 1,
            reserve_tokens: 1024,
            default: crate::tenancy::limits::Limits::default(),
        }
    }
}

impl LimitsConfig {
    /// The Redis URL, when limits are counted in Redis.
    pub fn redis_url(&self) -> Option<&str> {
        let url = self.url.expose_secret();
        matches!(scheme(url), Some("redis" | "rediss")).then_some(url)
    }
}

/// What the limiter does while its Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimiterDown {
    Local,
    Refuse,
}

/// Which cache `cache.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    Disabled,
    Memory,
    Redis,
}

impl CacheConfig {
    /// The backend of `url` (checked at startup: one of these).
    pub fn backend(&self) -> CacheBackend {
        match self.url.expose_secret() {
            "off" | "none" | "" => CacheBackend::Disabled,
            url => match scheme(url) {
                Some("redis" | "rediss") => CacheBackend::Redis,
                Some("memory") => CacheBackend::Memory,
                _ => CacheBackend::Disabled,
            },
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
    /// Response bytes a worker holds per edge while the broker is behind;
    /// beyond it the worker stops reading from vLLM until the broker catches up.
    pub max_outbox_bytes: usize,
    /// librdkafka settings for every producer (`"linger.ms" = 1`).
    pub producer: BTreeMap<String, serde_json::Value>,
    /// librdkafka settings for every consumer (`"fetch.wait.max.ms" = 5`).
    pub consumer: BTreeMap<String, serde_json::Value>,
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
            max_outbox_bytes: 1 << 20,
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        }
    }
}

/// `[admin]`: the admin API's own listener, off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin API listens, e.g. `127.0.0.1:8081`; unset: no admin API.
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// The bearer token admin requests must present (set it with
    /// `SLUICE_ADMIN__TOKEN`); only its SHA-256 is kept after startup.
    #[serde(deserialize_with = "non_empty_secret")]
    pub token: Option<SecretString>,
}

fn optional_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    match non_empty(d)? {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Whether `sluice serve` runs a worker in the same process as the edge.
    pub in_process: bool,
    /// Upstream requests a worker runs at once.
    pub concurrency: usize,
    /// Metrics and health listener of a standalone `sluice worker`.
    pub listen: SocketAddr,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            in_process: true,
            concurrency: 256,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// vLLM base URLs (without `/v1`); requests are spread round-robin.
    #[serde(deserialize_with = "urls")]
    pub urls: Vec<Url>,
    /// Bearer token for vLLM's `--api-key`, if set.
    #[serde(deserialize_with = "non_empty_secret")]
    pub api_key: Option<SecretString>,
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub connect_timeout: Duration,
    /// Longest wait for the response headers and the first chunk.
    #[serde(rename = "first_chunk_timeout_ms", deserialize_with = "millis")]
    pub first_chunk_timeout: Duration,
    /// Longest silence between two chunks.
    #[serde(rename = "idle_timeout_ms", deserialize_with = "millis")]
    pub idle_timeout: Duration,
    /// The models clients may ask for, answered by `GET /v1/models`; a
    /// request for another gets 404 without reaching vLLM. Empty: whatever
    /// the upstream's `/v1/models` lists. (With `[[models]]`, those.)
    pub models: Vec<String>,
    /// How the single pool of `urls` balances (`[[models]]` set their own).
    pub balance: Balance,
    /// How often each endpoint's `/health` is checked.
    #[serde(rename = "health_interval_ms", deserialize_with = "millis")]
    pub health_interval: Duration,
    /// Endpoints a request may try before the client gets the error
    /// (only before its first byte).
    pub max_attempts: u32,
    /// How long an endpoint that failed is left out; doubled while it keeps
    /// failing, up to `max_eject_ms`.
    #[serde(rename = "eject_ms", deserialize_with = "millis")]
    pub eject: Duration,
    #[serde(rename = "max_eject_ms", deserialize_with = "millis")]
    pub max_eject: Duration,
}

/// How a pool picks an endpoint for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    /// The less busy of two endpoints picked at random (power of two choices).
    LeastOutstanding,
    /// The endpoint with the fewest requests running and waiting by vLLM's
    /// own `/metrics` (scraped every `health_interval_ms`).
    Load,
    /// Requests sharing a prompt prefix go to the same endpoint (consistent
    /// hashing with bounded loads), unless it is busier than 1.25 × the mean.
    Prefix,
}

/// `[[models]]`: one model and the endpoints that serve it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use.
    pub name: String,
    /// Other names that mean this model.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// vLLM base URLs serving it.
    #[serde(deserialize_with = "urls")]
    pub endpoints: Vec<Url>,
    /// The name vLLM knows it by (`--served-model-name`), if not `name`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    #[serde(default)]
    pub balance: Balance,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            urls: vec![Url::parse("http://127.0.0.1:8000").expect("a valid URL")],
            api_key: None,
            connect_timeout: Duration::from_secs(2),
            first_chunk_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            models: Vec::new(),
            balance: Balance::RoundRobin,
            health_interval: Duration::from_secs(2),
            max_attempts: 3,
            eject: Duration::from_secs(1),
            max_eject: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `sluice=debug,info`, ...
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

impl OtlpProtocol {
    /// The names of `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim() {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            "http/json" => Some(Self::HttpJson),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
            Self::HttpJson => "http/json",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP endpoint (`http://collector:4318`, or `:4317` for gRPC); unset
    /// disables trace export unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[serde(deserialize_with = "non_empty")]
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Fraction of new traces sampled, decided at the edge (a client's `traceparent` sampled flag is followed).
    pub sample_ratio: f64,
    /// `grpc`, `http/protobuf` or `http/json`.
    pub protocol: OtlpProtocol,
    /// Requests a second whose client `traceparent` may ask for tracing;
    /// beyond it they are not traced (0: no cap).
    pub max_client_sampled_per_second: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "sluice".into(),
            sample_ratio: 1.0,
            protocol: OtlpProtocol::HttpProtobuf,
            max_client_sampled_per_second: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginHostConfig {
    /// Watch plugin files and this config file and hot-reload on change.
    pub watch: bool,
    /// Granularity of plugin CPU deadlines.
    #[serde(rename = "epoch_tick_ms", deserialize_with = "millis")]
    pub epoch_tick: Duration,
    /// Plugin instances that can exist at once (the pooling allocator's size:
    /// each reserves `MAX_PLUGIN_MEMORY` plus a guard of address space, not memory).
    pub max_instances: u32,
    /// Initialised instances kept for reuse per plugin, once for the request
    /// hooks and once for token filters. More spare bursts of concurrent
    /// streams an instantiation each, and keep that many guests' memory
    /// resident and that many `max_instances` slots taken. Unset: 16, or
    /// half of `max_instances` if that is less (filled in by validation).
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    FailOpen,
    FailClosed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
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

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

/// An empty string is the same as leaving the key out.
fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.trim().is_empty()))
}

fn non_empty_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(non_empty(d)?.map(SecretString::from))
}

/// A list of http(s) URLs, or one string of comma-separated URLs (as an
/// environment variable gives it).
fn urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Url>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    };
    list.iter()
        .map(|u| {
            let url = Url::parse(u).map_err(|e| serde::de::Error::custom(format!("`{u}`: {e}")))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(serde::de::Error::custom(format!(
                    "`{u}` must be http:// or https://"
                )));
            }
            Ok(url)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Loading: file, then environment overrides.
// ---------------------------------------------------------------------------

/// One `SLUICE_<SECTION>__<KEY>` variable as a figment provider: its value
/// stays a string (figment's own `Env` would read `12345` as a number), and
/// errors name the variable.
struct EnvOverride {
    var: String,
    path: Vec<String>,
    value: String,
}

impl EnvOverride {
    fn parse(var: String, value: String) -> Option<Self> {
        // Every key lives in a section, so an override always has a `__`;
        // other SLUICE_* variables (SLUICE_CONFIG, tooling's own) are not config keys.
        let rest = var.strip_prefix(ENV_PREFIX).filter(|r| r.contains("__"))?;
        let mut path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        // librdkafka settings use dots (`fetch.wait.max.ms`), which variable names cannot.
        if let [queue, client, setting] = path.as_mut_slice()
            && queue == "queue"
            && (client == "producer" || client == "consumer")
        {
            *setting = setting.replace('_', ".");
        }
        Some(Self { var, path, value })
    }
}

impl Provider for EnvOverride {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").source(Source::Custom(self.var.clone()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut value = Value::from(self.value.clone());
        for segment in self.path.iter().rev() {
            value = Value::from(Dict::from([(segment.clone(), value)]));
        }
        let dict = value.into_dict().unwrap_or_default();
        Ok(Profile::Default.collect(dict))
    }
}

/// Where each key's value came from, for error messages.
pub struct Origins {
    figment: Figment,
    file: Option<PathBuf>,
}

impl Origins {
    fn describe(&self, key: &str) -> String {
        describe(self.figment.find_metadata(key))
    }
}

fn describe(metadata: Option<&Metadata>) -> String {
    match metadata.and_then(|m| m.source.as_ref()) {
        Some(Source::Custom(var)) => format!(" (from ${var})"),
        Some(Source::File(path)) => format!(" (in {})", path.display()),
        _ => String::new(),
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
                    key: err.path.join("."),
                    origin: describe(err.metadata.as_ref()),
                    message: err.kind.to_string(),
                }
            }
        })?;
        let file = path.map(Path::to_path_buf);
        Ok((raw, Origins { figment, file }))
    }
}

// ---------------------------------------------------------------------------
// Phase 2: the typed, validated configuration.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub cors: CorsConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    pub admin: AdminConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub plugin_host: PluginHostConfig,
    pub plugins: Vec<PluginConfig>,
    /// `[[models]]`: each model's pool of vLLM endpoints. Empty: one pool,
    /// `upstream.urls`, serves every model.
    pub models: Vec<ModelConfig>,
    /// The config file, watched for plugin changes.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub enum QueueBackend {
    Memory { capacity: usize },
    Kafka(Box<KafkaConfig>),
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
    pub max_outbox_bytes: usize,
    /// Largest response message the producer sends (its `message.max.bytes`).
    pub max_message_bytes: usize,
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
}

impl RawConfig {
    pub fn validate(self, origins: &Origins) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            origin: origins.describe(key),
            message,
        };
        let ms = Duration::from_millis;
        let positive = |key: &str, value: u64| match value {
            0 => Err(invalid(key, "must be greater than 0".into())),
            value => Ok(value),
        };
        let (server, auth, store, up, q) = (
            &self.server,
            &self.auth,
            &self.store,
            &self.upstream,
            &self.queue,
        );
        let (limits, cache, worker) = (&self.limits, &self.cache, &self.worker);
        let millis = |d: Duration| d.as_millis() as u64;
        for (key, value) in [
            ("server.max_body_bytes", server.max_body_bytes as u64),
            ("server.listen_backlog", server.listen_backlog.into()),
            (
                "server.max_connections",
                server.max_connections.map_or(1, |n| n as u64),
            ),
            (
                "server.ws_max_queued_requests",
                server.ws_max_queued_requests as u64,
            ),
            (
                "server.ws_max_sockets_per_key",
                server.ws_max_sockets_per_key as u64,
            ),
            ("server.max_n", server.max_n.into()),
            ("server.max_prompts", server.max_prompts as u64),
            ("server.header_timeout_ms", millis(server.header_timeout)),
            ("server.body_timeout_ms", millis(server.body_timeout)),
            ("server.ws_idle_timeout_ms", millis(server.ws_idle_timeout)),
            ("auth.max_unknown_keys", auth.max_unknown_keys),
            (
                "auth.unknown_lookups_per_second",
                auth.unknown_lookups_per_second.into(),
            ),
            ("store.max_connections", store.max_connections.into()),
            ("store.log_buffer", store.log_buffer as u64),
            ("upstream.max_attempts", up.max_attempts.into()),
            ("upstream.health_interval_ms", millis(up.health_interval)),
            ("upstream.connect_timeout_ms", millis(up.connect_timeout)),
            (
                "upstream.first_chunk_timeout_ms",
                millis(up.first_chunk_timeout),
            ),
            ("upstream.idle_timeout_ms", millis(up.idle_timeout)),
            ("limits.edges", limits.edges),
            ("limits.reserve_tokens", limits.reserve_tokens),
            ("limits.lease_secs", limits.lease.as_secs()),
            ("limits.timeout_ms", millis(limits.timeout)),
            ("cache.ttl_secs", cache.ttl.as_secs()),
            ("cache.max_bytes", cache.max_bytes),
            ("cache.timeout_ms", millis(cache.timeout)),
            ("queue.capacity", q.capacity as u64),
            ("queue.queue_timeout_ms", q.queue_timeout_ms),
            ("queue.worker_timeout_ms", q.worker_timeout_ms),
            ("queue.heartbeat_ms", q.heartbeat_ms),
            ("queue.max_attempts", q.max_attempts.into()),
            ("worker.concurrency", worker.concurrency as u64),
            (
                "plugin_host.epoch_tick_ms",
                millis(self.plugin_host.epoch_tick),
            ),
        ] {
            positive(key, value)?;
        }
        if self.auth.cache_ttl > Duration::from_secs(1) {
            return Err(invalid(
                "auth.cache_ttl_ms",
                "must be at most 1000 so that a revoked key stops working within a second".into(),
            ));
        }

        let store_url = self.store.url.expose_secret();
        if !(store_url.starts_with("sqlite:")
            || matches!(scheme(store_url), Some("postgres" | "postgresql")))
        {
            return Err(invalid(
                "store.url",
                format!(
                    "`{}` must start with sqlite:// or postgres://",
                    redact_url(store_url)
                ),
            ));
        }

        let mut names = std::collections::HashSet::new();
        for (i, model) in self.models.iter().enumerate() {
            let key = |field: &str| format!("models[{i}].{field}");
            if model.name.trim().is_empty() {
                return Err(invalid(&key("name"), "must not be empty".into()));
            }
            if model.endpoints.is_empty() {
                return Err(invalid(
                    &key("endpoints"),
                    format!("model `{}` has no endpoints", model.name),
                ));
            }
            for name in std::iter::once(&model.name).chain(&model.aliases) {
                if !names.insert(name.clone()) {
                    return Err(invalid(
                        &key("name"),
                        format!("`{name}` names two models (names and aliases must be unique)"),
                    ));
                }
            }
        }
        if !self.models.is_empty() && !self.upstream.models.is_empty() {
            return Err(invalid(
                "upstream.models",
                "leave it empty when [[models]] lists the models".into(),
            ));
        }

        let limits_url = self.limits.url.expose_secret();
        if !matches!(scheme(limits_url), Some("memory" | "redis" | "rediss")) {
            return Err(invalid(
                "limits.url",
                format!(
                    "`{}` must start with memory:// or redis://",
                    redact_url(limits_url)
                ),
            ));
        }
        if let Err(message) = self.limits.default.validate() {
            return Err(invalid("limits.default", message));
        }

        if self.admin.listen.is_some() {
            match &self.admin.token {
                None => {
                    return Err(invalid(
                        "admin.token",
                        "must be set when admin.listen is (use $SLUICE_ADMIN__TOKEN)".into(),
                    ));
                }
                Some(token) if token.expose_secret().len() < 16 => {
                    return Err(invalid(
                        "admin.token",
                        "must be at least 16 characters".into(),
                    ));
                }
                Some(_) => {}
            }
        }

        let cache_url = self.cache.url.expose_secret();
        if !matches!(cache_url, "off" | "none" | "")
            && !matches!(scheme(cache_url), Some("memory" | "redis" | "rediss"))
        {
            return Err(invalid(
                "cache.url",
                format!(
                    "`{}` must be memory://, redis://HOST:PORT or off",
                    redact_url(cache_url)
                ),
            ));
        }

        let q = self.queue;
        let queue_backend = match scheme(&q.url) {
            Some("memory") => QueueBackend::Memory {
                capacity: q.capacity,
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
                let producer = stringify_settings("queue.producer", &q.producer, &invalid)?;
                // librdkafka's own default; the broker's limit may be lower.
                let max_message_bytes = match producer.get("message.max.bytes") {
                    None => 1_000_000,
                    Some(value) => value.parse().map_err(|_| {
                        invalid(
                            "queue.producer.message.max.bytes",
                            format!("`{value}` is not a number of bytes"),
                        )
                    })?,
                };
                if q.max_outbox_bytes < 4096 {
                    return Err(invalid(
                        "queue.max_outbox_bytes",
                        "must be at least 4096".into(),
                    ));
                }
                QueueBackend::Kafka(Box::new(KafkaConfig {
                    brokers,
                    max_outbox_bytes: q.max_outbox_bytes,
                    max_message_bytes,
                    partitions: q.partitions,
                    replication_factor: q.replication_factor.max(1),
                    edge_id: if q.edge_id.is_empty() {
                        format!("edge-{}", uuid::Uuid::new_v4().simple())
                    } else {
                        q.edge_id.clone()
                    },
                    reply_partition,
                    producer,
                    consumer: stringify_settings("queue.consumer", &q.consumer, &invalid)?,
                    request_topic: q.request_topic,
                    response_topic: q.response_topic,
                    cancel_topic: q.cancel_topic,
                    worker_group: q.worker_group,
                }))
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
            queue_timeout: ms(q.queue_timeout_ms),
            worker_timeout: ms(q.worker_timeout_ms),
            heartbeat: ms(q.heartbeat_ms),
            max_attempts: q.max_attempts,
        };
        if queue.heartbeat >= queue.worker_timeout {
            return Err(invalid(
                "queue.heartbeat_ms",
                "must be shorter than queue.worker_timeout_ms, or live workers would be presumed lost".into(),
            ));
        }

        if matches!(queue.backend, QueueBackend::Memory { .. }) && !self.worker.in_process {
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

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a valid log filter", self.log.level),
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                "must be between 0 and 1".into(),
            ));
        }

        let max_instances = self.plugin_host.max_instances;
        if !(16..=65_536).contains(&max_instances) {
            return Err(invalid(
                "plugin_host.max_instances",
                format!("{max_instances} must be between 16 and 65536"),
            ));
        }
        if let Some(n) = self.plugin_host.max_idle_instances
            && n > max_instances / 2
        {
            return Err(invalid(
                "plugin_host.max_idle_instances",
                format!("{n} is more than half of plugin_host.max_instances ({max_instances})"),
            ));
        }

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
            let max_memory_bytes = match plugin.max_memory_bytes {
                0 => {
                    return Err(invalid(
                        &format!("{key}.max_memory_bytes"),
                        "must be greater than 0".into(),
                    ));
                }
                n if n > MAX_PLUGIN_MEMORY => {
                    return Err(invalid(
                        &format!("{key}.max_memory_bytes"),
                        format!(
                            "{n} is over the {MAX_PLUGIN_MEMORY}-byte limit of the plugin runtime"
                        ),
                    ));
                }
                n => n,
            };
            let order = plugin.order.unwrap_or(position as i64);
            plugins.push((
                order,
                position,
                PluginConfig {
                    name: plugin.name,
                    path: base_dir.join(plugin.path),
                    on_error: plugin.on_error,
                    max_memory_bytes,
                    timeout: ms(positive(&format!("{key}.timeout_ms"), plugin.timeout_ms)?),
                    keys: plugin.keys,
                    config_json: serde_json::Value::Object(plugin.config).to_string(),
                },
            ));
        }
        plugins.sort_by_key(|(order, position, _)| (*order, *position));

        let cors = &self.cors;
        for origin in &cors.allowed_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(invalid(
                    "cors.allowed_origins",
                    format!("`{origin}` is not an origin"),
                ));
            }
        }
        for method in &cors.allowed_methods {
            if method != "*" && method.parse::<axum::http::Method>().is_err() {
                return Err(invalid(
                    "cors.allowed_methods",
                    format!("`{method}` is not an HTTP method"),
                ));
            }
        }
        for header in &cors.allowed_headers {
            if header != "*" && header.parse::<axum::http::HeaderName>().is_err() {
                return Err(invalid(
                    "cors.allowed_headers",
                    format!("`{header}` is not a header name"),
                ));
            }
        }

        Ok(Config {
            server: self.server,
            cors: self.cors,
            auth: self.auth,
            store: self.store,
            cache: self.cache,
            limits: self.limits,
            admin: self.admin,
            queue,
            worker: self.worker,
            upstream: self.upstream,
            log: self.log,
            telemetry: self.telemetry,
            plugin_host: self.plugin_host,
            plugins: plugins.into_iter().map(|(_, _, p)| p).collect(),
            models: self.models,
            source: origins.file.clone(),
        })
    }
}

/// librdkafka settings are strings; TOML may give numbers and booleans.
fn stringify_settings(
    key: &str,
    settings: &BTreeMap<String, serde_json::Value>,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<BTreeMap<String, String>, ConfigError> {
    settings
        .iter()
        .map(|(name, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(invalid(
                        &format!("{key}.{name}"),
                        "librdkafka settings are strings, numbers or booleans".into(),
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
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_with_env(Some(&path), env)
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        for file in ["gateway.toml", "examples/production.toml"] {
            let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            load(&text, &[]).unwrap_or_else(|err| panic!("{file}: {err}"));
        }
        let production = load(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/production.toml"
            ))
            .unwrap(),
            &[],
        )
        .unwrap();
        assert!(production.limits.redis_url().is_some());
        assert_eq!(production.limits.default.requests_per_minute, Some(600));
    }

    #[test]
    fn nonsensical_limits_stop_startup_naming_the_key() {
        let err = load("[limits.default]\nrequests_per_minute = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("limits.default") && err.contains("requests_per_minute"),
            "{err}"
        );
        let err = load("[limits.default]\ntokens_per_minute = -5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokens_per_minute"), "{err}");
        let err = load("[limits]\nedges = 0\n", &[]).unwrap_err().to_string();
        assert!(err.contains("limits.edges"), "{err}");
        let err = load("[limits]\nurl = \"kafka://x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.url"), "{err}");
    }

    #[test]
    fn the_defaults_are_documented_values() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.upstream.urls[0].as_str(), "http://127.0.0.1:8000/");
        assert_eq!(config.telemetry.protocol, OtlpProtocol::HttpProtobuf);
        assert!(matches!(config.queue.backend, QueueBackend::Memory { .. }));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = load("[server]\nlisten = \"127.0.0.1:1\"\nlisnen = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisnen"), "{err}");
        assert!(err.contains("server"), "{err}");
        assert!(err.contains("gateway.toml"), "{err}");
    }

    #[test]
    fn malformed_toml_names_the_file() {
        let err = load("[server\n", &[]).unwrap_err().to_string();
        assert!(err.contains("gateway.toml"), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Config::load_with_env(Some(Path::new("/nonexistent/gateway.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/gateway.toml"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (toml, key) in [
            ("[store]\nurl = \"mysql://x\"\n", "store.url"),
            (
                "[server]\nmax_body_bytes = \"big\"\n",
                "server.max_body_bytes",
            ),
            ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
            ("[upstream]\nurls = [\"ftp://x\"]\n", "upstream.urls"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[telemetry]\nprotocol = \"thrift\"\n", "telemetry.protocol"),
            (
                "[plugin_host]\nmax_instances = 8\n",
                "plugin_host.max_instances",
            ),
            (
                "[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\non_error = \"maybe\"\n",
                "plugins",
            ),
            (
                "[queue]\nurl = \"kafka://k:9092\"\nmax_outbox_bytes = 100\n[worker]\nin_process = false\n",
                "queue.max_outbox_bytes",
            ),
            (
                "[queue]\nurl = \"kafka://k:9092\"\n[queue.producer]\n\"message.max.bytes\" = \"1MB\"\n[worker]\nin_process = false\n",
                "queue.producer.message.max.bytes",
            ),
        ] {
            let err = load(toml, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let config = load("[plugin_host]\nmax_instances = 64\n", &[]).unwrap();
        assert_eq!(config.plugin_host.max_instances, 64);
        assert_eq!(config.plugin_host.idle_instances(), 16);
        let config = load("[plugin_host]\nmax_instances = 16\n", &[]).unwrap();
        assert_eq!(config.plugin_host.idle_instances(), 8, "the default fits");
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
                ("SLUICE_PLUGIN_HOST__WATCH", "false"),
                ("SLUICE_TELEMETRY__SAMPLE_RATIO", "0.25"),
                ("SLUICE_UPSTREAM__URLS", "http://a:8000, http://b:8000"),
            ],
        )
        .unwrap();
        assert_eq!(config.store.url.expose_secret(), "sqlite://b.db");
        assert_eq!(config.worker.concurrency, 7);
        assert!(!config.plugin_host.watch);
        assert_eq!(config.telemetry.sample_ratio, 0.25);
        assert_eq!(config.upstream.urls.len(), 2);
        let err = load("", &[("SLUICE_CACHE__URL", "memcached://x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLUICE_CACHE__URL"), "{err}");
        let err = load("", &[("SLUICE_WORKER__CONCURRENCY", "many")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("worker.concurrency") && err.contains("SLUICE_WORKER__CONCURRENCY"),
            "{err}"
        );
    }

    #[test]
    fn environment_values_that_look_like_numbers_stay_strings_for_string_keys() {
        let config = load(
            "[queue]\nurl = \"kafka://127.0.0.1:9092\"\n[worker]\nin_process = false\n",
            &[
                ("SLUICE_UPSTREAM__API_KEY", "12345"),
                ("SLUICE_QUEUE__EDGE_ID", "007"),
                ("SLUICE_CACHE__KEY_PREFIX", "true"),
                ("SLUICE_TELEMETRY__SERVICE_NAME", "1.5"),
            ],
        )
        .unwrap();
        assert_eq!(
            config
                .upstream
                .api_key
                .as_ref()
                .map(ExposeSecret::expose_secret),
            Some("12345")
        );
        assert!(
            !format!("{config:?}").contains("12345"),
            "secrets stay out of Debug output"
        );
        let QueueBackend::Kafka(kafka) = config.queue.backend else {
            panic!("not kafka")
        };
        assert_eq!(kafka.edge_id, "007");
        assert_eq!(config.telemetry.service_name, "1.5");
        let config = load(
            "[cache]\nurl = \"redis://h:6379\"\n",
            &[("SLUICE_CACHE__KEY_PREFIX", "true")],
        )
        .unwrap();
        assert_eq!(config.cache.backend(), CacheBackend::Redis);
        assert_eq!(config.cache.key_prefix, "true");
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
            "[queue]\nurl = \"kafka://127.0.0.1:9092\"\n[queue.producer]\n\"linger.ms\" = 2\n[worker]\nin_process = false\n",
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
        assert_eq!(
            kafka.producer.get("linger.ms").map(String::as_str),
            Some("2")
        );
    }

    #[test]
    fn plugin_paths_are_relative_to_the_config_file() {
        let config = load(
            "[[plugins]]\nname = \"p\"\npath = \"plugins/p.wasm\"\n[plugins.config]\nwords = [\"a\"]\n",
            &[],
        )
        .unwrap();
        let plugin = &config.plugins[0];
        assert!(plugin.path.is_absolute(), "{:?}", plugin.path);
        assert!(plugin.path.ends_with("plugins/p.wasm"));
        assert_eq!(plugin.config_json, r#"{"words":["a"]}"#);
        assert_eq!(plugin.on_error, OnError::FailOpen);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
