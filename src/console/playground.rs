//! The playground: pick a model, write a conversation, watch the answer
//! stream. The page's script posts to `/console/playground/chat`, which
//! sends the request through the public API's own routes, in process (the
//! same authentication, limits, plugins, cache and inference log as any
//! client's), with a key the operator pastes or a short-lived one the
//! console makes for the session. Nothing is stored beyond the inference log.

use askama::Template;
use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, header};
use axum::response::IntoResponse;
use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::session::SignedIn;
use super::{Console, Layout, Page, Problem, Shared, html};
use crate::error::GatewayError;
use crate::tenancy::tenants::{self, KeyPatch};
use crate::tenancy::{Identity, Limits};

#[derive(Template)]
#[template(path = "playground.html")]
struct PlaygroundPage {
    layout: Layout,
    models: Vec<String>,
    key_ttl_minutes: u64,
}

/// The models the fleet serves, as `/v1/models` lists them to a key without restrictions.
async fn models(console: &Console) -> Vec<String> {
    let anyone = Identity {
        key_id: String::new(),
        key_name: "console".into(),
        limits: Limits::default(),
        team: None,
    };
    let Ok(list) = console.edge.stages.models.list_for(&anyone).await else {
        return Vec::new();
    };
    serde_json::from_slice::<Value>(&list)
        .ok()
        .and_then(|list| {
            list["data"].as_array().map(|models| {
                models
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

pub async fn page(State(console): Shared, Extension(signed_in): Extension<SignedIn>) -> Page {
    html(&PlaygroundPage {
        layout: Layout::new("playground", "Playground", &signed_in),
        models: models(&console).await,
        key_ttl_minutes: console.config.playground_key_ttl.as_secs() / 60,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ask {
    model: String,
    messages: Vec<Value>,
    /// An API key's secret; empty or absent: the session's short-lived key.
    #[serde(default)]
    key: Option<SecretString>,
    #[serde(default)]
    max_tokens: Option<u32>,
}

/// The session's playground key, made on first use and again once expired.
async fn session_key(console: &Console, signed_in: &SignedIn) -> Result<SecretString, Problem> {
    if let Some((id, secret)) = &signed_in.session.playground_key {
        let live = tenants::find_key(console.store.as_ref(), id)
            .await
            .ok()
            .is_some_and(|k| {
                k.revoked_at.is_none() && k.expires_at.is_none_or(|at| at > Utc::now())
            });
        if live {
            return Ok(secret.clone());
        }
    }
    let expires = Utc::now()
        + chrono::Duration::from_std(console.config.playground_key_ttl)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
    let patch = KeyPatch {
        expires_at: Some(Some(expires)),
        ..KeyPatch::default()
    };
    let name = format!(
        "console-playground-{}-{}",
        signed_in.session.label,
        Utc::now().timestamp()
    );
    let created = tenants::create_key(
        console.store.as_ref(),
        &signed_in.session.actor(),
        &name,
        &patch,
        None,
    )
    .await?;
    let secret = SecretString::from(created.secret);
    console
        .sessions
        .set_playground_key(&signed_in.id_hash, (created.id, secret.clone()));
    Ok(secret)
}

/// Streams the answer as the public API does (SSE, with `x-request-id`).
pub async fn chat(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    axum::Json(ask): axum::Json<Ask>,
) -> Page {
    let secret = match ask.key.filter(|k| !k.expose_secret().trim().is_empty()) {
        Some(key) => key,
        None => session_key(&console, &signed_in).await?,
    };
    let mut body = json!({
        "model": ask.model,
        "messages": ask.messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(max_tokens) = ask.max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", secret.expose_secret().trim()),
        )
        .body(Body::from(body.to_string()))
        .map_err(|e| GatewayError::BadRequest(format!("cannot send that key: {e}")))?;
    let response = match console.public.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    Ok(response.into_response())
}
