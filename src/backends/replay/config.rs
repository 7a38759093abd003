//! `[resume]`: resumable streams, what a stream's replay buffer may hold
//! and for how long, and where it lives.

use std::num::NonZeroUsize;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::settings::{Invalid, positive_millis};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResumeConfig {
    /// Whether streamed answers can be resumed (their events carry ids).
    pub enabled: bool,
    /// `memory://`, or `redis://HOST:PORT[/DB]` (shared by every edge, so a
    /// client may reconnect to any). Unset: the Redis of `[responses]`, of
    /// the limits or of the cache, else in process.
    pub url: Option<SecretString>,
    /// How long a generation goes on after its client disconnected,
    /// waiting for it to come back; cancelled when nobody has.
    #[serde(rename = "grace_ms", deserialize_with = "positive_millis")]
    pub grace: Duration,
    /// How long a stream stays resumable after its last event.
    #[serde(rename = "retain_ms", deserialize_with = "positive_millis")]
    pub retain: Duration,
    /// The events one stream may keep: past this, the stream goes on but
    /// can no longer be resumed.
    pub max_stream_bytes: NonZeroUsize,
    /// The events all of this edge's streams may keep together.
    pub max_total_bytes: NonZeroUsize,
    pub key_prefix: String,
    #[serde(rename = "timeout_ms", deserialize_with = "positive_millis")]
    pub timeout: Duration,
    /// How often a resumed stream read from Redis looks for new events.
    #[serde(rename = "poll_ms", deserialize_with = "positive_millis")]
    pub poll: Duration,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            url: None,
            grace: Duration::from_secs(30),
            retain: Duration::from_secs(60),
            max_stream_bytes: const { NonZeroUsize::new(1 << 20).expect("not zero") },
            max_total_bytes: const { NonZeroUsize::new(256 << 20).expect("not zero") },
            key_prefix: "sluice:stream:".into(),
            timeout: Duration::from_millis(500),
            poll: Duration::from_millis(20),
        }
    }
}

impl ResumeConfig {
    /// `url` when it is a Redis URL.
    pub fn redis_url(&self) -> Option<&str> {
        crate::settings::redis_url(self.url.as_ref()?.expose_secret())
    }

    /// Whether `url` names the in-process implementation explicitly.
    pub fn in_process(&self) -> bool {
        crate::settings::names_memory(self.url.as_ref())
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.max_stream_bytes > self.max_total_bytes {
            return Err(Invalid::new(
                "resume.max_stream_bytes",
                format!(
                    "{} is more than resume.max_total_bytes ({})",
                    self.max_stream_bytes, self.max_total_bytes
                ),
            ));
        }
        crate::settings::memory_or_redis("resume.url", self.url.as_ref())
    }
}
