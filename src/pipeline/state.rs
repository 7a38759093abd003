//! The stages every request goes through, built once by the gateway's
//! wiring: the pipeline holds them, and the edge hands them each request.

use std::sync::Arc;

use super::metrics::RequestMetrics;
use super::models::ModelCatalog;
use super::policy::Policy;
use crate::backends::affinity::AffinityMap;
use crate::backends::cache::{Cache, CacheMetrics, CacheScope};
use crate::backends::queue::{Queue, QueueMetrics};
use crate::backends::store::Store;
use crate::backends::store::inference_log::InferenceLogger;
use crate::fleet::Fleet;
use crate::observe::metrics::MetricsRegistry;
use crate::tenancy::TenancyMetrics;
use crate::tenancy::auth::Authenticator;
use crate::tenancy::limits::Limiter;

/// What a request's journey is bounded and decided by, from the config.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Largest `n` a request may ask for (`server.max_n`).
    pub max_n: u32,
    /// Most prompts in one request (`server.max_prompts`).
    pub max_prompts: usize,
    /// Whose requests share cache entries (`cache.scope`).
    pub cache_scope: CacheScope,
    /// Whether answers of requests that sample are cached (`cache.sampled`).
    pub cache_sampled: bool,
    /// How often a background response's replica is asked whether it has
    /// finished (`responses.background_poll_ms`).
    pub background_poll: std::time::Duration,
    /// How long a background response is watched at most (`responses.ttl_secs`).
    pub background_ttl: std::time::Duration,
}

/// The stages, shared by every request.
pub struct Stages {
    pub settings: PipelineSettings,
    pub auth: Authenticator,
    pub limiter: Arc<Limiter>,
    pub policy: Arc<dyn Policy>,
    pub models: ModelCatalog,
    pub cache: Option<Arc<dyn Cache>>,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn Store>,
    pub inference_log: InferenceLogger,
    /// The in-process worker's endpoints (`/ready` reports each model's).
    pub fleet: Option<Arc<Fleet>>,
    /// Which key owns each stored response, and which replica holds it.
    pub affinity: Arc<dyn AffinityMap>,
    /// The replay buffer of resumable streams (`None`: `resume.enabled` is false).
    pub resumption: Option<Arc<super::resumable::Resumption>>,
    /// Every family of the process, for `/metrics`.
    pub registry: Arc<MetricsRegistry>,
    pub metrics: Arc<RequestMetrics>,
    pub cache_metrics: Arc<CacheMetrics>,
    pub queue_metrics: Arc<QueueMetrics>,
    pub tenancy_metrics: Arc<TenancyMetrics>,
}
