//! Usage over time from the inference log: requests, tokens, cache hits and
//! failures per hour or day, per key, team or model, aggregated in SQL.
//! One key's range reads the (key, time) index (on PostgreSQL an
//! index-only scan: the index carries every column summed); a range over
//! all keys reads the time index.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{PostgresStore, SqliteStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    #[default]
    Hour,
    Day,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UsageGroup {
    #[default]
    Key,
    Team,
    Model,
}

impl Granularity {
    /// As the query string and CSV name it: `hour`, `day`.
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

impl UsageGroup {
    /// As the query string names it: `key`, `team`, `model`.
    pub fn name(self) -> &'static str {
        match self {
            UsageGroup::Key => "key",
            UsageGroup::Team => "team",
            UsageGroup::Model => "model",
        }
    }
}

/// A range of the inference log, filtered and grouped.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub granularity: Granularity,
    pub group: UsageGroup,
    pub key_id: Option<String>,
    pub team_id: Option<String>,
    pub model: Option<String>,
}

/// One bucket of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct UsageRow {
    /// `2026-12-07T10` (hours) or `2026-12-07` (days), in UTC.
    pub bucket: String,
    /// The key's id, the team's id (empty: keys of no team) or the model.
    pub group_id: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cache_hits: i64,
    /// Answered with 5xx.
    pub failed: i64,
}

#[async_trait]
pub trait UsageStore {
    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;
}

const SUMS: &str = "COUNT(*) AS requests, \
     CAST(COALESCE(SUM(l.prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
     CAST(COALESCE(SUM(l.completion_tokens), 0) AS BIGINT) AS completion_tokens, \
     CAST(COALESCE(SUM(CASE WHEN l.cache_hit THEN 1 ELSE 0 END), 0) AS BIGINT) AS cache_hits, \
     CAST(COALESCE(SUM(CASE WHEN l.status >= 500 THEN 1 ELSE 0 END), 0) AS BIGINT) AS failed";

macro_rules! usage_store {
    ($name:ident, $db:ty, $hour:literal, $day:literal) => {
        #[async_trait]
        impl UsageStore for $name {
            async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
                let bucket = match query.granularity {
                    Granularity::Hour => $hour,
                    Granularity::Day => $day,
                };
                let group = match query.group {
                    UsageGroup::Key => "l.key_id",
                    UsageGroup::Team => "COALESCE(k.team_id, '')",
                    UsageGroup::Model => "l.model",
                };
                let mut sql = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {bucket} AS bucket, {group} AS group_id, {SUMS} FROM inference_logs l "
                ));
                if query.group == UsageGroup::Team {
                    sql.push("LEFT JOIN api_keys k ON k.id = l.key_id ");
                }
                sql.push("WHERE l.created_at >= ")
                    .push_bind(query.from)
                    .push(" AND l.created_at < ")
                    .push_bind(query.to);
                if let Some(key) = &query.key_id {
                    sql.push(" AND l.key_id = ").push_bind(key.clone());
                }
                if let Some(team) = &query.team_id {
                    sql.push(" AND l.key_id IN (SELECT id FROM api_keys WHERE team_id = ")
                        .push_bind(team.clone())
                        .push(")");
                }
                if let Some(model) = &query.model {
                    sql.push(" AND l.model = ").push_bind(model.clone());
                }
                sql.push(" GROUP BY 1, 2 ORDER BY 1, 2");
                let mut rows: Vec<UsageRow> = sql.build_query_as().fetch_all(self.pool()).await?;
                for row in &mut rows {
                    // SQLite keeps times as text, some with a space for the `T`.
                    row.bucket = row.bucket.replace(' ', "T");
                }
                Ok(rows)
            }
        }
    };
}

usage_store!(
    SqliteStore,
    sqlx::Sqlite,
    "substr(l.created_at, 1, 13)",
    "substr(l.created_at, 1, 10)"
);
usage_store!(
    PostgresStore,
    sqlx::Postgres,
    "to_char(l.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24')",
    "to_char(l.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
);
