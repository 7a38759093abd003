//! The audit log: one row per change to keys and teams, whoever made it
//! (a console session, the admin token, the command line), with the record
//! as it was before and after, as JSON. Read newest first.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{PostgresStore, SqliteStore, StoreError};

/// A change to record.
#[derive(Debug, Clone)]
pub struct NewAuditEntry {
    pub actor: String,
    /// `key.create`, `key.update`, `key.revoke`, `team.create`, `team.update`.
    pub action: &'static str,
    /// The id of the key or team changed.
    pub target: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// A recorded change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// Which entries to read: newest first, older than `before_id` when set.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub before_id: Option<i64>,
    pub target: Option<String>,
    pub limit: i64,
}

#[async_trait]
pub trait AuditStore {
    async fn record_audit(&self, entry: &NewAuditEntry) -> Result<(), StoreError>;
    async fn audit_entries(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at: DateTime<Utc>,
    actor: String,
    action: String,
    target: String,
    before: Option<String>,
    after: Option<String>,
}

impl AuditEntry {
    /// `field: before → after` for each field that changed (limits field by
    /// field; a missing field and `null` are the same).
    pub fn changes(&self) -> Vec<String> {
        changes(self.before.as_ref(), self.after.as_ref())
    }
}

fn show(value: Option<&serde_json::Value>) -> String {
    match value {
        None | Some(serde_json::Value::Null) => "–".into(),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

fn changes(before: Option<&serde_json::Value>, after: Option<&serde_json::Value>) -> Vec<String> {
    let fields = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let (before, after) = (fields(before), fields(after));
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let old = before.get(name).filter(|v| !v.is_null());
        let new = after.get(name).filter(|v| !v.is_null());
        if old == new {
            continue;
        }
        if name == "limits" {
            out.extend(
                changes(old, new)
                    .into_iter()
                    .map(|change| format!("limits.{change}")),
            );
            continue;
        }
        out.push(format!("{name}: {} → {}", show(old), show(new)));
    }
    out
}

fn json_text(value: &Option<serde_json::Value>) -> Option<String> {
    value.as_ref().map(serde_json::Value::to_string)
}

fn parse_json(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|text| serde_json::from_str(&text).ok())
}

impl From<AuditRow> for AuditEntry {
    fn from(row: AuditRow) -> Self {
        Self {
            id: row.id,
            at: row.at,
            actor: row.actor,
            action: row.action,
            target: row.target,
            before: parse_json(row.before),
            after: parse_json(row.after),
        }
    }
}

macro_rules! audit_store {
    ($name:ident, $db:ty) => {
        #[async_trait]
        impl AuditStore for $name {
            async fn record_audit(&self, entry: &NewAuditEntry) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO audit_log (at, actor, action, target, before, after) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(Utc::now())
                .bind(&entry.actor)
                .bind(entry.action)
                .bind(&entry.target)
                .bind(json_text(&entry.before))
                .bind(json_text(&entry.after))
                .execute(self.pool())
                .await?;
                Ok(())
            }

            async fn audit_entries(
                &self,
                query: &AuditQuery,
            ) -> Result<Vec<AuditEntry>, StoreError> {
                let mut sql = sqlx::QueryBuilder::<$db>::new(
                    "SELECT id, at, actor, action, target, before, after FROM audit_log WHERE 1 = 1",
                );
                if let Some(before) = query.before_id {
                    sql.push(" AND id < ").push_bind(before);
                }
                if let Some(target) = &query.target {
                    sql.push(" AND target = ").push_bind(target.clone());
                }
                sql.push(" ORDER BY id DESC LIMIT ").push_bind(query.limit);
                let rows: Vec<AuditRow> = sql.build_query_as().fetch_all(self.pool()).await?;
                Ok(rows.into_iter().map(AuditEntry::from).collect())
            }
        }
    };
}

audit_store!(SqliteStore, sqlx::Sqlite);
audit_store!(PostgresStore, sqlx::Postgres);

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn changes_name_each_field_that_moved() {
        let before = json!({"name": "a", "limits": {"requests_per_minute": 2}, "revoked_at": null});
        let after = json!({"name": "a", "limits": {"requests_per_minute": 5, "models": ["m"]}, "revoked_at": "2026-12-07T10:00:00Z"});
        assert_eq!(
            super::changes(Some(&before), Some(&after)),
            [
                "limits.models: – → [\"m\"]",
                "limits.requests_per_minute: 2 → 5",
                "revoked_at: – → 2026-12-07T10:00:00Z"
            ]
        );
        // A record created: only what it has.
        let created = json!({"name": "b", "team_id": null});
        assert_eq!(super::changes(None, Some(&created)), ["name: – → b"]);
    }
}
