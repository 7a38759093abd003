//! The simulator's HTTP routes: generation, `/v1/models`, `/health`, `/ping`,
//! `/version` and vLLM's `/metrics` (the pooling and tokenizer routes are in
//! `pooling`, speech to text in `audio`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::generation::Generation;
use crate::stream::{AbortGuard, full_response, stream_response};
use crate::{ReceivedRequest, SimState};

/// The `type` vLLM gives an error of `status`: its own names for the
/// statuses its handlers raise (`create_error_response`), else the status's
/// reason phrase (its `HTTPException` handler).
fn vllm_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        422 => "UnprocessableEntityError",
        500 => "InternalServerError",
        501 => "NotImplementedError",
        _ => status.canonical_reason().unwrap_or("Unknown Error"),
    }
}

pub(crate) fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    error_with_param(status, kind, message, None)
}

/// vLLM's error body; `param` names the field at fault, when there is one.
pub(crate) fn error_with_param(
    status: StatusCode,
    kind: &str,
    message: &str,
    param: Option<&str>,
) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// vLLM's `/version`.
pub(crate) async fn version() -> Response {
    axum::Json(serde_json::json!({"version": crate::VLLM_VERSION})).into_response()
}

pub(crate) async fn health(State(state): State<Arc<SimState>>) -> Response {
    if state.killed.load(Ordering::Relaxed) {
        return killed();
    }
    match state.failing.load(Ordering::Relaxed) {
        true => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        false => StatusCode::OK.into_response(),
    }
}

/// What a connection still open to a killed replica gets: 503, and closed.
fn killed() -> Response {
    let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// vLLM's own metrics, in its names: what load-aware routing reads.
pub(crate) async fn vllm_metrics(State(state): State<Arc<SimState>>) -> String {
    let model = &state.config.model;
    let waiting = state.waiting.load(Ordering::Relaxed).max(0);
    let running = (state.running.load(Ordering::Relaxed) - waiting).max(0);
    let (blocks, queried, hits) = state
        .prefix_cache
        .lock()
        .map(|c| (c.blocks.len(), c.queried_tokens, c.hit_tokens))
        .unwrap_or_default();
    let usage = match state.config.prefix_cache_blocks {
        0 => 0.0,
        capacity => blocks as f64 / capacity as f64,
    };
    format!(
        "# TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{model}\"}} {running}.0\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}.0\n\
         # TYPE vllm:gpu_cache_usage_perc gauge\n\
         vllm:gpu_cache_usage_perc{{model_name=\"{model}\"}} {usage}\n\
         # TYPE vllm:prefix_cache_queries counter\n\
         vllm:prefix_cache_queries_total{{model_name=\"{model}\"}} {queried}.0\n\
         # TYPE vllm:prefix_cache_hits counter\n\
         vllm:prefix_cache_hits_total{{model_name=\"{model}\"}} {hits}.0\n"
    )
}

pub(crate) async fn models(State(state): State<Arc<SimState>>) -> Response {
    let body = serde_json::json!({"object": "list", "data": [{
        "id": state.config.model, "object": "model", "created": 0, "owned_by": "vllm",
        "root": state.config.model, "parent": null, "max_model_len": state.config.max_model_len, "permission": []
    }]});
    axum::Json(body).into_response()
}

pub(crate) async fn completions(
    state: State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, headers, body, false).await
}

pub(crate) async fn chat_completions(
    state: State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, headers, body, true).await
}

/// What every inference route does first: a killed or failing replica
/// refuses; the body must be a JSON object; the request is recorded; a
/// `sim_error_status` is answered; a model this replica does not serve gets
/// vLLM's 404 (a route whose `model` is optional takes a missing one as this
/// replica's). Returns the request id (`X-Request-Id`) and the body.
pub(crate) fn admit(
    state: &SimState,
    headers: &HeaderMap,
    body: &[u8],
    model_required: bool,
) -> Result<(String, Value), Box<Response>> {
    refuse_if_down(state)?;
    let body: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return Err(Box::new(error_response(
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                "request body must be a JSON object",
            )));
        }
    };
    admit_parsed(state, headers, body, model_required)
}

/// A killed replica closes the connection; a failing one answers 503.
pub(crate) fn refuse_if_down(state: &SimState) -> Result<(), Box<Response>> {
    if state.killed.load(Ordering::Relaxed) {
        return Err(Box::new(killed()));
    }
    if state.failing.load(Ordering::Relaxed) {
        return Err(Box::new(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            vllm_error_type(StatusCode::SERVICE_UNAVAILABLE),
            "simulated replica failure",
        )));
    }
    Ok(())
}

/// [`admit`] for a body already read into JSON (a multipart form's fields).
pub(crate) fn admit_parsed(
    state: &SimState,
    headers: &HeaderMap,
    body: Value,
    model_required: bool,
) -> Result<(String, Value), Box<Response>> {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .unwrap_or_else(|| format!("sim-{}", state.next_id.fetch_add(1, Ordering::Relaxed)));
    state.record(|r| {
        r.received.push(ReceivedRequest {
            request_id: request_id.clone(),
            body: body.clone(),
            headers: headers.clone(),
        })
    });

    if let Some(status) = body.get("sim_error_status").and_then(Value::as_u64) {
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(Box::new(error_response(
            status,
            vllm_error_type(status),
            "simulated upstream failure",
        )));
    }
    let model = match body.get("model") {
        None | Some(Value::Null) if !model_required => state.config.model.as_str(),
        model => model.and_then(Value::as_str).unwrap_or_default(),
    };
    if model != state.config.model {
        return Err(Box::new(error_response(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("The model `{model}` does not exist."),
        )));
    }
    Ok((request_id, body))
}

async fn generate(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
    chat: bool,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, true) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let parsed = match chat {
        true => Generation::from_chat_body(&state.config, request_id.clone(), &body),
        false => Generation::from_body(&state.config, request_id.clone(), &body),
    };
    if let Ok(generation) = &parsed
        && let Some((message, param)) = generation.over_context(&state.config)
    {
        return error_with_param(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            &message,
            Some(param),
        );
    }
    let generation = match parsed {
        Ok(mut generation) => {
            let prompt = generation
                .prompts
                .first()
                .map(|(p, _)| p.clone())
                .unwrap_or_default();
            let capacity = state.config.prefix_cache_blocks;
            let cached = state
                .prefix_cache
                .lock()
                .map(|mut cache| cache.serve(&prompt, capacity))
                .unwrap_or(0);
            let uncached = generation.prompt_tokens().saturating_sub(cached);
            generation.first_token_delay += state.config.prefill_per_token * uncached as u32;
            generation
        }
        Err(message) => {
            return error_response(StatusCode::BAD_REQUEST, "BadRequestError", &message);
        }
    };
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        stream_response(state, generation)
    } else {
        let guard = AbortGuard::new(state.clone(), request_id);
        full_response(generation, guard).await
    }
}
