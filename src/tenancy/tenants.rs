//! Managing tenants: keys with their limits, team and expiry, and teams with
//! theirs. The command line, the admin API and the console all go through
//! here, so they validate and answer alike, and every change is written to
//! the audit log with its actor.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};

use super::Limits;
use super::audit::{Actor, record};
use super::keys::CreatedKey;
use crate::backends::store::{ApiKey, Store, StoreError, Team};
use crate::error::GatewayError;

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("no {0} with id or name `{1}`")]
    NotFound(&'static str, String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<TenantError> for GatewayError {
    fn from(err: TenantError) -> Self {
        match err {
            TenantError::NotFound(..) => GatewayError::NotFound(err.to_string()),
            TenantError::Invalid(message) => GatewayError::BadRequest(message),
            TenantError::Store(StoreError::DuplicateName(name)) => {
                GatewayError::Conflict(format!("a key or team named `{name}` already exists"))
            }
            TenantError::Store(StoreError::DuplicateSecret) => {
                GatewayError::Conflict("a key with this secret already exists".into())
            }
            TenantError::Store(err) => GatewayError::Backend(err.to_string()),
        }
    }
}

/// A field that may be absent (keep), `null` (remove) or a value (set).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Changes to limits: each field absent keeps the current value, `null`
/// removes it (the default applies), a value sets it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    #[serde(default, deserialize_with = "present")]
    pub requests_per_minute: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub tokens_per_minute: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub max_concurrent: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub priority: Option<Option<crate::backends::queue::Priority>>,
}

impl LimitsPatch {
    /// `limits` with this patch applied, validated.
    pub fn apply(&self, limits: &Limits) -> Result<Limits, TenantError> {
        let pick = |patch: &Option<Option<u64>>, current: Option<u64>| match patch {
            Some(value) => *value,
            None => current,
        };
        let patched = Limits {
            requests_per_minute: pick(&self.requests_per_minute, limits.requests_per_minute),
            tokens_per_minute: pick(&self.tokens_per_minute, limits.tokens_per_minute),
            max_concurrent: pick(&self.max_concurrent, limits.max_concurrent),
            models: match &self.models {
                Some(models) => models.clone(),
                None => limits.models.clone(),
            },
            priority: match self.priority {
                Some(priority) => priority,
                None => limits.priority,
            },
        };
        patched.validate().map_err(TenantError::Invalid)?;
        Ok(patched)
    }
}

/// What to change on a key: its limits, its team (by id or name) and its expiry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    #[serde(default)]
    pub limits: LimitsPatch,
    #[serde(default, deserialize_with = "present")]
    pub team: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

async fn team_id(store: &dyn Store, team: &str) -> Result<String, TenantError> {
    store
        .find_team(team)
        .await?
        .map(|t| t.id)
        .ok_or_else(|| TenantError::NotFound("team", team.to_string()))
}

fn valid_name(name: &str) -> Result<(), TenantError> {
    if name.trim().is_empty() || name.len() > 200 {
        return Err(TenantError::Invalid(
            "name must be 1 to 200 characters".into(),
        ));
    }
    Ok(())
}

/// Creates a key with the patch's limits, team and expiry, and a new
/// secret or the one the operator brings; the secret is in the answer only.
pub async fn create_key(
    store: &dyn Store,
    actor: &Actor,
    name: &str,
    patch: &KeyPatch,
    secret: Option<&str>,
) -> Result<CreatedKey, TenantError> {
    valid_name(name)?;
    if let Some(secret) = secret {
        super::keys::check_secret(secret).map_err(TenantError::Invalid)?;
    }
    let limits = patch.limits.apply(&Limits::default())?;
    let team = match patch.team.clone().flatten() {
        Some(team) => Some(team_id(store, &team).await?),
        None => None,
    };
    let expires_at = patch.expires_at.flatten();
    let created =
        super::keys::create_key_with(store, name, limits, team, expires_at, secret).await?;
    let key = find_key(store, &created.id).await?;
    record(store, actor, "key.create", &key.id, None, Some(&key)).await?;
    Ok(created)
}

/// Applies `patch` to the key with this id or name; returns the key as it now is.
pub async fn update_key(
    store: &dyn Store,
    actor: &Actor,
    id_or_name: &str,
    patch: &KeyPatch,
) -> Result<ApiKey, TenantError> {
    let before = find_key(store, id_or_name).await?;
    let mut key = before.clone();
    key.limits = patch.limits.apply(&key.limits)?;
    if let Some(team) = &patch.team {
        key.team_id = match team {
            Some(team) => Some(team_id(store, team).await?),
            None => None,
        };
    }
    if let Some(expires_at) = patch.expires_at {
        key.expires_at = expires_at;
    }
    store.update_key(&key).await?;
    record(
        store,
        actor,
        "key.update",
        &key.id,
        Some(&before),
        Some(&key),
    )
    .await?;
    Ok(key)
}

/// Revokes the key with this id or name (its requests are refused within
/// the auth cache's lifetime); returns it as it now is. Revoking a revoked
/// key changes nothing and records nothing.
pub async fn revoke_key(
    store: &dyn Store,
    actor: &Actor,
    id_or_name: &str,
) -> Result<ApiKey, TenantError> {
    let before = find_key(store, id_or_name).await?;
    if before.revoked_at.is_some() {
        return Ok(before);
    }
    store.revoke_key(&before.id).await?;
    let after = find_key(store, &before.id).await?;
    record(
        store,
        actor,
        "key.revoke",
        &after.id,
        Some(&before),
        Some(&after),
    )
    .await?;
    Ok(after)
}

pub async fn find_key(store: &dyn Store, id_or_name: &str) -> Result<ApiKey, TenantError> {
    store
        .find_key(id_or_name)
        .await?
        .ok_or_else(|| TenantError::NotFound("key", id_or_name.to_string()))
}

pub async fn create_team(
    store: &dyn Store,
    actor: &Actor,
    name: &str,
    limits: &LimitsPatch,
) -> Result<Team, TenantError> {
    valid_name(name)?;
    let team = Team {
        id: super::keys::new_id("team"),
        name: name.to_string(),
        limits: limits.apply(&Limits::default())?,
        created_at: Utc::now(),
    };
    store.insert_team(&team).await?;
    record(store, actor, "team.create", &team.id, None, Some(&team)).await?;
    Ok(team)
}

pub async fn update_team(
    store: &dyn Store,
    actor: &Actor,
    id_or_name: &str,
    limits: &LimitsPatch,
) -> Result<Team, TenantError> {
    let before = find_team(store, id_or_name).await?;
    let mut team = before.clone();
    team.limits = limits.apply(&team.limits)?;
    store.update_team(&team).await?;
    record(
        store,
        actor,
        "team.update",
        &team.id,
        Some(&before),
        Some(&team),
    )
    .await?;
    Ok(team)
}

pub async fn find_team(store: &dyn Store, id_or_name: &str) -> Result<Team, TenantError> {
    store
        .find_team(id_or_name)
        .await?
        .ok_or_else(|| TenantError::NotFound("team", id_or_name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_keeps_removes_and_sets() {
        let current = Limits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(1000),
            ..Limits::default()
        };
        let patch: LimitsPatch =
            serde_json::from_str(r#"{"requests_per_minute": 20, "tokens_per_minute": null}"#)
                .unwrap();
        let patched = patch.apply(&current).unwrap();
        assert_eq!(patched.requests_per_minute, Some(20));
        assert_eq!(patched.tokens_per_minute, None);
        let zero: LimitsPatch = serde_json::from_str(r#"{"max_concurrent": 0}"#).unwrap();
        assert!(zero.apply(&current).is_err());
        assert!(serde_json::from_str::<LimitsPatch>(r#"{"requests_per_minute": -1}"#).is_err());
        assert!(serde_json::from_str::<LimitsPatch>(r#"{"rpm": 1}"#).is_err());
    }
}
