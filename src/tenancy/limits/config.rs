//! `[limits]`: where per-key limits are counted and what applies to keys
//! without limits of their own.

use std::num::NonZeroU64;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::backends::store::Limits;
use crate::settings::{Invalid, positive_millis, positive_secs, redact_url, scheme};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `memory://` (this process only) or `redis://HOST:PORT[/DB]` (exact across edges).
    pub url: SecretString,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// A Redis check slower than this counts as Redis being down.
    #[serde(rename = "timeout_ms", deserialize_with = "positive_millis")]
    pub timeout: Duration,
    /// How long a running request holds its concurrency slot at most (frees
    /// the slots of requests whose edge died).
    #[serde(rename = "lease_secs", deserialize_with = "positive_secs")]
    pub lease: Duration,
    /// While Redis is down: `local` (each edge checks its share) or `refuse` (503).
    pub on_unavailable: OnLimiterDown,
    /// How many edges share the limits: each one's share while Redis is down.
    pub edges: NonZeroU64,
    /// Tokens reserved for the output of a request without `max_tokens`.
    pub reserve_tokens: NonZeroU64,
    /// Limits of keys that set none of their own (field by field).
    pub default: Limits,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            url: "memory://".to_string().into(),
            key_prefix: "sluice:".into(),
            timeout: Duration::from_millis(250),
            lease: Duration::from_secs(600),
            on_unavailable: OnLimiterDown::Local,
            edges: NonZeroU64::MIN,
            reserve_tokens: const { NonZeroU64::new(1024).expect("not zero") },
            default: Limits::default(),
        }
    }
}

/// What the limiter does while its Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimiterDown {
    Local,
    Refuse,
}

impl LimitsConfig {
    /// The Redis URL, when limits are counted in Redis.
    pub fn redis_url(&self) -> Option<&str> {
        let url = self.url.expose_secret();
        matches!(scheme(url), Some("redis" | "rediss")).then_some(url)
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        let url = self.url.expose_secret();
        if !matches!(scheme(url), Some("memory" | "redis" | "rediss")) {
            return Err(Invalid::new(
                "limits.url",
                format!(
                    "`{}` must start with memory:// or redis://",
                    redact_url(url)
                ),
            ));
        }
        self.default
            .validate()
            .map_err(|message| Invalid::new("limits.default", message))
    }
}
