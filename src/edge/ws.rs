//! `GET /v1/completions` and `GET /v1/chat/completions` upgraded to a
//! WebSocket. Each text frame from the
//! client is one request body; the server answers with text frames that
//! carry exactly what SSE `data:` events would (chunks, or an error object),
//! always ending with `[DONE]`. The connection then takes the next request.
//! Closing the socket mid-stream cancels the upstream generation, unless
//! streams are resumable (`[resume]`): then it goes on for
//! `resume.grace_ms`, and a text frame `{"resume": "<id>", "after": N}`
//! (the id is the request id, the tail of each chunk's `id`; `N` the
//! frames of that answer already received) sends the frames after the
//! `N`-th, then the rest, on this socket or a new one.
//!
//! A browser cannot set headers on a WebSocket, so besides `Authorization`
//! and `?api_key=`, the key may come as a subprotocol: the page offers
//! `["sluice", "sluice-key.<KEY>"]` and the server selects `sluice`. A refused
//! login is accepted, answered with an error frame and closed with
//! `4000 + status` (4401), so page JavaScript can read why. Frames over
//! `server.max_body_bytes` close the socket with 1009; more than
//! `server.ws_max_queued_requests` requests sent ahead get an error frame and
//! 1008. The key is checked again before every request and every
//! `auth.cache_ttl_ms` while a response streams: once it is revoked or
//! expired, the client gets the 401 error frame and close 4401, and a
//! running response is cancelled.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, close_code};
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tracing::Instrument;

use super::Edge;
use crate::backends::queue::ResponseEvent;
use crate::edge::server::ConnectionSlot;
use crate::error::{ErrorInfo, GatewayError};
use crate::pipeline::policy::RequestContext;
use crate::pipeline::resumable::Events;
use crate::pipeline::{self, RequestRecord};
use crate::protocol::{InferenceRequest, ResponseAssembler, Route};
use crate::tenancy::Identity;
use crate::tenancy::auth::presented_secret;

/// The subprotocol the server selects; `sluice-key.<KEY>` beside it carries the key.
pub const PROTOCOL: &str = "sluice";
const KEY_PROTOCOL_PREFIX: &str = "sluice-key.";

#[derive(Deserialize)]
pub struct WsParams {
    api_key: Option<String>,
}

/// The key offered as a `sluice-key.<KEY>` subprotocol, if any.
fn subprotocol_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(KEY_PROTOCOL_PREFIX))
}

pub async fn completions(
    state: State<Arc<Edge>>,
    headers: HeaderMap,
    params: Result<Query<WsParams>, QueryRejection>,
    slot: Option<Extension<ConnectionSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    websocket(Route::Completions, state, headers, params, slot, upgrade).await
}

pub async fn chat_completions(
    state: State<Arc<Edge>>,
    headers: HeaderMap,
    params: Result<Query<WsParams>, QueryRejection>,
    slot: Option<Extension<ConnectionSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    websocket(
        Route::ChatCompletions,
        state,
        headers,
        params,
        slot,
        upgrade,
    )
    .await
}

async fn websocket(
    route: Route,
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    params: Result<Query<WsParams>, QueryRejection>,
    slot: Option<Extension<ConnectionSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let request_id = crate::edge::new_request_id();
    // A traceparent on the upgrade request is the parent of the login and of
    // every request on the socket.
    let trace = crate::observe::telemetry::trace_headers(&headers);
    let mut record = RequestRecord::new(
        state.stages.clone(),
        request_id.clone(),
        route,
        "ws",
        Instant::now(),
        &trace,
    );
    let refused = |mut record: RequestRecord, err: GatewayError| {
        record.fail(&err);
        super::with_request_id(err.into_response(), &record.request_id)
    };
    let params = match params {
        Ok(Query(params)) => params,
        Err(rejection) => {
            let err = GatewayError::BadRequest(format!(
                "invalid query string: {}",
                rejection.body_text()
            ));
            return refused(record, err);
        }
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let err = GatewayError::BadRequest(format!(
                "GET {} is the WebSocket endpoint: {}",
                route.path(),
                rejection.body_text()
            ));
            return refused(record, err);
        }
    };
    let origin = headers.get(header::ORIGIN).map(|o| o.as_bytes());
    if !state.cors.allows_origin(origin) {
        let err = GatewayError::Forbidden("this origin may not open a WebSocket".into());
        return refused(record, err);
    }
    let secret =
        presented_secret(&headers, params.api_key.as_deref()).or_else(|| subprotocol_key(&headers));
    let authenticate = state.stages.auth.authenticate(secret);
    let login = record
        .trace
        .stage("auth")
        .during(authenticate)
        .instrument(record.trace.span.clone())
        .await;
    // Frames a little over the body limit still arrive, to be refused with 1009.
    let limit = state.server.max_body_bytes.get();
    let upgrade = upgrade.protocols([PROTOCOL]).max_message_size(limit + 1);
    let max_sockets = state.server.ws_max_sockets_per_key.get();
    let login =
        login.and_then(
            |identity| match state.ws_sockets.acquire(&identity.key_id, max_sockets) {
                Some(place) => Ok((identity, place)),
                None => {
                    record.identify(&identity);
                    Err(GatewayError::TooManyRequests(format!(
                        "this API key already has {max_sockets} WebSockets open"
                    )))
                }
            },
        );
    let response = match login {
        Ok((identity, place)) => {
            // Each request on the socket has a record of its own.
            record.discard();
            let login = Login {
                identity,
                secret: secret.unwrap_or_default().to_string(),
            };
            upgrade.on_upgrade(move |socket| async move {
                // The socket keeps its places (connection cap, per-key cap) while open.
                let _places = (slot, place);
                serve_socket(state, route, login, socket, trace).await;
            })
        }
        Err(err) => {
            record.fail(&err);
            let info = err.info();
            drop(record);
            upgrade.on_upgrade(move |socket| refuse_login(socket, info))
        }
    };
    super::with_request_id(response, &request_id)
}

/// Tells a refused client why in a form page JavaScript can read: the error
/// frame, `[DONE]`, then close with `4000 + status`.
async fn refuse_login(socket: WebSocket, info: ErrorInfo) {
    let (mut sink, mut stream) = socket.split();
    if send_error(&mut sink, &info).await {
        close(&mut sink, 4000 + info.status, "login refused").await;
        // Wait for the client's Close, reading what it sent meanwhile (its
        // request): a socket dropped with unread data is reset, a reset can
        // lose the close frame, and a browser then reports 1006.
        let answered = async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), answered).await;
    }
}

type Sink = SplitSink<WebSocket, Message>;

async fn send_text(sink: &mut Sink, text: impl Into<Utf8Bytes>) -> bool {
    sink.send(Message::Text(text.into())).await.is_ok()
}

async fn send_error(sink: &mut Sink, info: &ErrorInfo) -> bool {
    send_text(sink, info.to_json()).await && send_text(sink, "[DONE]").await
}

/// Closes the socket from this side with `code`.
async fn close(sink: &mut Sink, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}

/// What the client sent.
enum Incoming {
    Request(Utf8Bytes),
    Binary,
    /// The client's Close (answered when the sink is closed).
    Close,
    /// A message over the size limit.
    TooBig,
    /// The connection is gone.
    Gone,
    Other,
}

fn classify(next: Option<Result<Message, axum::Error>>, limit: usize) -> Incoming {
    match next {
        Some(Ok(Message::Text(text))) if text.len() > limit => Incoming::TooBig,
        Some(Ok(Message::Text(text))) => Incoming::Request(text),
        Some(Ok(Message::Binary(data))) if data.len() > limit => Incoming::TooBig,
        Some(Ok(Message::Binary(_))) => Incoming::Binary,
        Some(Ok(Message::Close(_))) => Incoming::Close,
        Some(Err(err)) if is_capacity_error(&err) => Incoming::TooBig,
        Some(Err(_)) | None => Incoming::Gone,
        Some(Ok(_)) => Incoming::Other,
    }
}

/// Whether tungstenite refused a frame or message for its size.
fn is_capacity_error(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|inner| inner.downcast_ref::<tungstenite::Error>())
        .is_some_and(|inner| matches!(inner, tungstenite::Error::Capacity(_)))
}

/// Ends the socket for a message over the size limit (RFC 6455's 1009).
async fn too_big(sink: &mut Sink) {
    close(sink, close_code::SIZE, "message too big").await;
}

/// Who opened the socket: checked again before every request and while a
/// response streams, so a revoked or expired key stops within the
/// revocation bound (`auth.cache_ttl_ms`).
struct Login {
    identity: Identity,
    secret: String,
}

impl Login {
    /// The key's identity now (limits may have changed), or why it is refused.
    async fn recheck(&mut self, state: &Edge) -> Result<(), GatewayError> {
        self.identity = state.stages.auth.authenticate(Some(&self.secret)).await?;
        Ok(())
    }

    /// Resolves once the key is refused (revoked, expired), checking every
    /// `auth.cache_ttl_ms`.
    async fn refused(&self, state: &Edge) -> GatewayError {
        let every = state.auth_recheck;
        loop {
            tokio::time::sleep(every).await;
            if let Err(err @ GatewayError::Unauthorized(_)) =
                state.stages.auth.authenticate(Some(&self.secret)).await
            {
                return err;
            }
        }
    }
}

/// Tells the client its key stopped working and closes with `4000 + status`.
async fn logged_out(sink: &mut Sink, err: &GatewayError) {
    let info = err.info();
    if send_error(sink, &info).await {
        close(sink, 4000 + info.status, "login refused").await;
    }
}

async fn serve_socket(
    state: Arc<Edge>,
    route: Route,
    mut login: Login,
    socket: WebSocket,
    trace: Vec<(String, String)>,
) {
    let (mut sink, mut stream) = socket.split();
    let mut queued: VecDeque<Utf8Bytes> = VecDeque::new();
    let server = &state.server;
    let (idle_timeout, limit) = (server.ws_idle_timeout, server.max_body_bytes.get());
    loop {
        let text = match queued.pop_front() {
            Some(text) => text,
            None => match tokio::time::timeout(idle_timeout, stream.next()).await {
                Err(_) => {
                    close(&mut sink, close_code::AWAY, "idle timeout").await;
                    return;
                }
                Ok(next) => match classify(next, limit) {
                    Incoming::Request(text) => text,
                    Incoming::Binary => {
                        let err = GatewayError::BadRequest(
                            "send each request as a text frame holding its JSON body".into(),
                        );
                        if !send_error(&mut sink, &err.info()).await {
                            return;
                        }
                        continue;
                    }
                    Incoming::Close => {
                        // Completes the close handshake: the reply to the client's Close.
                        let _ = sink.close().await;
                        return;
                    }
                    Incoming::TooBig => return too_big(&mut sink).await,
                    Incoming::Gone => return,
                    Incoming::Other => continue,
                },
            },
        };
        if let Some(resume) = Resume::parse(&text) {
            if let Err(err) = login.recheck(&state).await {
                return logged_out(&mut sink, &err).await;
            }
            if !serve_resume(&state, &login, resume, &mut sink, &mut stream, &mut queued).await {
                return;
            }
            continue;
        }
        let mut record = RequestRecord::new(
            state.stages.clone(),
            crate::edge::new_request_id(),
            route,
            "ws",
            Instant::now(),
            &trace,
        );
        if let Err(err) = login.recheck(&state).await {
            record.fail(&err);
            return logged_out(&mut sink, &err).await;
        }
        record.identify(&login.identity);
        let span = record.trace.span.clone();
        let connected = serve_request(
            &state,
            &login,
            text.as_bytes(),
            &mut sink,
            &mut stream,
            &mut queued,
            record,
        )
        .instrument(span)
        .await;
        if !connected {
            return;
        }
    }
}

/// Serves one request; returns false when the connection is gone.
async fn serve_request(
    state: &Arc<Edge>,
    login: &Login,
    body: &[u8],
    sink: &mut Sink,
    stream: &mut SplitStream<WebSocket>,
    queued: &mut VecDeque<Utf8Bytes>,
    mut record: RequestRecord,
) -> bool {
    let route = record.route;
    let request = match InferenceRequest::parse(route, body) {
        Ok(request) => request,
        Err(err) => {
            record.fail(&err);
            return send_error(sink, &err.info()).await;
        }
    };
    let stream_mode = request.is_stream();
    let ctx = RequestContext {
        request_id: record.request_id.clone(),
        identity: login.identity.clone(),
        route: record.route.path(),
        transport: "ws",
        trace: record.trace.context().clone(),
        lane: Default::default(),
    };
    // While the first event is awaited (a long queue or prefill), a ping
    // every `server.wait_keepalive_ms` keeps proxies from closing the socket.
    let start = pipeline::start(&state.stages, &ctx, request, record);
    tokio::pin!(start);
    let keepalive = state.server.wait_keepalive;
    let started = loop {
        if keepalive.is_zero() {
            break start.await;
        }
        tokio::select! {
            started = &mut start => break started,
            () = tokio::time::sleep(keepalive) => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return false;
                }
            }
        }
    };
    let completion = match started {
        Ok(completion) => completion,
        Err((err, _record)) => return send_error(sink, &err.info()).await,
    };
    let (events, assembler) = match stream_mode {
        true => (
            Events::of(completion, state.stages.resumption.as_ref()),
            None,
        ),
        false => (
            Events::of(completion, None),
            Some(ResponseAssembler::new(route)),
        ),
    };
    deliver_watching(state, login, events, assembler, sink, stream, queued).await
}

/// A resume message, `{"resume": "<stream id>", "after": N}`: the frames
/// after the `N`-th of that stream, then the rest as it is generated.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resume {
    resume: String,
    #[serde(default)]
    after: u64,
}

impl Resume {
    fn parse(text: &str) -> Option<Self> {
        memchr::memmem::find(text.as_bytes(), b"\"resume\"")?;
        serde_json::from_str(text).ok()
    }
}

/// Serves a resume message; returns false when the connection is gone.
async fn serve_resume(
    state: &Arc<Edge>,
    login: &Login,
    resume: Resume,
    sink: &mut Sink,
    stream: &mut SplitStream<WebSocket>,
    queued: &mut VecDeque<Utf8Bytes>,
) -> bool {
    let reopened =
        super::resume::reopen(state, &login.identity, &resume.resume, resume.after, None).await;
    match reopened {
        Ok((_, events)) => deliver_watching(state, login, events, None, sink, stream, queued).await,
        Err(err) => send_error(sink, &err.info()).await,
    }
}

/// Sends a response's frames (or, with an assembler, its one assembled
/// answer) while watching the socket; returns false when the connection
/// is gone.
async fn deliver_watching(
    state: &Arc<Edge>,
    login: &Login,
    mut events: Events,
    mut assembler: Option<ResponseAssembler>,
    sink: &mut Sink,
    stream: &mut SplitStream<WebSocket>,
    queued: &mut VecDeque<Utf8Bytes>,
) -> bool {
    let stopper = events.stopper();
    // Deliver the response while watching the socket: a new request frame is
    // queued for later, a close cancels the response (after the grace period,
    // when resumable). Only the watcher is ever
    // cancelled mid-await, so no chunk (or plugin call) is cut in half.
    let deliver = async {
        loop {
            let sent = match events.next().await {
                Some(ResponseEvent::Chunk(chunk)) => match &mut assembler {
                    Some(assembler) => {
                        assembler.push(chunk.payload_slice());
                        true
                    }
                    None => match Utf8Bytes::try_from(chunk.payload()) {
                        Ok(text) => send_text(sink, text).await,
                        Err(_) => {
                            send_text(
                                sink,
                                String::from_utf8_lossy(chunk.payload_slice()).into_owned(),
                            )
                            .await
                        }
                    },
                },
                Some(ResponseEvent::Error(info)) => return send_error(sink, &info).await,
                Some(ResponseEvent::Done(_)) | None => {
                    if let Some(assembler) = assembler.take()
                        && !send_text(sink, assembler.finish()).await
                    {
                        return false;
                    }
                    return send_text(sink, "[DONE]").await;
                }
            };
            if !sent {
                return false;
            }
        }
    };
    let server = &state.server;
    let (limit, max_queued) = (
        server.max_body_bytes.get(),
        server.ws_max_queued_requests.get(),
    );
    /// Why watching the socket stopped the response.
    enum Interrupt {
        TooBig,
        Closed,
        Overflow,
        LoggedOut(GatewayError),
    }
    let watch = async {
        loop {
            match classify(stream.next().await, limit) {
                Incoming::Request(_) if queued.len() >= max_queued => return Interrupt::Overflow,
                Incoming::Request(text) => queued.push_back(text),
                Incoming::Binary | Incoming::Other => {}
                Incoming::TooBig => return Interrupt::TooBig,
                Incoming::Close | Incoming::Gone => return Interrupt::Closed,
            }
        }
    };
    let interrupt = tokio::select! {
        connected = deliver => return connected,
        interrupt = watch => interrupt,
        err = login.refused(state) => Interrupt::LoggedOut(err),
    };
    // The response was dropped with `deliver`, which cancels its upstream
    // request (a resumable one, when nobody resumes it in time).
    match interrupt {
        Interrupt::TooBig => too_big(sink).await,
        Interrupt::Closed => {
            let _ = sink.close().await;
        }
        Interrupt::Overflow => {
            let err = GatewayError::BadRequest(format!(
                "more than {max_queued} requests sent ahead of their answers"
            ));
            if send_error(sink, &err.info()).await {
                close(sink, close_code::POLICY, "too many queued requests").await;
            }
        }
        Interrupt::LoggedOut(err) => {
            // Nobody may resume it with that key now.
            if let Some(stopper) = stopper {
                stopper.cancel();
            }
            logged_out(sink, &err).await
        }
    }
    false
}
