//! The audit log, newest first: who changed which key or team, when, and
//! what changed (each field's value before and after).

use askama::Template;
use axum::Extension;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::Value;

use super::session::SignedIn;
use super::{Layout, Page, Shared, html};
use crate::backends::store::audit::{AuditEntry, AuditQuery};

const PAGE: i64 = 50;

#[derive(Debug, Default, Deserialize)]
pub struct Params {
    #[serde(default)]
    target: String,
    before: Option<i64>,
}

pub struct Entry {
    pub entry: AuditEntry,
    /// `field: before → after`, for each field that changed.
    pub changes: Vec<String>,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    layout: Layout,
    target: String,
    entries: Vec<Entry>,
    older: Option<String>,
}

fn show(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "–".into(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// The fields that differ between two records (limits field by field).
fn changes(before: Option<&Value>, after: Option<&Value>) -> Vec<String> {
    let empty = serde_json::Map::new();
    let fields = |v: Option<&Value>| {
        v.and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(|| empty.clone())
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
            let nested = changes(old, new);
            out.extend(nested.into_iter().map(|c| format!("limits.{c}")));
            continue;
        }
        out.push(format!("{name}: {} → {}", show(old), show(new)));
    }
    out
}

pub async fn page(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Query(params): Query<Params>,
) -> Page {
    let target = params.target.trim().to_string();
    let query = AuditQuery {
        before_id: params.before,
        target: (!target.is_empty()).then(|| target.clone()),
        limit: PAGE,
    };
    let entries = console.store.audit_entries(&query).await?;
    let older = (entries.len() as i64 == PAGE)
        .then(|| entries.last().map(|e| e.id))
        .flatten()
        .map(|id| {
            let target: String = url::form_urlencoded::byte_serialize(target.as_bytes()).collect();
            format!("/console/audit?target={target}&before={id}")
        });
    html(&AuditPage {
        layout: Layout::new("audit", "Audit log", &signed_in),
        target,
        entries: entries
            .into_iter()
            .map(|entry| Entry {
                changes: changes(entry.before.as_ref(), entry.after.as_ref()),
                entry,
            })
            .collect(),
        older,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changes_name_each_field_that_moved() {
        let before = json!({"name": "a", "limits": {"requests_per_minute": 2}, "revoked_at": null});
        let after = json!({"name": "a", "limits": {"requests_per_minute": 5, "models": ["m"]}, "revoked_at": "2026-12-07T10:00:00Z"});
        assert_eq!(
            changes(Some(&before), Some(&after)),
            [
                "limits.models: – → [\"m\"]",
                "limits.requests_per_minute: 2 → 5",
                "revoked_at: – → 2026-12-07T10:00:00Z"
            ]
        );
    }
}
