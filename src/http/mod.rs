//! The HTTP surface: routes, the request-id header, and OpenAI-shaped
//! answers for unknown routes and methods. Handlers are thin: they
//! authenticate, parse, and hand off to the [`pipeline`](crate::pipeline).

mod completions;
mod ops;
pub mod server;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use axum::serve::{Listener, ListenerExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::GatewayError;
use crate::state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/v1/completions",
            post(completions::completions).get(ws::websocket),
        )
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The router of a standalone worker: health and metrics only.
pub fn worker_router(metrics: Arc<crate::metrics::Metrics>) -> Router {
    Router::new()
        .route("/health", get(ops::health))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ops::render_metrics(&metrics) }
            }),
        )
        .fallback(not_found)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    GatewayError::NotFound(format!("no route for {}", uri.path())).into_response()
}

async fn method_not_allowed() -> Response {
    GatewayError::MethodNotAllowed.into_response()
}

/// A new request id: a UUIDv7, so ids sort by time.
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

pub fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Sets TCP_NODELAY on every accepted connection: without it the last small
/// SSE write of a stream waits ~40 ms for a delayed ACK. For the worker's
/// listener and the simulator; the edge's connections go through [`server`].
pub fn nodelay(
    listener: TcpListener,
) -> impl Listener<Io = TcpStream, Addr = std::net::SocketAddr> {
    listener.tap_io(|stream: &mut TcpStream| {
        let _ = stream.set_nodelay(true);
    })
}
