//! `[console]`: the operator console on the admin listener.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{Invalid, positive_secs};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console at `/console/` on the admin listener (`[admin] listen`).
    pub enabled: bool,
    /// How long a sign-in lasts, from the moment it was made.
    #[serde(rename = "session_ttl_secs", deserialize_with = "positive_secs")]
    pub session_ttl: Duration,
    /// Sessions kept at once; past it, the oldest is signed out.
    pub max_sessions: NonZeroU32,
    /// Failed sign-ins allowed from one client address per minute; past
    /// it, sign-in from that address is refused (429) until the minute ends.
    pub sign_in_attempts: NonZeroU32,
    /// How long the key the playground makes for a session lasts.
    #[serde(rename = "playground_key_ttl_secs", deserialize_with = "positive_secs")]
    pub playground_key_ttl: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            session_ttl: Duration::from_secs(8 * 3600),
            max_sessions: const { NonZeroU32::new(64).expect("not zero") },
            sign_in_attempts: const { NonZeroU32::new(5).expect("not zero") },
            playground_key_ttl: Duration::from_secs(3600),
        }
    }
}

impl ConsoleConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.session_ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(Invalid::new(
                "console.session_ttl_secs",
                "must be at most a week (604800)",
            ));
        }
        Ok(())
    }
}
