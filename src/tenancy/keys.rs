//! API keys: generation, hashing, and creating a key in the store.
//!
//! Secrets are 256-bit random strings shown once at creation; the store keeps
//! only their SHA-256 (a fast hash is right here: the secret has full entropy,
//! so there is nothing to brute-force).

use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::backends::store::{Limits, NewApiKey, Store, StoreError};

const SECRET_PREFIX: &str = "sk-sluice-";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_not_the_secret() {
        assert_eq!(hash_secret("x"), hash_secret("x"));
        assert_ne!(hash_secret("x"), "x");
        assert_eq!(hash_secret("x").len(), 64);
    }
}
