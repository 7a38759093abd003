//! The fleet's sections: `[upstream]` (the single pool of vLLM URLs, and the
//! client's deadlines, health checks and ejection), `[[models]]` (a pool per
//! model) and `[worker]`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use crate::settings::{Invalid, millis, non_empty_secret, positive_millis, urls};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// vLLM base URLs (without `/v1`); requests are spread round-robin.
    #[serde(deserialize_with = "urls")]
    pub urls: Vec<Url>,
    /// Bearer token for vLLM's `--api-key`, if set.
    #[serde(deserialize_with = "non_empty_secret")]
    pub api_key: Option<SecretString>,
    #[serde(rename = "connect_timeout_ms", deserialize_with = "positive_millis")]
    pub connect_timeout: Duration,
    /// Longest wait for the response headers and the first chunk.
    #[serde(
        rename = "first_chunk_timeout_ms",
        deserialize_with = "positive_millis"
    )]
    pub first_chunk_timeout: Duration,
    /// Longest silence between two chunks.
    #[serde(rename = "idle_timeout_ms", deserialize_with = "positive_millis")]
    pub idle_timeout: Duration,
    /// The models clients may ask for, answered by `GET /v1/models`; a
    /// request for another gets 404 without reaching vLLM. Empty: whatever
    /// the upstream's `/v1/models` lists. (With `[[models]]`, those.)
    pub models: Vec<String>,
    /// How the single pool of `urls` balances (`[[models]]` set their own).
    pub balance: Balance,
    /// How often each endpoint's `/health` is checked.
    #[serde(rename = "health_interval_ms", deserialize_with = "positive_millis")]
    pub health_interval: Duration,
    /// Endpoints a request may try before the client gets the error
    /// (only before its first byte).
    pub max_attempts: NonZeroU32,
    /// How long an endpoint that failed is left out; doubled while it keeps
    /// failing, up to `max_eject_ms`.
    #[serde(rename = "eject_ms", deserialize_with = "millis")]
    pub eject: Duration,
    #[serde(rename = "max_eject_ms", deserialize_with = "millis")]
    pub max_eject: Duration,
    /// How many times a stream whose endpoint fails after its first chunk
    /// is continued on another endpoint (0: the client gets the error).
    pub max_continuations: u32,
    /// Sequences one endpoint runs at once (vLLM's `--max-num-seqs`); what
    /// the batch lane fills up to.
    pub capacity: NonZeroU32,
    /// The share of each pool's capacity batch lines leave free for
    /// interactive requests, from 0 (none) to below 1.
    pub batch_headroom: f64,
    /// The fleet runs vLLM with `--scheduling-policy priority`: each
    /// request carries vLLM's `priority` for its class (0 high, 1 normal,
    /// 2 low, 3 batch lines; lower runs first).
    pub priority_scheduling: bool,
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

impl Balance {
    /// Its name in `gateway.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastOutstanding => "least_outstanding",
            Balance::Load => "load",
            Balance::Prefix => "prefix",
        }
    }
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
    /// Whether a stream whose endpoint fails mid-answer is continued on
    /// another (up to `upstream.max_continuations`).
    #[serde(default = "yes")]
    pub continue_streams: bool,
    /// `upstream.capacity` for this model's endpoints.
    #[serde(default)]
    pub capacity: Option<NonZeroU32>,
}

fn yes() -> bool {
    true
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
            max_attempts: const { NonZeroU32::new(3).expect("not zero") },
            eject: Duration::from_secs(1),
            max_eject: Duration::from_secs(30),
            max_continuations: 1,
            capacity: const { NonZeroU32::new(256).expect("not zero") },
            batch_headroom: 0.05,
            priority_scheduling: false,
        }
    }
}

impl UpstreamConfig {
    /// The upstream with its `[[models]]`: URLs to call, unique model names.
    pub fn validate(&self, models: &[ModelConfig]) -> Result<(), Invalid> {
        if !(0.0..1.0).contains(&self.batch_headroom) {
            return Err(Invalid::new(
                "upstream.batch_headroom",
                format!(
                    "{} is not a share of capacity from 0 to below 1",
                    self.batch_headroom
                ),
            ));
        }
        if self.urls.is_empty() {
            return Err(Invalid::new(
                "upstream.urls",
                "at least one vLLM URL is required",
            ));
        }
        let mut names = HashSet::new();
        for (i, model) in models.iter().enumerate() {
            let key = |field: &str| format!("models[{i}].{field}");
            if model.name.trim().is_empty() {
                return Err(Invalid::new(key("name"), "must not be empty"));
            }
            if model.endpoints.is_empty() {
                return Err(Invalid::new(
                    key("endpoints"),
                    format!("model `{}` has no endpoints", model.name),
                ));
            }
            for name in std::iter::once(&model.name).chain(&model.aliases) {
                if !names.insert(name.clone()) {
                    return Err(Invalid::new(
                        key("name"),
                        format!("`{name}` names two models (names and aliases must be unique)"),
                    ));
                }
            }
        }
        if !models.is_empty() && !self.models.is_empty() {
            return Err(Invalid::new(
                "upstream.models",
                "leave it empty when [[models]] lists the models",
            ));
        }
        Ok(())
    }
}

/// `[worker]`: where requests are run, and how many at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Whether `sluice serve` runs a worker in the same process as the edge.
    pub in_process: bool,
    /// Requests one worker holds at once: running, or waiting for room on
    /// their pool (each pool runs up to its endpoints' `capacity`).
    pub concurrency: NonZeroUsize,
    /// Metrics and health listener of a standalone `sluice worker`.
    pub listen: SocketAddr,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            in_process: true,
            concurrency: const { NonZeroUsize::new(4096).expect("not zero") },
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}
