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
/// The shortest secret an operator may bring (a generated one has 53 characters).
pub const MIN_SECRET_LEN: usize = 20;
/// The longest.
const MAX_SECRET_LEN: usize = 512;

/// Checks a secret an operator brings (from another gateway, or a GitOps
/// repository): long enough to be unguessable, printable, no spaces.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let length = secret.chars().count();
    if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&length) {
        return Err(format!(
            "secret must be {MIN_SECRET_LEN} to {MAX_SECRET_LEN} characters, not {length}"
        ));
    }
    if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("secret must not contain spaces or control characters".into());
    }
    Ok(())
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
    create_key_with(store, name, Limits::default(), None, None, None).await
}

/// Creates a key named `name` with its limits, team and expiry, and stores
/// the hash of its secret: `secret` if the operator brings one (checked by
/// [`check_secret`] first), else a new random one.
pub async fn create_key_with(
    store: &dyn Store,
    name: &str,
    limits: Limits,
    team_id: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    secret: Option<&str>,
) -> Result<CreatedKey, StoreError> {
    let secret = match secret {
        Some(secret) => secret.to_string(),
        None => {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            format!(
                "{SECRET_PREFIX}{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
            )
        }
    };
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
    fn brought_secrets_must_be_long_and_printable() {
        assert!(check_secret("sk-litellm-0123456789abcdef").is_ok());
        assert!(check_secret("short").unwrap_err().contains("20"));
        assert!(check_secret("sk-with a space-0123456789").is_err());
    }

    #[test]
    fn hashes_are_stable_and_not_the_secret() {
        assert_eq!(hash_secret("x"), hash_secret("x"));
        assert_ne!(hash_secret("x"), "x");
        assert_eq!(hash_secret("x").len(), 64);
    }
}
