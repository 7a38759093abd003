//! The cache stage: completed upstream responses, stored as their raw chunks
//! so a hit replays as a real stream with the original chunk boundaries.
//! An in-process bounded TTL cache for embedded mode, Redis for production.

mod config;
mod memory;
mod redis;

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use prometheus::{IntCounterVec, IntGaugeVec};

use crate::observe::metrics::{MetricsRegistry, Roles};
use crate::protocol::{Chunk, ChunkView};

pub use config::{CacheBackend, CacheConfig, CacheScope};
pub use memory::MemoryCache;
pub use redis::RedisCache;

/// A completed response, shared by every hit on it.
pub type CachedResponse = Arc<CachedChunks>;

/// Every upstream chunk of a response, in order, `[DONE]` excluded; derefs to
/// the chunks.
#[derive(Debug, Default)]
pub struct CachedChunks {
    chunks: Box<[Chunk]>,
    /// Each chunk parsed for the token filters: parsed by the first hit that
    /// filters, then shared by later hits on the same in-memory entry.
    views: OnceLock<Box<[Option<ChunkView<'static>>]>>,
}

impl CachedChunks {
    pub fn new(chunks: Vec<Chunk>) -> CachedResponse {
        Arc::new(Self {
            chunks: chunks.into(),
            views: OnceLock::new(),
        })
    }

    /// The chunks' views (`None` for one that is not a JSON chunk).
    pub fn views(&self) -> &[Option<ChunkView<'static>>] {
        self.views.get_or_init(|| {
            self.chunks
                .iter()
                .map(|chunk| ChunkView::parse(chunk).map(ChunkView::into_owned))
                .collect()
        })
    }
}

impl std::ops::Deref for CachedChunks {
    type Target = [Chunk];

    fn deref(&self) -> &[Chunk] {
        &self.chunks
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache backend unavailable: {0}")]
    Unavailable(String),
    #[error("cache entry is corrupt: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait Cache: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<CachedResponse>, CacheError>;
    async fn put(&self, key: &str, value: CachedResponse) -> Result<(), CacheError>;
    async fn ping(&self) -> Result<(), CacheError>;
}

/// The cache's metric families.
pub struct CacheMetrics {
    pub lookups: IntCounterVec,
    pub stores: IntCounterVec,
    /// The registry's `sluice_backend_up` (the Redis cache reports as `cache`).
    pub backend_up: IntGaugeVec,
}

impl CacheMetrics {
    /// The families, every known label value at 0.
    pub fn new(registry: &MetricsRegistry) -> Self {
        let metrics = Self::families(registry);
        for result in ["hit", "miss", "bypass", "error"] {
            metrics.lookups.with_label_values(&[result]);
        }
        for result in ["stored", "failed"] {
            metrics.stores.with_label_values(&[result]);
        }
        metrics
    }

    fn families(registry: &MetricsRegistry) -> Self {
        Self {
            lookups: registry.counter_vec(
                Roles::EDGE,
                "sluice_cache_lookups_total",
                "Cache lookups by result: hit, miss, bypass (plugin or uncacheable), error",
                &["result"],
            ),
            stores: registry.counter_vec(
                Roles::EDGE,
                "sluice_cache_stores_total",
                "Complete responses written to the cache, by result: stored or failed",
                &["result"],
            ),
            backend_up: registry.backend_up.clone(),
        }
    }
}

/// Builds the configured cache; `None` when caching is off.
pub async fn open(config: &CacheConfig, metrics: Arc<CacheMetrics>) -> Option<Arc<dyn Cache>> {
    match config.backend() {
        CacheBackend::Disabled => None,
        CacheBackend::Memory => Some(Arc::new(MemoryCache::new(
            config.max_bytes.get(),
            config.ttl,
        ))),
        CacheBackend::Redis => Some(Arc::new(
            RedisCache::connect(
                secrecy::ExposeSecret::expose_secret(&config.url),
                &config.key_prefix,
                config.ttl,
                config.timeout,
                metrics,
            )
            .await,
        )),
    }
}

/// Serialises a response as the SSE body it came from; [`decode`] reverses it.
pub fn encode(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.iter().map(|c| c.framed().len()).sum());
    for chunk in chunks {
        out.extend_from_slice(chunk.framed());
    }
    out
}

pub fn decode(bytes: &[u8]) -> Result<CachedResponse, CacheError> {
    let mut parser = crate::protocol::sse::SseParser::new();
    parser.push(bytes);
    let chunks: Vec<Chunk> = std::iter::from_fn(|| parser.next_event())
        .map(|e| e.chunk)
        .collect();
    if parser.pending() != 0 || chunks.is_empty() {
        return Err(CacheError::Corrupt(format!(
            "{} trailing bytes",
            parser.pending()
        )));
    }
    Ok(CachedChunks::new(chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_keeps_chunk_boundaries() {
        let chunks: Vec<Chunk> = vec![
            Chunk::from_payload(br#"{"a":1}"#),
            Chunk::from_payload(br#"{"b":"x\ny"}"#),
        ];
        let decoded = decode(&encode(&chunks)).unwrap();
        assert_eq!(&decoded[..], &chunks[..]);
        assert!(decode(b"data: {\"a\"").is_err());
    }
}
