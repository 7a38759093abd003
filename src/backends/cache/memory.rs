//! The in-process cache: bounded by the bytes it holds, entries expire after the TTL.

use std::time::Duration;

use async_trait::async_trait;

use super::{Cache, CacheError, CachedResponse};

pub struct MemoryCache {
    entries: moka::future::Cache<String, CachedResponse>,
}

impl MemoryCache {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &String, value: &CachedResponse| {
                    let bytes = key.len() + value.iter().map(|c| c.framed().len()).sum::<usize>();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .build(),
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<CachedResponse>, CacheError> {
        Ok(self.entries.get(key).await)
    }

    async fn put(&self, key: &str, value: CachedResponse) -> Result<(), CacheError> {
        self.entries.insert(key.to_string(), value).await;
        Ok(())
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }
}
