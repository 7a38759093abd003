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

use super::{
    ActiveKey, ApiKey, InferenceRecord, KeyUsage, Limits, NewApiKey, Store, StoreError, Team,
};

const INSERT_KEY: &str = "INSERT INTO api_keys (id, name, key_hash, created_at, limits, team_id, expires_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
const KEY_COLUMNS: &str =
    "k.id, k.name, k.created_at, k.revoked_at, k.limits, k.team_id, k.expires_at";
const UPDATE_KEY: &str =
    "UPDATE api_keys SET limits = $1, team_id = $2, expires_at = $3 WHERE id = $4";
const REVOKE_KEY: &str =
    "UPDATE api_keys SET revoked_at = $1 WHERE (id = $2 OR name = $2) AND revoked_at IS NULL";
const INSERT_TEAM: &str =
    "INSERT INTO teams (id, name, limits, created_at) VALUES ($1, $2, $3, $4)";
const TEAM_COLUMNS: &str = "id, name, limits, created_at";
const UPDATE_TEAM: &str = "UPDATE teams SET limits = $1 WHERE id = $2";
const INSERT_INFERENCES: &str = "INSERT INTO inference_logs (request_id, key_id, route, model, prompt_tokens, \
     completion_tokens, cache_hit, continuations, status, ttft_ms, total_ms, created_at) ";
const INFERENCES_FOR: &str = "SELECT request_id, key_id, route, model, prompt_tokens, completion_tokens, cache_hit, \
     continuations, status, ttft_ms, total_ms, created_at FROM inference_logs WHERE request_id = $1";
const KEY_USAGE: &str = "SELECT l.key_id AS key_id, MAX(k.name) AS name, COUNT(*) AS requests, \
     CAST(COALESCE(SUM(CASE WHEN l.status BETWEEN 200 AND 299 THEN 1 ELSE 0 END), 0) AS BIGINT) AS served, \
     CAST(COALESCE(SUM(CASE WHEN l.status BETWEEN 400 AND 498 THEN 1 ELSE 0 END), 0) AS BIGINT) AS refused, \
     CAST(COALESCE(SUM(CASE WHEN l.status = 499 THEN 1 ELSE 0 END), 0) AS BIGINT) AS client_closed, \
     CAST(COALESCE(SUM(CASE WHEN l.status >= 500 THEN 1 ELSE 0 END), 0) AS BIGINT) AS failed, \
     CAST(COALESCE(SUM(CASE WHEN l.cache_hit THEN 1 ELSE 0 END), 0) AS BIGINT) AS cache_hits, \
     CAST(COALESCE(SUM(l.prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
     CAST(COALESCE(SUM(l.completion_tokens), 0) AS BIGINT) AS completion_tokens \
     FROM inference_logs l LEFT JOIN api_keys k ON k.id = l.key_id \
     WHERE l.created_at >= $1 GROUP BY l.key_id ORDER BY l.key_id";

/// Rows per multi-row INSERT (well under both databases' bind-parameter limits).
const INSERT_BATCH: usize = 500;

/// An `api_keys` row, with the team's columns when joined.
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    name: String,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    limits: Option<String>,
    team_id: Option<String>,
    expires_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct TeamRow {
    id: String,
    name: String,
    limits: Option<String>,
    created_at: DateTime<Utc>,
}

/// Limits as stored: JSON, or NULL for none of its own.
fn parse_limits(owner: &str, json: Option<String>) -> Result<Limits, StoreError> {
    match json {
        None => Ok(Limits::default()),
        Some(json) => serde_json::from_str(&json)
            .map_err(|err| StoreError::BadLimits(owner.to_string(), err.to_string())),
    }
}

fn limits_json(limits: &Limits) -> Option<String> {
    (limits != &Limits::default()).then(|| serde_json::to_string(limits).unwrap_or_default())
}

impl KeyRow {
    fn into_key(self) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            limits: parse_limits(&self.name, self.limits)?,
            id: self.id,
            name: self.name,
            created_at: self.created_at,
            revoked_at: self.revoked_at,
            team_id: self.team_id,
            expires_at: self.expires_at,
        })
    }
}

impl TeamRow {
    fn into_team(self) -> Result<Team, StoreError> {
        Ok(Team {
            limits: parse_limits(&self.name, self.limits)?,
            id: self.id,
            name: self.name,
            created_at: self.created_at,
        })
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    unique_violation(err).is_some()
}

/// A unique-constraint violation's message (it names the column: `key_hash`
/// in SQLite's `api_keys.key_hash`, PostgreSQL's `api_keys_key_hash_key`).
fn unique_violation(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) if db.is_unique_violation() => Some(format!(
            "{} {}",
            db.message(),
            db.constraint().unwrap_or_default()
        )),
        _ => None,
    }
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
                    .bind(limits_json(&key.limits))
                    .bind(&key.team_id)
                    .bind(key.expires_at)
                    .execute(&self.pool)
                    .await
                    .map_err(|err| match unique_violation(&err) {
                        Some(column) if column.contains("key_hash") => StoreError::DuplicateSecret,
                        Some(_) => StoreError::DuplicateName(key.name.clone()),
                        None => StoreError::Query(err),
                    })?;
                Ok(())
            }

            async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
                let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys k ORDER BY k.created_at, k.id");
                let rows: Vec<KeyRow> = sqlx::query_as(&sql).fetch_all(&self.pool).await?;
                rows.into_iter().map(KeyRow::into_key).collect()
            }

            async fn find_key(&self, id_or_name: &str) -> Result<Option<ApiKey>, StoreError> {
                // The active key first when a revoked one had the same name.
                let sql = format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $1 OR k.name = $1 \
                     ORDER BY k.revoked_at IS NULL DESC, k.created_at DESC"
                );
                let row: Option<KeyRow> = sqlx::query_as(&sql)
                    .bind(id_or_name)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(KeyRow::into_key).transpose()
            }

            async fn update_key(&self, key: &ApiKey) -> Result<(), StoreError> {
                sqlx::query(UPDATE_KEY)
                    .bind(limits_json(&key.limits))
                    .bind(&key.team_id)
                    .bind(key.expires_at)
                    .bind(&key.id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn insert_team(&self, team: &Team) -> Result<(), StoreError> {
                sqlx::query(INSERT_TEAM)
                    .bind(&team.id)
                    .bind(&team.name)
                    .bind(limits_json(&team.limits))
                    .bind(team.created_at)
                    .execute(&self.pool)
                    .await
                    .map_err(|err| {
                        if is_unique_violation(&err) {
                            StoreError::DuplicateName(team.name.clone())
                        } else {
                            StoreError::Query(err)
                        }
                    })?;
                Ok(())
            }

            async fn list_teams(&self) -> Result<Vec<Team>, StoreError> {
                let sql = format!("SELECT {TEAM_COLUMNS} FROM teams ORDER BY created_at, id");
                let rows: Vec<TeamRow> = sqlx::query_as(&sql).fetch_all(&self.pool).await?;
                rows.into_iter().map(TeamRow::into_team).collect()
            }

            async fn find_team(&self, id_or_name: &str) -> Result<Option<Team>, StoreError> {
                let sql = format!("SELECT {TEAM_COLUMNS} FROM teams WHERE id = $1 OR name = $1");
                let row: Option<TeamRow> = sqlx::query_as(&sql)
                    .bind(id_or_name)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(TeamRow::into_team).transpose()
            }

            async fn update_team(&self, team: &Team) -> Result<(), StoreError> {
                sqlx::query(UPDATE_TEAM)
                    .bind(limits_json(&team.limits))
                    .bind(&team.id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn revoke_key(&self, id_or_name: &str) -> Result<u64, StoreError> {
                let result = sqlx::query(REVOKE_KEY)
                    .bind(Utc::now())
                    .bind(id_or_name)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected())
            }

            async fn find_active_key(&self, key_hash: &str) -> Result<Option<ActiveKey>, StoreError> {
                let sql = format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.key_hash = $1 AND k.revoked_at IS NULL"
                );
                let row: Option<KeyRow> = sqlx::query_as(&sql)
                    .bind(key_hash)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(key) = row.map(KeyRow::into_key).transpose()? else {
                    return Ok(None);
                };
                let team = match &key.team_id {
                    Some(team_id) => self.find_team(team_id).await?,
                    None => None,
                };
                Ok(Some(ActiveKey { key, team }))
            }

            async fn insert_inferences(&self, rows: &[InferenceRecord]) -> Result<(), StoreError> {
                for batch in rows.chunks(INSERT_BATCH) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(INSERT_INFERENCES);
                    query.push_values(batch, |mut row, r| {
                        row.push_bind(&r.request_id)
                            .push_bind(&r.key_id)
                            .push_bind(&r.route)
                            .push_bind(&r.model)
                            .push_bind(r.prompt_tokens)
                            .push_bind(r.completion_tokens)
                            .push_bind(r.cache_hit)
                            .push_bind(r.continuations)
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

            async fn close(&self) {
                self.pool.close().await;
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
