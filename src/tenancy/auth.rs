//! The auth stage: verifying a presented API key.
//!
//! Lookups are remembered for at most `auth.cache_ttl_ms` (≤ 1 s), which
//! bounds how late a revocation takes effect. Valid and unknown keys are
//! remembered apart, so a flood of random keys never evicts a valid key's
//! entry; and the store is asked about keys not seen valid recently at most
//! `auth.unknown_lookups_per_second` times a second (beyond that: 503,
//! without a lookup). A key seen valid in the last ten minutes is always
//! looked up, so a flood cannot lock out real clients.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::keys::hash_secret;
use super::metrics::TenancyMetrics;
use super::{Identity, TeamIdentity};
use crate::backends::store::{ActiveKey, Limits, Store};
use crate::error::GatewayError;
use crate::settings::{Invalid, millis};

/// `[auth]`: how key lookups are remembered and rationed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a key lookup is remembered. Bounds how late a revocation takes effect.
    #[serde(rename = "cache_ttl_ms", deserialize_with = "millis")]
    pub cache_ttl: Duration,
    /// Unknown keys remembered (for `cache_ttl_ms`), apart from valid ones.
    pub max_unknown_keys: NonZeroU64,
    /// Store lookups per second for keys not seen valid in the last ten
    /// minutes; beyond it such requests get 503 without a lookup.
    pub unknown_lookups_per_second: NonZeroU32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_millis(500),
            max_unknown_keys: const { NonZeroU64::new(100_000).expect("not zero") },
            unknown_lookups_per_second: const { NonZeroU32::new(100).expect("not zero") },
        }
    }
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.cache_ttl > Duration::from_secs(1) {
            return Err(Invalid::new(
                "auth.cache_ttl_ms",
                "must be at most 1000 so that a revoked key stops working within a second",
            ));
        }
        Ok(())
    }
}

/// The presented secret: `Authorization: Bearer <key>`, `x-api-key: <key>`
/// (Anthropic's clients), or the `api_key` query parameter for browsers
/// opening a WebSocket.
pub fn presented_secret<'a>(headers: &'a HeaderMap, query_key: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        // Anthropic's clients send the key in `x-api-key`.
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
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
    metrics: Arc<TenancyMetrics>,
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
        metrics: Arc<TenancyMetrics>,
    ) -> Self {
        Self {
            store,
            metrics,
            valid: remembered(100_000, config.cache_ttl),
            unknown: remembered(config.max_unknown_keys.get(), config.cache_ttl),
            vouched: remembered(100_000, VOUCHED_FOR),
            unknown_lookups: Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                config.unknown_lookups_per_second,
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

    /// The identity of the key with this id, for work done on its behalf
    /// after its request was answered (a batch's lines): refused as the key
    /// itself would be once it is revoked or expired.
    pub async fn identity_of_key(&self, key_id: &str) -> Result<Identity, GatewayError> {
        let key = self
            .store
            .find_key(key_id)
            .await
            .map_err(|err| GatewayError::Backend(format!("cannot look up the API key: {err}")))?
            .filter(|key| key.id == key_id && key.revoked_at.is_none())
            .ok_or(GatewayError::Unauthorized("invalid or revoked API key"))?;
        let team = match &key.team_id {
            Some(team_id) => self.store.find_team(team_id).await.map_err(|err| {
                GatewayError::Backend(format!("cannot look up the key's team: {err}"))
            })?,
            None => None,
        };
        let identity = self.identity(key.clone(), team);
        unexpired(identity, key.expires_at)
    }

    fn identity(
        &self,
        key: crate::backends::store::ApiKey,
        team: Option<crate::backends::store::Team>,
    ) -> Identity {
        Identity {
            key_id: key.id,
            key_name: key.name,
            limits: key.limits.or(&self.default_limits),
            team: team.map(|team| TeamIdentity {
                id: team.id,
                name: team.name,
                limits: team.limits,
            }),
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
        let expires_at = key.expires_at;
        let identity = self.identity(key, team);
        self.vouched.insert(hash.to_string(), ()).await;
        Ok((identity, expires_at))
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
}
