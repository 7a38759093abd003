//! SQLite and PostgreSQL implementations of [`Store`]. The SQL is written once
//! (sqlx accepts `$N` placeholders on both) and instantiated per database by
//! `sql_store!`; queries are checked at runtime so builds need no database.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use super::{ApiKey, InferenceRecord, KeyUsage, NewApiKey, Store, StoreError};

const INSERT_KEY: &str =
    "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES ($1, $2, $3, $4)";
const LIST_KEYS: &str =
    "SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at, id";
const REVOKE_KEY: &str =
    "UPDATE api_keys SET revoked_at = $1 WHERE (id = $2 OR name = $2) AND revoked_at IS NULL";
const FIND_ACTIVE_KEY: &str = "SELECT id, name, created_at, revoked_at FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL";
const INSERT_INFERENCES: &str = "INSERT INTO inference_logs (request_id, key_id, model, prompt_tokens, \
     completion_tokens, cache_hit, status, ttft_ms, total_ms, created_at) ";
const INFERENCES_FOR: &str = "SELECT request_id, key_id, model, prompt_tokens, completion_tokens, cache_hit, \
     status, ttft_ms, total_ms, created_at FROM inference_logs WHERE request_id = $1";
const KEY_USAGE: &str = "SELECT l.key_id AS key_id, MAX(k.name) AS name, COUNT(*) AS requests, \
     CAST(COALESCE(SUM(CASE WHEN l.cache_hit THEN 1 ELSE 0 END), 0) AS BIGINT) AS cache_hits, \
     CAST(COALESCE(SUM(l.prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
     CAST(COALESCE(SUM(l.completion_tokens), 0) AS BIGINT) AS completion_tokens \
     FROM inference_logs l LEFT JOIN api_keys k ON k.id = l.key_id \
     WHERE l.created_at >= $1 GROUP BY l.key_id ORDER BY l.key_id";

/// Rows per multi-row INSERT (well under both databases' bind-parameter limits).
const INSERT_BATCH: usize = 500;

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

macro_rules! sql_store {
    ($name:ident, $pool:ty, $db:ty, $migrations:literal) => {
        pub struct $name {
            pool: $pool,
        }

        impl $name {
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            async fn migrate(pool: &$pool) -> Result<(), sqlx::Error> {
                sqlx::migrate!($migrations)
                    .run(pool)
                    .await
                    .map_err(|e| sqlx::Error::Migrate(Box::new(e)))
            }
        }

        #[async_trait]
        impl Store for $name {
            async fn insert_key(&self, key: &NewApiKey) -> Result<(), StoreError> {
                sqlx::query(INSERT_KEY)
                    .bind(&key.id)
                    .bind(&key.name)
                    .bind(&key.key_hash)
                    .bind(key.created_at)
                    .execute(&self.pool)
                    .await
                    .map_err(|err| {
                        if is_unique_violation(&err) {
                            StoreError::DuplicateName(key.name.clone())
                        } else {
                            StoreError::Query(err)
                        }
                    })?;
                Ok(())
            }

            async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
                Ok(sqlx::query_as(LIST_KEYS).fetch_all(&self.pool).await?)
            }

            async fn revoke_key(&self, id_or_name: &str) -> Result<u64, StoreError> {
                let result = sqlx::query(REVOKE_KEY)
                    .bind(Utc::now())
                    .bind(id_or_name)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected())
            }

            async fn find_active_key(&self, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
                Ok(sqlx::query_as(FIND_ACTIVE_KEY)
                    .bind(key_hash)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn insert_inferences(&self, rows: &[InferenceRecord]) -> Result<(), StoreError> {
                for batch in rows.chunks(INSERT_BATCH) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(INSERT_INFERENCES);
                    query.push_values(batch, |mut row, r| {
                        row.push_bind(&r.request_id)
                            .push_bind(&r.key_id)
                            .push_bind(&r.model)
                            .push_bind(r.prompt_tokens)
                            .push_bind(r.completion_tokens)
                            .push_bind(r.cache_hit)
                            .push_bind(r.status)
                            .push_bind(r.ttft_ms)
                            .push_bind(r.total_ms)
                            .push_bind(r.created_at);
                    });
                    query.build().execute(&self.pool).await?;
                }
                Ok(())
            }

            async fn inferences_for(
                &self,
                request_id: &str,
            ) -> Result<Vec<InferenceRecord>, StoreError> {
                Ok(sqlx::query_as(INFERENCES_FOR)
                    .bind(request_id)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn key_usage(
                &self,
                since: Option<DateTime<Utc>>,
            ) -> Result<Vec<KeyUsage>, StoreError> {
                let since = since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
                Ok(sqlx::query_as(KEY_USAGE)
                    .bind(since)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

sql_store!(SqliteStore, SqlitePool, sqlx::Sqlite, "migrations/sqlite");
sql_store!(PostgresStore, PgPool, sqlx::Postgres, "migrations/postgres");

impl SqliteStore {
    /// Opens (creating if missing) the SQLite file and applies migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await?;
        Self::migrate(&pool).await?;
        Ok(Self { pool })
    }
}

impl PostgresStore {
    /// Connects to PostgreSQL and applies migrations (safe with several edges starting at once).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Self::migrate(&pool).await?;
        Ok(Self { pool })
    }
}
