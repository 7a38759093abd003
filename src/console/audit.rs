//! The audit log, newest first: who changed which key or team, when, and
//! what changed (each field's value before and after).

use askama::Template;
use axum::Extension;
use axum::extract::{Query, State};
use serde::Deserialize;

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

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    layout: Layout,
    target: String,
    entries: Vec<AuditEntry>,
    older: Option<String>,
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
        entries,
        older,
    })
}
