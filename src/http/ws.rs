//! `GET /v1/completions` upgraded to a WebSocket. Each text frame from the
//! client is one request body; the server answers with text frames that
//! carry exactly what SSE `data:` events would (chunks, or an error object),
//! always ending with `[DONE]`. The connection then takes the next request.
//! Closing the socket mid-stream cancels the upstream generation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, close_code};
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tracing::Instrument;

use crate::auth::{Identity, presented_secret};
use crate::error::{ErrorInfo, GatewayError};
use crate::http::server::ConnectionSlot;
use crate::pipeline::{self, Delivery, RequestRecord};
use crate::policy::RequestContext;
use crate::protocol::{CompletionRequest, ResponseAssembler};
use crate::state::AppState;

#[derive(Deserialize)]
pub struct WsParams {
    api_key: Option<String>,
}

pub async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(params): Query<WsParams>,
    slot: Option<Extension<ConnectionSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return GatewayError::BadRequest(format!(
                "GET /v1/completions is the WebSocket endpoint: {}",
                rejection.body_text()
            ))
            .into_response();
        }
    };
    let identity = match state
        .auth
        .authenticate(presented_secret(&headers, params.api_key.as_deref()))
        .await
    {
        Ok(identity) => identity,
        Err(err) => return err.into_response(),
    };
    let limit = state.config.server.max_body_bytes;
    // A traceparent on the upgrade request is the parent of every request on the socket.
    let trace = crate::telemetry::trace_headers(&headers);
    upgrade
        .max_message_size(limit)
        .on_upgrade(move |socket| async move {
            // The socket keeps its place under the connection cap while open.
            let _slot = slot;
            serve_socket(state, identity, socket, trace).await;
        })
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

/// What the client sent while a response was streaming.
enum Incoming {
    Request(Utf8Bytes),
    Other,
    Closed,
}

async fn receive(stream: &mut SplitStream<WebSocket>) -> Incoming {
    match stream.next().await {
        Some(Ok(Message::Text(text))) => Incoming::Request(text),
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Incoming::Closed,
        Some(Ok(_)) => Incoming::Other,
    }
}

async fn serve_socket(
    state: Arc<AppState>,
    identity: Identity,
    socket: WebSocket,
    trace: Vec<(String, String)>,
) {
    let (mut sink, mut stream) = socket.split();
    let mut queued: VecDeque<Utf8Bytes> = VecDeque::new();
    let idle_timeout = state.config.server.ws_idle_timeout;
    loop {
        let text = match queued.pop_front() {
            Some(text) => text,
            None => match tokio::time::timeout(idle_timeout, stream.next()).await {
                Err(_) => {
                    close(&mut sink, close_code::AWAY, "idle timeout").await;
                    return;
                }
                Ok(next) => match next {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(_))) => {
                        let err = GatewayError::BadRequest(
                            "send each request as a text frame holding its JSON body".into(),
                        );
                        if !send_error(&mut sink, &err.info()).await {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(_))) => {
                        // Completes the close handshake: the reply to the client's Close.
                        let _ = sink.close().await;
                        return;
                    }
                    Some(Err(_)) | None => return,
                    Some(Ok(_)) => continue,
                },
            },
        };
        let mut record = RequestRecord::new(
            state.clone(),
            crate::http::new_request_id(),
            "ws",
            Instant::now(),
            &trace,
        );
        record.identify(&identity);
        let span = record.trace.span.clone();
        let connected = serve_request(
            &state,
            &identity,
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
    state: &Arc<AppState>,
    identity: &Identity,
    body: &[u8],
    sink: &mut Sink,
    stream: &mut SplitStream<WebSocket>,
    queued: &mut VecDeque<Utf8Bytes>,
    mut record: RequestRecord,
) -> bool {
    let request = match CompletionRequest::parse(body) {
        Ok(request) => request,
        Err(err) => {
            record.fail(&err);
            return send_error(sink, &err.info()).await;
        }
    };
    let stream_mode = request.is_stream();
    let ctx = RequestContext {
        request_id: record.request_id.clone(),
        identity: identity.clone(),
        route: record.route,
        transport: "ws",
        trace: record.trace.context().clone(),
    };
    let mut completion = match pipeline::start(state, &ctx, request, record).await {
        Ok(completion) => completion,
        Err((err, _record)) => return send_error(sink, &err.info()).await,
    };
    // Deliver the response while watching the socket: a new request frame is
    // queued for later, a close cancels the response. Only the watcher is ever
    // cancelled mid-await, so no chunk (or plugin call) is cut in half.
    let deliver = async {
        let mut assembler = (!stream_mode).then(ResponseAssembler::default);
        loop {
            let sent = match completion.next().await {
                Delivery::Chunk(chunk) => match &mut assembler {
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
                Delivery::Error(info) => return send_error(sink, &info).await,
                Delivery::Done => {
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
    let watch = async {
        loop {
            match receive(stream).await {
                Incoming::Request(text) => queued.push_back(text),
                Incoming::Other => {}
                Incoming::Closed => return,
            }
        }
    };
    tokio::select! {
        connected = deliver => connected,
        // Dropping the completion cancels the upstream request.
        () = watch => false,
    }
}
