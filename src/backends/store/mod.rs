//! The `Store` stage: API keys, teams and inference logs, behind one trait with a
//! SQLite implementation (embedded mode) and a PostgreSQL one (production).
//! Both run the same SQL; only the migrations differ. The files and
//! batches of OpenAI's Batch API are kept in the same database ([`batches`]),
//! as are the audit log of changes to tenants ([`audit`]) and the usage
//! aggregations the console reads ([`usage`]).

pub mod audit;
mod batch_sql;
pub mod batches;
mod config;
pub mod inference_log;
mod limits;
mod sql;
pub mod usage;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use secrecy::ExposeSecret;

use crate::settings::redact_url;

pub use config::{StoreConfig, StoreKind};
pub use limits::Limits;
pub use sql::{PostgresStore, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the {backend} store at {url}: {source}")]
    Connect {
        backend: &'static str,
        url: String,
        source: sqlx::Error,
    },
    #[error("a key or team named `{0}` already exists")]
    DuplicateName(String),
    #[error("a key with this secret already exists")]
    DuplicateSecret,
    #[error("stored limits of `{0}` are not valid JSON limits: {1}")]
    BadLimits(String, String),
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
}

/// An API key as listed: never the secret, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The key's own limits (unset fields: the configured defaults apply).
    pub limits: Limits,
    pub team_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A group of keys with limits of its own, checked beside each key's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub limits: Limits,
    pub created_at: DateTime<Utc>,
}

/// A key to insert: the hash of its secret, not the secret.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub created_at: DateTime<Utc>,
    pub limits: Limits,
    pub team_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// An active key found by its secret, with its team if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveKey {
    pub key: ApiKey,
    pub team: Option<Team>,
}

/// One completion request, as logged.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct InferenceRecord {
    pub request_id: String,
    pub key_id: String,
    /// The path the request was sent to (`/v1/chat/completions`, `/v1/embeddings`, ...).
    pub route: String,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cache_hit: bool,
    /// Times the stream was continued on another replica after its own
    /// failed mid-answer.
    pub continuations: i32,
    /// HTTP status, or 499 when the client went away first.
    pub status: i32,
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
    pub created_at: DateTime<Utc>,
}

/// The requests of one key in the inference log, by outcome, and their tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct KeyUsage {
    pub key_id: String,
    pub name: Option<String>,
    /// Every request logged: `served + refused + client_closed + failed`.
    pub requests: i64,
    /// Answered (2xx).
    pub served: i64,
    /// Refused before an answer (4xx: limits, unknown models, bad requests).
    pub refused: i64,
    /// Abandoned by their client before the end (499).
    pub client_closed: i64,
    /// Failed (5xx: the upstream, the queue, a fail-closed plugin).
    pub failed: i64,
    pub cache_hits: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

#[async_trait]
pub trait Store:
    batches::BatchStore + audit::AuditStore + usage::UsageStore + Send + Sync + 'static
{
    async fn insert_key(&self, key: &NewApiKey) -> Result<(), StoreError>;
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError>;
    /// The key with this id or name, revoked or not.
    async fn find_key(&self, id_or_name: &str) -> Result<Option<ApiKey>, StoreError>;
    /// Writes a key's limits, team and expiry.
    async fn update_key(&self, key: &ApiKey) -> Result<(), StoreError>;
    /// Revokes the active key with this id or name; returns how many were revoked.
    async fn revoke_key(&self, id_or_name: &str) -> Result<u64, StoreError>;
    /// The active (not revoked) key whose secret hashes to `key_hash`, with its team.
    async fn find_active_key(&self, key_hash: &str) -> Result<Option<ActiveKey>, StoreError>;
    async fn insert_team(&self, team: &Team) -> Result<(), StoreError>;
    async fn list_teams(&self) -> Result<Vec<Team>, StoreError>;
    /// The team with this id or name.
    async fn find_team(&self, id_or_name: &str) -> Result<Option<Team>, StoreError>;
    async fn update_team(&self, team: &Team) -> Result<(), StoreError>;
    async fn insert_inferences(&self, rows: &[InferenceRecord]) -> Result<(), StoreError>;
    async fn inferences_for(&self, request_id: &str) -> Result<Vec<InferenceRecord>, StoreError>;
    async fn key_usage(&self, since: Option<DateTime<Utc>>) -> Result<Vec<KeyUsage>, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    /// Closes every connection (SQLite then folds its write-ahead log back
    /// into the database file). Calls after it fail.
    async fn close(&self);
}

/// Connects to the configured store and applies its migrations.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = match config.kind() {
        StoreKind::Sqlite => Arc::new(
            SqliteStore::connect(config.url.expose_secret(), config.max_connections.get())
                .await
                .map_err(|source| StoreError::Connect {
                    backend: "SQLite",
                    url: redact_url(config.url.expose_secret()),
                    source,
                })?,
        ),
        StoreKind::Postgres => Arc::new(
            PostgresStore::connect(config.url.expose_secret(), config.max_connections.get())
                .await
                .map_err(|source| StoreError::Connect {
                    backend: "PostgreSQL",
                    url: redact_url(config.url.expose_secret()),
                    source,
                })?,
        ),
    };
    Ok(store)
}
