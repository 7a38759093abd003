//! The admin API, on its own listener (`[admin] listen`): keys and teams,
//! their limits and usage, as JSON, behind a bearer token compared in
//! constant time with the SHA-256 kept from `admin.token`. Errors have the
//! OpenAI shape, like every other answer of the gateway.
//!
//! | route | |
//! |---|---|
//! | `POST /admin/keys` | `{"name", "team"?, "expires_at"?, "limits"?}` → 201 with the secret (shown once) |
//! | `GET /admin/keys`, `GET /admin/keys/{id}` | keys (never secrets) |
//! | `PATCH /admin/keys/{id}` | `{"limits"?, "team"?, "expires_at"?}`; `null` removes |
//! | `DELETE /admin/keys/{id}` | revokes (within a second) |
//! | `GET /admin/keys/{id}/usage[?since=RFC3339]` | requests by outcome, cache hits, tokens |
//! | `POST /admin/teams`, `GET /admin/teams`, `GET`/`PATCH /admin/teams/{id}` | teams and their limits |
//! | `GET /admin/teams/{id}/usage[?since=]` | the team's keys' usage, summed |
//! | `GET /admin/audit[?target=&before=&limit=]` | changes to keys and teams, newest first: who, what, when, before and after |
//!
//! Every change is made by [`tenants`] and recorded in the audit log with
//! the admin token as its actor.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::backends::store::audit::AuditQuery;
use crate::backends::store::{ApiKey, KeyUsage, Store};
use crate::error::GatewayError;
use crate::tenancy::audit::Actor;
use crate::tenancy::keys::hash_secret;
use crate::tenancy::tenants::{self, KeyPatch, LimitsPatch};

struct Admin {
    store: Arc<dyn Store>,
    /// The token's SHA-256, as API keys are kept.
    token_hash: String,
}

/// The admin router, or `None` when no token is configured.
pub fn router(store: Arc<dyn Store>, config: &super::AdminConfig) -> Option<Router> {
    let token = config.token.as_ref()?;
    let admin = Arc::new(Admin {
        store,
        token_hash: hash_secret(token.expose_secret()),
    });
    Some(
        Router::new()
            .route("/admin/keys", get(list_keys).post(create_key))
            .route(
                "/admin/keys/{id}",
                get(show_key).patch(update_key).delete(revoke_key),
            )
            .route("/admin/keys/{id}/usage", get(key_usage))
            .route("/admin/teams", get(list_teams).post(create_team))
            .route("/admin/teams/{id}", get(show_team).patch(update_team))
            .route("/admin/teams/{id}/usage", get(team_usage))
            .route("/admin/audit", get(audit))
            .fallback(|| async { GatewayError::NotFound("no such admin route".into()) })
            .method_not_allowed_fallback(|| async { GatewayError::MethodNotAllowed })
            .layer(middleware::from_fn_with_state(admin.clone(), authorize))
            .with_state(admin),
    )
}

/// Refuses requests without the admin token (401, in constant time).
async fn authorize(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let presented = hash_secret(presented);
    if !bool::from(presented.as_bytes().ct_eq(admin.token_hash.as_bytes())) {
        return GatewayError::Unauthorized("missing or wrong admin token").into_response();
    }
    next.run(request).await
}

/// A JSON body, or a 400 naming the field at fault.
fn body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, GatewayError> {
    crate::protocol::parse_body(body)
}

type Answer = Result<Response, GatewayError>;

fn ok(value: impl serde::Serialize) -> Answer {
    Ok(Json(value).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    limits: LimitsPatch,
    #[serde(default)]
    team: Option<String>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    /// A secret the operator brings (from another gateway); unset: a new one.
    #[serde(default)]
    secret: Option<secrecy::SecretString>,
}

async fn create_key(State(admin): State<Arc<Admin>>, request: Bytes) -> Answer {
    let NewKey {
        name,
        limits,
        team,
        expires_at,
        secret,
    } = body(&request)?;
    let patch = KeyPatch {
        limits,
        team: Some(team),
        expires_at: Some(expires_at),
    };
    let secret = secret.as_ref().map(ExposeSecret::expose_secret);
    let created = tenants::create_key(
        admin.store.as_ref(),
        &Actor::AdminApi,
        &name,
        &patch,
        secret,
    )
    .await?;
    let key = tenants::find_key(admin.store.as_ref(), &created.id).await?;
    let mut answer =
        serde_json::to_value(&key).map_err(|e| GatewayError::Internal(e.to_string()))?;
    answer["secret"] = json!(created.secret);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn list_keys(State(admin): State<Arc<Admin>>) -> Answer {
    ok(json!({"object": "list", "data": admin.store.list_keys().await.map_err(backend)?}))
}

async fn show_key(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Answer {
    ok(tenants::find_key(admin.store.as_ref(), &id).await?)
}

async fn update_key(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    request: Bytes,
) -> Answer {
    let patch = body(&request)?;
    ok(tenants::update_key(admin.store.as_ref(), &Actor::AdminApi, &id, &patch).await?)
}

async fn revoke_key(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Answer {
    ok(tenants::revoke_key(admin.store.as_ref(), &Actor::AdminApi, &id).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Since {
    since: Option<DateTime<Utc>>,
}

fn since(
    query: Result<Query<Since>, QueryRejection>,
) -> Result<Option<DateTime<Utc>>, GatewayError> {
    query
        .map(|Query(Since { since })| since)
        .map_err(|rejection| GatewayError::BadRequest(rejection.body_text()))
}

/// The usage of `keys`, summed.
async fn usage_of(store: &dyn Store, keys: &[ApiKey], since: Option<DateTime<Utc>>) -> Answer {
    let rows: Vec<KeyUsage> = store.key_usage(since).await.map_err(backend)?;
    let mine = rows
        .iter()
        .filter(|row| keys.iter().any(|k| k.id == row.key_id));
    let mut sum = [0i64; 8];
    for row in mine {
        let counts = [
            row.requests,
            row.served,
            row.refused,
            row.client_closed,
            row.failed,
            row.cache_hits,
            row.prompt_tokens,
            row.completion_tokens,
        ];
        for (total, count) in sum.iter_mut().zip(counts) {
            *total += count;
        }
    }
    let [
        requests,
        served,
        refused,
        client_closed,
        failed,
        cache_hits,
        prompt,
        completion,
    ] = sum;
    ok(json!({
        "since": since,
        "requests": requests,
        "served": served,
        "refused": refused,
        "client_closed": client_closed,
        "failed": failed,
        "cache_hits": cache_hits,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }))
}

async fn key_usage(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    query: Result<Query<Since>, QueryRejection>,
) -> Answer {
    let since = since(query)?;
    let key = tenants::find_key(admin.store.as_ref(), &id).await?;
    usage_of(admin.store.as_ref(), &[key], since).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTeam {
    name: String,
    #[serde(default)]
    limits: LimitsPatch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeamPatch {
    #[serde(default)]
    limits: LimitsPatch,
}

async fn create_team(State(admin): State<Arc<Admin>>, request: Bytes) -> Answer {
    let NewTeam { name, limits } = body(&request)?;
    let team = tenants::create_team(admin.store.as_ref(), &Actor::AdminApi, &name, &limits).await?;
    Ok((StatusCode::CREATED, Json(team)).into_response())
}

async fn list_teams(State(admin): State<Arc<Admin>>) -> Answer {
    ok(json!({"object": "list", "data": admin.store.list_teams().await.map_err(backend)?}))
}

async fn show_team(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Answer {
    ok(tenants::find_team(admin.store.as_ref(), &id).await?)
}

async fn update_team(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    request: Bytes,
) -> Answer {
    let TeamPatch { limits } = body(&request)?;
    ok(tenants::update_team(admin.store.as_ref(), &Actor::AdminApi, &id, &limits).await?)
}

async fn team_usage(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    query: Result<Query<Since>, QueryRejection>,
) -> Answer {
    let since = since(query)?;
    let team = tenants::find_team(admin.store.as_ref(), &id).await?;
    let keys: Vec<ApiKey> = admin
        .store
        .list_keys()
        .await
        .map_err(backend)?
        .into_iter()
        .filter(|k| k.team_id.as_deref() == Some(team.id.as_str()))
        .collect();
    usage_of(admin.store.as_ref(), &keys, since).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    target: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

/// The audit log, newest first; `before` (an entry's id) pages back.
async fn audit(
    State(admin): State<Arc<Admin>>,
    query: Result<Query<AuditParams>, QueryRejection>,
) -> Answer {
    let Query(params) =
        query.map_err(|rejection| GatewayError::BadRequest(rejection.body_text()))?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(GatewayError::BadRequest("limit must be 1 to 1000".into()));
    }
    let query = AuditQuery {
        before_id: params.before,
        target: params.target,
        limit,
    };
    let entries = admin.store.audit_entries(&query).await.map_err(backend)?;
    let has_more = entries.len() as i64 == limit;
    ok(json!({"object": "list", "data": entries, "has_more": has_more}))
}

fn backend(err: crate::backends::store::StoreError) -> GatewayError {
    tenants::TenantError::Store(err).into()
}
