//! Operational endpoints: liveness (`/health`, and vLLM's `/ping`), the
//! gateway's version, readiness per backend, Prometheus metrics.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Edge;
use crate::observe::metrics::MetricsRegistry;
use crate::pipeline::state::Stages;

/// How long a readiness check waits for each backend.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: the process is up and serving HTTP.
pub async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// vLLM's `/ping` (a load balancer's or SageMaker's liveness probe): 200, empty.
pub async fn ping() -> StatusCode {
    StatusCode::OK
}

/// `/version`, in vLLM's shape: the version of the gateway answering (a
/// fleet's replicas may run different vLLM versions; each says its own).
pub async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

pub async fn check<E: std::fmt::Display>(
    check: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

/// What each backend answered to one check.
pub struct Checks {
    pub store: Result<(), String>,
    pub queue: Result<(), String>,
    /// `None` when there is no cache.
    pub cache: Option<Result<(), String>>,
}

/// Checks each backend and sets `sluice_backend_up` from the answers. Run by
/// `/ready` and, every few seconds, in the background, so the gauges are
/// current whether or not anyone asks.
pub async fn check_backends(state: &Stages) -> Checks {
    let store = check(state.store.ping()).await;
    let queue = check(state.queue.ping()).await;
    let cache = match &state.cache {
        Some(cache) => Some(check(cache.ping()).await),
        None => None,
    };
    let metrics = &state.registry;
    metrics
        .backend_up
        .with_label_values(&["store"])
        .set(i64::from(store.is_ok()));
    metrics
        .backend_up
        .with_label_values(&["queue"])
        .set(i64::from(queue.is_ok()));
    if let Some(cache) = &cache {
        metrics
            .backend_up
            .with_label_values(&["cache"])
            .set(i64::from(cache.is_ok()));
    }
    Checks {
        store,
        queue,
        cache,
    }
}

/// Readiness: each backend answers. The cache is optional, so a cache
/// failure degrades the answer but does not fail it.
pub async fn ready(State(edge): State<Arc<Edge>>) -> Response {
    let state = &edge.stages;
    let Checks {
        store,
        queue,
        cache,
    } = check_backends(state).await;
    let describe = |result: &Result<(), String>| match result {
        Ok(()) => json!({"status": "ok"}),
        Err(err) => json!({"status": "error", "error": err}),
    };
    // Each model's endpoints taking requests (in-process worker only: a
    // standalone worker holds its own).
    let mut models_ready = true;
    let models: serde_json::Map<String, serde_json::Value> = state
        .fleet
        .iter()
        .flat_map(|fleet| fleet.models())
        .map(|pool| {
            let healthy = pool.healthy();
            models_ready &= healthy > 0;
            let name = if pool.name.is_empty() { "*" } else { pool.name.as_str() };
            let endpoints: Vec<_> = pool
                .endpoints
                .iter()
                .map(|e| json!({"url": e.url.as_str(), "up": e.available(), "in_flight": e.in_flight()}))
                .collect();
            (
                name.to_string(),
                json!({"status": if healthy > 0 { "ok" } else { "error" }, "healthy": healthy, "endpoints": endpoints}),
            )
        })
        .collect();
    let ready = store.is_ok() && queue.is_ok() && models_ready;
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "backends": {
            "store": describe(&store),
            "queue": describe(&queue),
            "cache": cache.as_ref().map_or(json!({"status": "disabled"}), describe),
        },
        "models": models,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub async fn metrics(State(edge): State<Arc<Edge>>) -> Response {
    render_metrics(&edge.stages.registry)
}

pub fn render_metrics(metrics: &MetricsRegistry) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}
