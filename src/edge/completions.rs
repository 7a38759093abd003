//! The REST inference routes: `POST /v1/completions` and
//! `POST /v1/chat/completions` (SSE when `stream: true`, the assembled JSON
//! body otherwise), the routes answered with one JSON body
//! (`/v1/embeddings`, `/tokenize`, `/detokenize`, ...), and speech to text
//! (multipart uploads; SSE when the form's `stream` is true).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};
use tracing::Instrument;

use super::Edge;
use crate::error::GatewayError;
use crate::pipeline::policy::RequestContext;
use crate::pipeline::{self, Completion, Delivery, RequestRecord};
use crate::protocol::{AudioRequest, InferenceRequest, ResponseAssembler, Route};
use crate::tenancy::auth::presented_secret;

pub async fn completions(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(state, Route::Completions, headers, body).await
}

pub async fn chat_completions(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(state, Route::ChatCompletions, headers, body).await
}

pub async fn serve(state: Arc<Edge>, route: Route, headers: HeaderMap, body: Body) -> Response {
    let received_at = Instant::now();
    let request_id = super::new_request_id();
    let record = RequestRecord::new(
        state.stages.clone(),
        request_id.clone(),
        route,
        "json",
        received_at,
        &crate::observe::telemetry::trace_headers(&headers),
    );
    let span = record.trace.span.clone();
    let response = handle(state, route, headers, body, record)
        .instrument(span)
        .await;
    super::with_request_id(response, &request_id)
}

async fn handle(
    state: Arc<Edge>,
    route: Route,
    headers: HeaderMap,
    body: Body,
    mut record: RequestRecord,
) -> Response {
    macro_rules! bail {
        ($err:expr) => {{
            let err: GatewayError = $err;
            record.fail(&err);
            return refusal(route, err);
        }};
    }
    let authenticate = state
        .stages
        .auth
        .authenticate(presented_secret(&headers, None));
    let identity = match record.trace.stage("auth").during(authenticate).await {
        Ok(identity) => identity,
        Err(err) => bail!(err),
    };
    record.identify(&identity);
    let server = &state.server;
    let limit = match route.takes_upload() {
        true => server.max_upload_bytes.get(),
        false => server.max_body_bytes.get(),
    };
    let body = tokio::time::timeout(server.body_timeout, read_body(&headers, body, limit)).await;
    let body = match body {
        Ok(Ok(body)) => body,
        Ok(Err(err)) => bail!(err),
        Err(_) => bail!(GatewayError::RequestTimeout(server.body_timeout)),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let parsed = match route.takes_upload() {
        true => AudioRequest::parse(route, content_type, body)
            .await
            .map(InferenceRequest::Audio),
        false => InferenceRequest::parse(route, &body),
    };
    let request = match parsed {
        Ok(request) => request,
        Err(err) => bail!(err),
    };
    let stream = request.is_stream();
    record.transport = if stream { "sse" } else { "json" };
    let ctx = RequestContext {
        request_id: record.request_id.clone(),
        identity,
        route: record.route.path(),
        transport: record.transport,
        trace: record.trace.context().clone(),
    };
    let completion = match pipeline::start(&state.stages, &ctx, request, record).await {
        Ok(completion) => completion,
        Err((err, _record)) => return refusal(route, err),
    };
    // OpenAI's x-ratelimit-* headers, for keys with limits.
    let limit_headers = completion
        .record
        .admission
        .as_ref()
        .map(|admission| admission.standing.headers());
    let mut response = match stream {
        true => sse_response(route, completion),
        false => json_response(route, completion).await,
    };
    if let Some(headers) = limit_headers {
        response.headers_mut().extend(headers);
    }
    response
}

/// Reads the body, refusing more than `limit` bytes (before reading, when Content-Length says so).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge { limit })
        }
        Err(err) => Err(GatewayError::BadRequest(format!(
            "could not read the request body: {err}"
        ))),
    }
}

const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";
const MESSAGE_STOP_EVENT: &[u8] = b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

/// An error in the route's API shape.
fn refusal(route: Route, err: GatewayError) -> Response {
    match route.is_anthropic() {
        true => err.into_anthropic_response(),
        false => err.into_response(),
    }
}

/// An Anthropic event, `event: <type>` before its data: the type is the
/// payload's first field, as vLLM and Anthropic write it.
fn anthropic_event(chunk: &crate::protocol::Chunk) -> Bytes {
    const TYPE: &[u8] = b"{\"type\":\"";
    let payload = chunk.payload_slice();
    let kind = payload
        .strip_prefix(TYPE)
        .and_then(|rest| rest.iter().position(|&b| b == b'"').map(|end| &rest[..end]));
    let Some(kind) = kind else {
        return chunk.framed().clone();
    };
    let mut framed = Vec::with_capacity(chunk.framed().len() + kind.len() + 8);
    framed.extend_from_slice(b"event: ");
    framed.extend_from_slice(kind);
    framed.push(b'\n');
    framed.extend_from_slice(chunk.framed());
    Bytes::from(framed)
}

fn sse_response(route: Route, completion: Completion) -> Response {
    let anthropic = route.is_anthropic();
    // Not instrumented per chunk (that costs a span enter and exit per token);
    // spans created while streaming name their parent explicitly.
    let events = futures::stream::unfold(Some(completion), move |completion| async move {
        let mut completion = completion?;
        let (bytes, rest) = match (completion.next().await, anthropic) {
            (Delivery::Chunk(chunk), false) => (chunk.framed().clone(), Some(completion)),
            (Delivery::Chunk(chunk), true) => (anthropic_event(&chunk), Some(completion)),
            (Delivery::Error(info), false) => (
                Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", info.to_json())),
                None,
            ),
            (Delivery::Error(info), true) => (
                Bytes::from(format!(
                    "event: error\ndata: {}\n\n",
                    GatewayError::Upstream(info).anthropic_json()
                )),
                None,
            ),
            (Delivery::Done, false) => (Bytes::from_static(DONE_EVENT), None),
            (Delivery::Done, true) => (Bytes::from_static(MESSAGE_STOP_EVENT), None),
        };
        Some((Ok::<_, Infallible>(bytes), rest))
    });
    let mut response = Body::from_stream(events).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

async fn json_response(route: Route, mut completion: Completion) -> Response {
    let mut assembler = ResponseAssembler::new(route);
    loop {
        match completion.next().await {
            Delivery::Chunk(chunk) => assembler.push_chunk(&chunk),
            Delivery::Error(info) => return refusal(route, GatewayError::Upstream(info)),
            Delivery::Done => break,
        }
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        assembler.finish_bytes(),
    )
        .into_response()
}
