//! Where stored responses live: vLLM keeps a stored response (the Responses
//! API's `store`, `background`) in the memory of the replica that made it,
//! so a follow-up (`previous_response_id`), a retrieve or a cancel must
//! reach that replica. The [`AffinityMap`] records, for each response id,
//! the key that owns it and the model that made it (written by the edge
//! before the request leaves) and the endpoint that holds it (written by
//! the worker that ran it), for `responses.ttl_secs`.
//!
//! In process ([`MemoryAffinity`]) for one gateway; in Redis
//! ([`RedisAffinity`]) when edges and workers are separate processes, so
//! that any edge finds what any worker recorded.

mod config;
mod memory;
mod redis;

use async_trait::async_trait;

pub use config::ResponsesConfig;
pub use memory::MemoryAffinity;
pub use redis::RedisAffinity;

/// What is known of one stored response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    /// The API key that made it: no other key may name it.
    pub owner: String,
    /// The model pool whose endpoint holds it.
    pub model: String,
    /// The endpoint's URL, once a worker has sent the request there.
    pub endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("the map of stored responses is unavailable: {0}")]
pub struct AffinityError(pub String);

#[async_trait]
pub trait AffinityMap: Send + Sync + 'static {
    /// Records that `owner` is making response `id` with `model`.
    async fn claim(&self, id: &str, owner: &str, model: &str) -> Result<(), AffinityError>;
    /// Records the endpoint that holds `id`.
    async fn place(&self, id: &str, endpoint: &str) -> Result<(), AffinityError>;
    async fn find(&self, id: &str) -> Result<Option<Holder>, AffinityError>;
}

/// The map in Redis at `redis` (see `Config::responses_redis`), else in process.
pub async fn open(
    config: &ResponsesConfig,
    redis: Option<&str>,
) -> std::sync::Arc<dyn AffinityMap> {
    match redis {
        Some(url) => std::sync::Arc::new(RedisAffinity::connect(url, config).await),
        None => std::sync::Arc::new(MemoryAffinity::new(config.ttl, config.max_entries.get())),
    }
}
