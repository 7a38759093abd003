//! The Redis cache (via fred). Redis is optional at runtime: when it is down
//! or slow, requests are served uncached. Each outage is logged once when it
//! starts and once when it ends, every bypass is counted, and the client
//! reconnects by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::config::Options;

use super::{Cache, CacheError, CacheMetrics, CachedResponse};
use crate::observe::outage::Outage;

/// After a failure, how long to serve uncached before trying Redis again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct RedisCache {
    client: Client,
    key_prefix: String,
    ttl_secs: i64,
    options: Options,
    /// Logs each outage once, when it starts and when it ends.
    outage: Outage,
    /// Milliseconds since `epoch` before which calls are not attempted.
    retry_at_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<CacheMetrics>,
    url: String,
}

impl RedisCache {
    /// Creates the client and starts connecting in the background. Never fails:
    /// an unreachable Redis at startup is the same as one that went away later.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        ttl: Duration,
        timeout: Duration,
        metrics: Arc<CacheMetrics>,
    ) -> Self {
        let redacted = crate::settings::redact_url(url);
        let client = crate::backends::redis::connect(url, timeout, "cache").await;
        Self {
            client,
            key_prefix: key_prefix.to_string(),
            ttl_secs: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1),
            options: crate::backends::redis::one_attempt(timeout),
            outage: Outage::default(),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
            url: redacted,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether to try Redis now; false during the back-off after a failure.
    fn should_try(&self) -> bool {
        if !self.outage.is_down() {
            return self.client.is_connected() || self.record_failure("not connected");
        }
        self.now_ms() >= self.retry_at_ms.load(Ordering::Relaxed)
    }

    /// Marks an outage; logs only on the transition. Always returns false.
    fn record_failure(&self, reason: &str) -> bool {
        self.retry_at_ms.store(
            self.now_ms() + RETRY_AFTER.as_millis() as u64,
            Ordering::Relaxed,
        );
        if self.outage.failed().is_some() {
            tracing::warn!(url = %self.url, reason, "Redis cache unavailable; serving requests uncached until it is back");
            self.metrics.backend_up.with_label_values(&["cache"]).set(0);
        }
        false
    }

    fn record_success(&self) {
        if self.outage.succeeded().is_some() {
            tracing::info!(url = %self.url, "Redis cache is back");
            self.metrics.backend_up.with_label_values(&["cache"]).set(1);
        }
    }

    fn unavailable(&self, err: impl std::fmt::Display) -> CacheError {
        let reason = err.to_string();
        self.record_failure(&reason);
        CacheError::Unavailable(reason)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.key_prefix, key)
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<CachedResponse>, CacheError> {
        if !self.should_try() {
            return Err(CacheError::Unavailable(
                "Redis is down (backing off)".into(),
            ));
        }
        let value: Option<Vec<u8>> = self
            .client
            .with_options(&self.options)
            .get(self.key(key))
            .await
            .map_err(|e| self.unavailable(e))?;
        self.record_success();
        value.map(|bytes| super::decode(&bytes)).transpose()
    }

    async fn put(&self, key: &str, value: CachedResponse) -> Result<(), CacheError> {
        if !self.should_try() {
            return Err(CacheError::Unavailable(
                "Redis is down (backing off)".into(),
            ));
        }
        let encoded = super::encode(&value);
        let _: () = self
            .client
            .with_options(&self.options)
            .set(
                self.key(key),
                encoded,
                Some(Expiration::EX(self.ttl_secs)),
                None,
                false,
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        self.record_success();
        Ok(())
    }

    async fn ping(&self) -> Result<(), CacheError> {
        let _: () = self
            .client
            .with_options(&self.options)
            .ping(None)
            .await
            .map_err(|e| CacheError::Unavailable(e.to_string()))?;
        Ok(())
    }
}
