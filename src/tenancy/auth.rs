//! The auth stage: API key generation, hashing and verification.
//!
//! Secrets are 256-bit random strings shown once at creation; the store keeps
//! only their SHA-256 (a fast hash is right here: the secret has full entropy,
//! so there is nothing to brute-force). Lookups are remembered for at most
//! `auth.cache_ttl_ms` (≤ 1 s), which bounds how late a revocation takes effect.
//!
//! Valid and unknown keys are remembered apart, so a flood of random keys
//! never evicts a valid key's entry; and the store is asked about keys not
//! seen valid recently at most `auth.unknown_lookups_per_second` times a
//! second (beyond that: 503, without a lookup). A key seen valid in the last
//! ten minutes is always looked up, so a flood cannot lock out real clients.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::backends::store::{ActiveKey, NewApiKey, Store, StoreError};
use crate::config::AuthConfig;
use crate::error::GatewayError;
use crate::observe::metrics::Metrics;
use crate::tenancy::limits::Limits;

const SECRET_PREFIX: &str = "sk-sluice-";

/// Who is making a request, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub key_name: String,
    /// The key's limits, the configured defaults filling in what it does not set.
    pub limits: Limits,
    pub team: Option<TeamIdentity>,
}

/// The team a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamIdentity {
    pub id: String,
    pub name: String,
    pub limits: Limits,
}

impl Identity {
    /// A key without limits (tools and tests).
    pub fn unlimited(key_id: &str, key_name: &str) -> Self {
        Self {
            key_id: key_id.to_string(),
            key_name: key_name.to_string(),
            limits: Limits::default(),
            team: None,
        }
    }

    /// Whether the key (and its team) may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.limits.allows_model(model)
            && self
                .team
                .as_ref()
                .is_none_or(|t| t.limits.allows_model(model))
    }
}

/// A newly created key. `secret` exists only here: print it once.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub id: String,
    pub name: String,
    pub secret: String,
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh id for a key or a team: `<kind>_` and 12 random hex digits.
pub fn new_id(kind: &str) -> String {
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    format!("{kind}_{}", hex::encode(bytes))
}

/// Creates a key named `name` without limits of its own and stores its hash.
pub async fn create_key(store: &dyn Store, name: &str) -> Result<CreatedKey, StoreError> {
    create_key_with(store, name, Limits::default(), None, None).await
}

/// Creates a key named `name` with its limits, team and expiry, and stores its hash.
pub async fn create_key_with(
    store: &dyn Store,
    name: &str,
    limits: Limits,
    team_id: Option<String>,
    expires_at: Option<DateTime<Utc>>,
) -> Result<CreatedKey, StoreError> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let id = new_id("key");
    store
        .insert_key(&NewApiKey {
            id: id.clone(),
            name: name.to_string(),
            key_hash: hash_secret(&secret),
            created_at: Utc::now(),
            limits,
            team_id,
            expires_at,
        })
        .await?;
    Ok(CreatedKey {
        id,
        name: name.to_string(),
        secret,
    })
}

/// The presented secret: `Authorization: Bearer <key>`, or the `api_key`
/// query parameter for browsers opening a WebSocket.
pub fn presented_secret<'a>(headers: &'a HeaderMap, query_key: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .or(query_key)
        .filter(|s| !s.is_empty())
}

fn remembered<V: Clone + Send + Sync + 'static>(
    capacity: u64,
    ttl: Duration,
) -> moka::future::Cache<String, V> {
    moka::future::Cache::builder()
        .max_capacity(capacity)
        .time_to_live(ttl)
        .build()
}

/// How long a key once found valid skips the unknown-key lookup limit.
const VOUCHED_FOR: Duration = Duration::from_secs(600);

/// Verifies secrets against the store, remembering answers briefly.
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    valid: moka::future::Cache<String, (Identity, Option<DateTime<Utc>>)>,
    unknown: moka::future::Cache<String, ()>,
    /// Keys found valid within [`VOUCHED_FOR`]: their lookups are never limited.
    vouched: moka::future::Cache<String, ()>,
    unknown_lookups: Arc<governor::DefaultDirectRateLimiter>,
    default_limits: Limits,
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        config: &AuthConfig,
        default_limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let rate = NonZeroU32::new(config.unknown_lookups_per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            store,
            metrics,
            valid: remembered(100_000, config.cache_ttl),
            unknown: remembered(config.max_unknown_keys, config.cache_ttl),
            vouched: remembered(100_000, VOUCHED_FOR),
            unknown_lookups: Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                rate,
            ))),
            default_limits,
        }
    }

    pub async fn authenticate(&self, secret: Option<&str>) -> Result<Identity, GatewayError> {
        let secret = secret.ok_or(GatewayError::Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`",
        ))?;
        let invalid = GatewayError::Unauthorized("invalid or revoked API key");
        let hash = hash_secret(secret);
        if let Some((identity, expires_at)) = self.valid.get(&hash).await {
            return unexpired(identity, expires_at);
        }
        if self.unknown.contains_key(&hash) {
            return Err(invalid);
        }
        // Concurrent requests with the same key share one lookup (a burst of
        // a new key's requests is one store query, one unit of the budget).
        let looked_up = self
            .valid
            .try_get_with(hash.clone(), self.look_up(&hash))
            .await;
        match looked_up {
            Ok((identity, expires_at)) => unexpired(identity, expires_at),
            Err(failure) => match &*failure {
                LookupFailure::Unknown => {
                    self.unknown.insert(hash, ()).await;
                    Err(invalid)
                }
                LookupFailure::Limited => Err(GatewayError::Overloaded(
                    "too many API key lookups right now; retry shortly".into(),
                )),
                LookupFailure::Store(message) => Err(GatewayError::Backend(format!(
                    "cannot verify the API key: {message}"
                ))),
            },
        }
    }

    /// Asks the store about a key, within the lookup budget for keys not
    /// seen valid recently.
    async fn look_up(
        &self,
        hash: &str,
    ) -> Result<(Identity, Option<DateTime<Utc>>), LookupFailure> {
        let lookups = &self.metrics.auth_lookups;
        if !self.vouched.contains_key(hash) && self.unknown_lookups.check().is_err() {
            lookups.with_label_values(&["limited"]).inc();
            return Err(LookupFailure::Limited);
        }
        let found = self
            .store
            .find_active_key(hash)
            .await
            .map_err(|err| LookupFailure::Store(err.to_string()))?;
        let Some(ActiveKey { key, team }) = found else {
            lookups.with_label_values(&["unknown"]).inc();
            return Err(LookupFailure::Unknown);
        };
        lookups.with_label_values(&["found"]).inc();
        let identity = Identity {
            key_id: key.id,
            key_name: key.name,
            limits: key.limits.or(&self.default_limits),
            team: team.map(|team| TeamIdentity {
                id: team.id,
                name: team.name,
                limits: team.limits,
            }),
        };
        self.vouched.insert(hash.to_string(), ()).await;
        Ok((identity, key.expires_at))
    }
}

/// Why a lookup found no identity.
enum LookupFailure {
    Unknown,
    Limited,
    Store(String),
}

/// The identity, unless its key has expired (401).
fn unexpired(
    identity: Identity,
    expires_at: Option<DateTime<Utc>>,
) -> Result<Identity, GatewayError> {
    match expires_at {
        Some(at) if at <= Utc::now() => Err(GatewayError::Unauthorized("this API key has expired")),
        _ => Ok(identity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_wins_over_query() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(presented_secret(&headers, Some("q")), Some("abc"));
        assert_eq!(presented_secret(&HeaderMap::new(), Some("q")), Some("q"));
        assert_eq!(presented_secret(&HeaderMap::new(), None), None);
    }

    #[test]
    fn hashes_are_stable_and_not_the_secret() {
        assert_eq!(hash_secret("x"), hash_secret("x"));
        assert_ne!(hash_secret("x"), "x");
        assert_eq!(hash_secret("x").len(), 64);
    }
}
