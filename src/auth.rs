//! The auth stage: API key generation, hashing and verification.
//!
//! Secrets are 256-bit random strings shown once at creation; the store keeps
//! only their SHA-256 (a fast hash is right here: the secret has full entropy,
//! so there is nothing to brute-force). Lookups are remembered for at most
//! `auth.cache_ttl_ms` (≤ 1 s), which bounds how late a revocation takes effect.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::store::{NewApiKey, Store, StoreError};

const SECRET_PREFIX: &str = "sk-sluice-";

/// Who is making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub key_name: String,
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

/// Creates a key named `name` and stores its hash.
pub async fn create_key(store: &dyn Store, name: &str) -> Result<CreatedKey, StoreError> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let mut id_bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut id_bytes);
    let id = format!("key_{}", hex::encode(id_bytes));
    store
        .insert_key(&NewApiKey {
            id: id.clone(),
            name: name.to_string(),
            key_hash: hash_secret(&secret),
            created_at: Utc::now(),
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

/// Verifies secrets against the store, remembering answers briefly.
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    recent: moka::future::Cache<String, Option<Identity>>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        Self {
            store,
            recent: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub async fn authenticate(&self, secret: Option<&str>) -> Result<Identity, GatewayError> {
        let secret = secret.ok_or(GatewayError::Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`",
        ))?;
        let hash = hash_secret(secret);
        let store = self.store.clone();
        let found = self
            .recent
            .try_get_with(hash.clone(), async move {
                store.find_active_key(&hash).await.map(|key| {
                    key.map(|k| Identity {
                        key_id: k.id,
                        key_name: k.name,
                    })
                })
            })
            .await
            .map_err(|err| GatewayError::Backend(format!("cannot verify the API key: {err}")))?;
        found.ok_or(GatewayError::Unauthorized("invalid or revoked API key"))
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
