//! The REST inference routes: `POST /v1/completions` and
//! `POST /v1/chat/completions` (SSE when `stream: true`, the assembled JSON
//! body otherwise), the routes answered with one JSON body
//! (`/v1/embeddings`, `/tokenize`, `/detokenize`, ...), and speech to text
//! (multipart uploads; SSE when the form's `stream` is true), Anthropic's
//! Messages and OpenAI's Responses API (their typed events, `event: <type>`
//! before each `data:`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use http_body_util::{BodyExt, Limited};
use tracing::Instrument;

use super::Edge;
use crate::backends::queue::ResponseEvent;
use crate::error::GatewayError;
use crate::pipeline::policy::RequestContext;
use crate::pipeline::resumable::{Events, Resumption};
use crate::pipeline::{self, Completion, RequestRecord};
use crate::protocol::{AudioRequest, InferenceRequest, Route};
use crate::tenancy::auth::presented_secret;

pub async fn completions(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(state, Route::Completions, headers, Incoming::Body(body)).await
}

pub async fn chat_completions(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(state, Route::ChatCompletions, headers, Incoming::Body(body)).await
}

/// What a request arrives with: a body to read and parse, or the request
/// its path names (a stored response's retrieve or cancel).
pub enum Incoming {
    Body(Body),
    Named(Result<InferenceRequest, GatewayError>),
}

pub async fn serve(
    state: Arc<Edge>,
    route: Route,
    headers: HeaderMap,
    incoming: Incoming,
) -> Response {
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
    let response = handle(state, route, headers, incoming, record)
        .instrument(span)
        .await;
    super::with_request_id(response, &request_id)
}

async fn handle(
    state: Arc<Edge>,
    route: Route,
    headers: HeaderMap,
    incoming: Incoming,
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
    // A client reconnecting with the id of an event of one of its streams
    // resumes that stream; the body (the same request again) is not read.
    let posted = matches!(incoming, Incoming::Body(_));
    if let Some((id, after)) = super::resume::named_in(&headers)
        && posted
        && (route.generates() || route.streams_when_asked())
    {
        record.discard();
        return super::resume::resume(&state, &headers, &id, after, Some(route)).await;
    }
    let request = match incoming {
        Incoming::Body(body) => read_request(&state, route, &headers, body).await,
        Incoming::Named(request) => request,
    };
    let request = match request {
        Ok(request) => request,
        Err(err) => bail!(err),
    };
    let stream = request.is_stream();
    let background = matches!(&request, InferenceRequest::Responses(r) if r.is_background());
    record.transport = if stream { "sse" } else { "json" };
    let ctx = RequestContext {
        request_id: record.request_id.clone(),
        identity,
        route: record.route.path(),
        transport: record.transport,
        trace: record.trace.context().clone(),
        lane: Default::default(),
    };
    let stages = state.stages.clone();
    let mut start: Starting =
        Box::pin(async move { pipeline::start(&stages, &ctx, request, record).await });
    let keepalive = state.server.wait_keepalive;
    let started = match stream && !keepalive.is_zero() {
        true => tokio::select! {
            started = &mut start => started,
            // No first event yet: answer now, and keep the line busy until it comes.
            () = tokio::time::sleep(keepalive) => {
                return kept_alive(route, start, keepalive, state.stages.resumption.clone());
            }
        },
        false => start.await,
    };
    let completion = match started {
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
        true => sse_response(
            route,
            Events::of(completion, state.stages.resumption.as_ref()),
        ),
        false => {
            let mut completion = completion;
            let (response, answer) = json_response(route, &mut completion).await;
            // Counted and logged when the background response ends.
            if let (true, Some(answer)) = (background, answer) {
                super::responses::watch_background(&state.stages, completion, &answer);
            }
            response
        }
    };
    if let Some(headers) = limit_headers {
        response.headers_mut().extend(headers);
    }
    response
}

/// Reads and parses the body of a request to `route`.
async fn read_request(
    state: &Edge,
    route: Route,
    headers: &HeaderMap,
    body: Body,
) -> Result<InferenceRequest, GatewayError> {
    let server = &state.server;
    let limit = match route.takes_upload() {
        true => server.max_upload_bytes.get(),
        false => server.max_body_bytes.get(),
    };
    let body = tokio::time::timeout(server.body_timeout, read_body(headers, body, limit))
        .await
        .map_err(|_| GatewayError::RequestTimeout(server.body_timeout))??;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    match route.takes_upload() {
        true => AudioRequest::parse(route, content_type, body)
            .await
            .map(InferenceRequest::Audio),
        false => InferenceRequest::parse(route, &body),
    }
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

/// A typed event, `event: <type>` before its data: Anthropic's events
/// have their `type` first, the Responses API's (OpenAI's models) last.
fn typed_event(chunk: &crate::protocol::Chunk) -> Bytes {
    const TYPE: &[u8] = b"{\"type\":\"";
    let payload = chunk.payload_slice();
    let kind = match payload.strip_prefix(TYPE) {
        Some(rest) => rest.iter().position(|&b| b == b'"').map(|end| &rest[..end]),
        None => crate::protocol::event_type(payload).map(str::as_bytes),
    };
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

/// How a stream ends, in each API's way: `[DONE]` (OpenAI's chat and
/// completions), Anthropic's `message_stop` or `error` event, or the
/// Responses API's `error` event (its last event already ended a success).
fn stream_end(route: Route, error: Option<crate::error::ErrorInfo>, sequence_number: u64) -> Bytes {
    match (error, route.is_anthropic(), route.is_responses()) {
        (None, true, _) => Bytes::from_static(MESSAGE_STOP_EVENT),
        (None, false, true) => Bytes::new(),
        (None, false, false) => Bytes::from_static(DONE_EVENT),
        (Some(info), true, _) => Bytes::from(format!(
            "event: error\ndata: {}\n\n",
            GatewayError::Upstream(info).anthropic_json()
        )),
        (Some(info), false, true) => {
            let event = serde_json::json!({
                "type": "error",
                "code": info.kind,
                "message": info.message,
                "param": info.param,
                "sequence_number": sequence_number,
            });
            Bytes::from(format!("event: error\ndata: {event}\n\n"))
        }
        (Some(info), false, false) => {
            Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", info.to_json()))
        }
    }
}

/// A request on its way through the pipeline to its first event.
type Starting = std::pin::Pin<
    Box<dyn Future<Output = Result<Completion, (GatewayError, RequestRecord)>> + Send>,
>;

/// The SSE comment a waiting stream sends (clients skip comments).
const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// A stream whose first event has not come within `server.wait_keepalive_ms`:
/// its headers go out now, then a comment line every interval while it
/// waits, then its events; a failure before the first event ends it with
/// the API's error event (the status is already 200).
fn kept_alive(
    route: Route,
    start: Starting,
    interval: std::time::Duration,
    resumption: Option<Arc<Resumption>>,
) -> Response {
    use futures::StreamExt;
    enum Next {
        Bytes(Bytes),
        Started(Box<Completion>),
    }
    let waiting = futures::stream::unfold(Some(start), move |start| async move {
        let mut start = start?;
        tokio::select! {
            started = &mut start => match started {
                Ok(completion) => Some((Next::Started(Box::new(completion)), None)),
                Err((err, _record)) => Some((Next::Bytes(stream_end(route, Some(err.info()), 0)), None)),
            },
            () = tokio::time::sleep(interval) => {
                Some((Next::Bytes(Bytes::from_static(KEEPALIVE)), Some(start)))
            }
        }
    });
    let events = waiting.flat_map(move |next| match next {
        Next::Bytes(bytes) => futures::stream::iter([Ok::<_, Infallible>(bytes)]).boxed(),
        Next::Started(completion) => {
            sse_events(route, Events::of(*completion, resumption.as_ref()), 0).boxed()
        }
    });
    sse_body(Body::from_stream(events))
}

fn sse_response(route: Route, events: Events) -> Response {
    sse_body(Body::from_stream(sse_events(route, events, 0)))
}

/// The events of a stream as the route's clients read them, numbered from
/// `after + 1`; a resumable stream's events carry their id
/// (`id: <request id>.<n>`).
pub(super) fn sse_events(
    route: Route,
    events: Events,
    after: u64,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
    let id = events.resumable_id().map(str::to_string);
    // Not instrumented per chunk (that costs a span enter and exit per token);
    // spans created while streaming name their parent explicitly.
    futures::stream::unfold(Some((events, id, after)), move |state| async move {
        let (mut events, id, sent) = state?;
        let event = events.next().await?;
        let end = !matches!(event, ResponseEvent::Chunk(_));
        let bytes = event_bytes(route, &event, sent);
        let bytes = match &id {
            Some(id) => numbered(id, sent + 1, bytes),
            None => bytes,
        };
        let next = (!end).then_some((events, id, sent + 1));
        Some((Ok::<_, Infallible>(bytes), next))
    })
}

/// One event as the route's clients read it; `sent` events went before it.
fn event_bytes(route: Route, event: &ResponseEvent, sent: u64) -> Bytes {
    match event {
        ResponseEvent::Chunk(chunk) if route.has_typed_events() => typed_event(chunk),
        ResponseEvent::Chunk(chunk) => chunk.framed().clone(),
        ResponseEvent::Error(info) => stream_end(route, Some(info.clone()), sent),
        ResponseEvent::Done(_) => stream_end(route, None, sent),
    }
}

/// An event with its id field, `id: <stream>.<n>` (nothing for an event
/// with no bytes: the Responses API's end).
fn numbered(id: &str, n: u64, event: Bytes) -> Bytes {
    if event.is_empty() {
        return event;
    }
    let mut number = itoa::Buffer::new();
    let number = number.format(n);
    let mut framed = BytesMut::with_capacity(event.len() + id.len() + number.len() + 6);
    framed.put_slice(b"id: ");
    framed.put_slice(id.as_bytes());
    framed.put_u8(b'.');
    framed.put_slice(number.as_bytes());
    framed.put_u8(b'\n');
    framed.put_slice(&event);
    framed.freeze()
}

pub(super) fn sse_body(body: Body) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The JSON answer, and (on success) its body.
async fn json_response(route: Route, completion: &mut Completion) -> (Response, Option<Bytes>) {
    let body = match completion.answer().await {
        Ok(body) => body,
        Err(info) => return (refusal(route, GatewayError::Upstream(info)), None),
    };
    let response = ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response();
    (response, Some(body))
}
