//! `[store]`: where API keys, teams and the inference log are kept.

use std::num::{NonZeroU32, NonZeroUsize};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::settings::{Invalid, redact_url, scheme};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST:PORT/DB`,
    /// credentials included: log [`redact_url`] of it.
    pub url: SecretString,
    pub max_connections: NonZeroU32,
    /// Inference-log rows buffered before new rows are dropped (and counted).
    pub log_buffer: NonZeroUsize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://sluice.db".to_string().into(),
            max_connections: const { NonZeroU32::new(8).expect("not zero") },
            log_buffer: const { NonZeroUsize::new(10_000).expect("not zero") },
        }
    }
}

/// Which database a store URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreConfig {
    /// Which database the URL names (checked by [`StoreConfig::validate`]: one of the two).
    pub fn kind(&self) -> StoreKind {
        if self.url.expose_secret().starts_with("sqlite:") {
            StoreKind::Sqlite
        } else {
            StoreKind::Postgres
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        let url = self.url.expose_secret();
        if url.starts_with("sqlite:") || matches!(scheme(url), Some("postgres" | "postgresql")) {
            return Ok(());
        }
        Err(Invalid::new(
            "store.url",
            format!(
                "`{}` must start with sqlite:// or postgres://",
                redact_url(url)
            ),
        ))
    }
}
