//! The HTTP surface: routes, the request-id header, and OpenAI-shaped
//! answers for unknown routes and methods. Handlers are thin: they
//! authenticate, parse, and hand off to the [`pipeline`](crate::pipeline).

pub mod admin;
mod batches;
mod completions;
mod config;
mod models;
pub mod ops;
mod responses;
mod resume;
pub mod server;
mod state;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpStream};

use crate::error::GatewayError;
use crate::observe::metrics::MetricsRegistry;
use crate::protocol::Route;

pub use config::{AdminConfig, CorsConfig, ServerConfig};
pub use state::{Edge, SocketCounts, SocketPlace};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub fn router(state: Arc<Edge>) -> Router {
    let mut router = Router::new();
    let posted_bodies = Route::ALL.into_iter().filter(|r| {
        !r.generates() && !matches!(r, Route::ResponsesRetrieve | Route::ResponsesCancel)
    });
    for route in posted_bodies {
        router = router.route(
            route.path(),
            post(
                move |state: axum::extract::State<Arc<Edge>>,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Body| {
                    completions::serve(state.0, route, headers, completions::Incoming::Body(body))
                },
            ),
        );
    }
    router
        .route(
            "/v1/completions",
            post(completions::completions).get(ws::completions),
        )
        .route(
            "/v1/chat/completions",
            post(completions::chat_completions).get(ws::chat_completions),
        )
        .route(Route::ResponsesRetrieve.path(), get(responses::retrieve))
        .route(Route::ResponsesCancel.path(), post(responses::cancel))
        .route("/v1/streams/{stream_id}", get(resume::stream))
        .route("/v1/files", post(batches::upload).get(batches::list_files))
        .route(
            "/v1/files/{id}",
            get(batches::file).delete(batches::delete_file),
        )
        .route("/v1/files/{id}/content", get(batches::file_content))
        .route(
            "/v1/batches",
            post(batches::create_batch).get(batches::list_batches),
        )
        .route("/v1/batches/{id}", get(batches::batch))
        .route("/v1/batches/{id}/cancel", post(batches::cancel_batch))
        .route("/v1/models", get(models::list))
        .route("/health", get(ops::health))
        .route("/ping", get(ops::ping).post(ops::ping))
        .route("/version", get(ops::version))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors(&state.cors))
        .with_state(state)
}

/// The CORS layer: preflights are answered here, before authentication and
/// the pipeline. `"*"` for methods and headers mirrors what the preflight
/// asks for (a literal `*` never covers `Authorization`), and `"*"` for
/// origins does too when credentials are allowed (browsers refuse a literal
/// `*` with credentials), as vLLM's server does.
fn cors(config: &CorsConfig) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};
    let any = |list: &[String]| list.iter().any(|item| item == "*");
    let credentials = config.allow_credentials;
    let origins = match (any(&config.allowed_origins), credentials) {
        (true, false) => AllowOrigin::any(),
        (true, true) => AllowOrigin::mirror_request(),
        (false, _) => AllowOrigin::list(
            config
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        ),
    };
    let methods = if any(&config.allowed_methods) {
        AllowMethods::mirror_request()
    } else {
        AllowMethods::list(config.allowed_methods.iter().filter_map(|m| m.parse().ok()))
    };
    let headers = if any(&config.allowed_headers) {
        AllowHeaders::mirror_request()
    } else {
        AllowHeaders::list(config.allowed_headers.iter().filter_map(|h| h.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods(methods)
        .allow_headers(headers)
        .allow_credentials(credentials)
        .expose_headers([axum::http::HeaderName::from_static(REQUEST_ID_HEADER)])
        .max_age(std::time::Duration::from_secs(600))
}

/// The router of a standalone worker: health and metrics only.
pub fn worker_router(metrics: Arc<MetricsRegistry>) -> Router {
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
/// listener and the admin API's; the edge's connections go through [`server`].
pub fn nodelay(listener: TcpListener) -> axum::serve::TapIo<TcpListener, fn(&mut TcpStream)> {
    fn set(stream: &mut TcpStream) {
        let _ = stream.set_nodelay(true);
    }
    listener.tap_io(set as fn(&mut TcpStream))
}
