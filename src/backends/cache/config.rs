//! `[cache]`: which cache, how long answers are kept, and whose requests share them.

use std::num::NonZeroU64;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::settings::{Invalid, positive_millis, positive_secs, redact_url, scheme};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `memory://` (in-process), `redis://HOST:PORT[/DB]`, or `off`.
    pub url: SecretString,
    #[serde(rename = "ttl_secs", deserialize_with = "positive_secs")]
    pub ttl: Duration,
    /// Bound on the in-process cache, in bytes of stored chunks.
    pub max_bytes: NonZeroU64,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Redis commands slower than this count as failures (the request is served uncached).
    #[serde(rename = "timeout_ms", deserialize_with = "positive_millis")]
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
            max_bytes: const { NonZeroU64::new(256 * 1024 * 1024).expect("not zero") },
            key_prefix: "sluice:".into(),
            timeout: Duration::from_millis(250),
            scope: CacheScope::Key,
            sampled: false,
        }
    }
}

/// Which cache `cache.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    Disabled,
    Memory,
    Redis,
}

impl CacheConfig {
    /// The backend of `url` (checked by [`CacheConfig::validate`]: one of these).
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

    pub fn validate(&self) -> Result<(), Invalid> {
        let url = self.url.expose_secret();
        if matches!(url, "off" | "none" | "")
            || matches!(scheme(url), Some("memory" | "redis" | "rediss"))
        {
            return Ok(());
        }
        Err(Invalid::new(
            "cache.url",
            format!(
                "`{}` must be memory://, redis://HOST:PORT or off",
                redact_url(url)
            ),
        ))
    }
}
