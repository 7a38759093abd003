//! `[responses]`: where the map of stored responses to the replicas that
//! hold them lives, and for how long an entry is kept.

use std::num::NonZeroUsize;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::settings::{Invalid, positive_millis, positive_secs};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponsesConfig {
    /// `memory://`, or `redis://HOST:PORT[/DB]` (shared by every edge and
    /// worker). Unset: the limits' Redis, else the cache's, else in process.
    pub url: Option<SecretString>,
    /// How long a response id is remembered (vLLM itself keeps stored
    /// responses until the replica restarts).
    #[serde(rename = "ttl_secs", deserialize_with = "positive_secs")]
    pub ttl: Duration,
    /// Bound on the in-process map (the oldest entries go first).
    pub max_entries: NonZeroUsize,
    pub key_prefix: String,
    #[serde(rename = "timeout_ms", deserialize_with = "positive_millis")]
    pub timeout: Duration,
    /// How often the gateway asks a background response's replica whether
    /// it has finished (to count and log its tokens when it has).
    #[serde(rename = "background_poll_ms", deserialize_with = "positive_millis")]
    pub background_poll: Duration,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self {
            url: None,
            ttl: Duration::from_secs(24 * 3600),
            max_entries: const { NonZeroUsize::new(1_000_000).expect("not zero") },
            key_prefix: "sluice:resp:".into(),
            timeout: Duration::from_millis(500),
            background_poll: Duration::from_millis(1000),
        }
    }
}

impl ResponsesConfig {
    /// `url` when it is a Redis URL.
    pub fn redis_url(&self) -> Option<&str> {
        crate::settings::redis_url(self.url.as_ref()?.expose_secret())
    }

    /// Whether `url` names the in-process implementation explicitly.
    pub fn in_process(&self) -> bool {
        crate::settings::names_memory(self.url.as_ref())
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        crate::settings::memory_or_redis("responses.url", self.url.as_ref())
    }
}
