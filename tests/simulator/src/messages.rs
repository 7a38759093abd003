//! vLLM's Anthropic Messages API: `POST /v1/messages` (one message, or with
//! `stream: true` the events `message_start`, `content_block_start`,
//! `content_block_delta`..., `content_block_stop`, `message_delta`,
//! `message_stop`, each as `event: <type>` + `data:`) and
//! `POST /v1/messages/count_tokens`, in the shapes of vLLM's
//! `entrypoints/anthropic` (its pydantic dumps: `exclude_none` on a whole
//! message, `exclude_unset` on events, so a `message_start`'s message has no
//! `type` or `role`). Like vLLM, it converts the request to a chat (the
//! `system` first, text blocks joined) and answers it as the chat route would.
//! Errors are Anthropic-shaped with vLLM's OpenAI-style `type` names.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::SimState;
use crate::generation::Generation;
use crate::routes::admit;
use crate::stream::AbortGuard;

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    r#type: &'static str,
    text: &'a str,
}

/// `AnthropicMessagesResponse` dumped with `exclude_none`.
#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    r#type: &'static str,
    role: &'static str,
    content: Vec<TextBlock<'a>>,
    model: &'a str,
    stop_reason: &'static str,
    usage: Usage,
}

/// The message of `message_start`, dumped with `exclude_unset`.
#[derive(Serialize)]
struct StartMessage<'a> {
    id: &'a str,
    content: [(); 0],
    model: &'a str,
    stop_reason: Option<()>,
    stop_sequence: Option<()>,
    usage: Usage,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    r#type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<&'static str>,
}

/// `AnthropicStreamEvent`, its fields in declaration order.
#[derive(Serialize)]
struct Event<'a> {
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<StartMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_block: Option<TextBlock<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

impl Event<'_> {
    fn of(kind: &'static str) -> Self {
        Self {
            r#type: kind,
            message: None,
            delta: None,
            content_block: None,
            index: None,
            usage: None,
        }
    }
}

/// The text of an Anthropic `content` or `system`: the string, or its text blocks joined.
fn text_of(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// The chat request vLLM makes of a Messages request.
fn as_chat(body: &Value) -> Value {
    let mut messages = Vec::new();
    let system = text_of(body.get("system"));
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    for message in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        messages.push(json!({"role": role, "content": text_of(message.get("content"))}));
    }
    let mut chat = json!({"model": body.get("model"), "messages": messages});
    for field in [
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop_sequences",
    ] {
        if let Some(value) = body.get(field) {
            let name = if field == "stop_sequences" {
                "stop"
            } else {
                field
            };
            chat[name] = value.clone();
        }
    }
    chat
}

/// An error from `admit` (OpenAI-shaped), in Anthropic's shape as vLLM
/// translates it: `{"type": "error", "error": {"type", "message"}}`.
async fn anthropic_error(response: Response) -> Response {
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let error: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let error = &error["error"];
    let body =
        json!({"type": "error", "error": {"type": error["type"], "message": error["message"]}});
    (status, axum::Json(body)).into_response()
}

pub(crate) async fn count_tokens(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, true) {
        Ok(admitted) => admitted,
        Err(response) => return anthropic_error(*response).await,
    };
    let mut chat = as_chat(&body);
    chat["max_tokens"] = json!(1);
    match Generation::from_chat_body(&state.config, request_id.clone(), &chat) {
        Ok(generation) => {
            state.record(|r| r.completed.push(request_id));
            axum::Json(json!({"input_tokens": generation.prompt_tokens()})).into_response()
        }
        Err(message) => bad_request(&message).await,
    }
}

async fn bad_request(message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": "BadRequestError", "message": message}});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

pub(crate) async fn messages(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, true) {
        Ok(admitted) => admitted,
        Err(response) => return anthropic_error(*response).await,
    };
    if body
        .get("max_tokens")
        .and_then(Value::as_u64)
        .is_none_or(|n| n == 0)
    {
        return bad_request("max_tokens must be positive").await;
    }
    let generation =
        match Generation::from_chat_body(&state.config, request_id.clone(), &as_chat(&body)) {
            Ok(generation) => generation,
            Err(message) => return bad_request(&message).await,
        };
    let tokens: Vec<String> = (0..generation.text_len)
        .map(|step| generation.token(0, 0, step))
        .collect();
    let stop_reason = match generation.text_finish() {
        "length" => "max_tokens",
        _ => "end_turn",
    };
    let usage = || Usage {
        input_tokens: generation.prompt_tokens(),
        output_tokens: tokens.len() as u64,
    };
    let mut guard = AbortGuard::new(state.clone(), request_id);
    if !body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        tokio::time::sleep(generation.first_token_delay).await;
        guard.finish();
        let text = tokens.concat();
        return axum::Json(Message {
            id: &generation.id,
            r#type: "message",
            role: "assistant",
            content: vec![TextBlock {
                r#type: "text",
                text: &text,
            }],
            model: &generation.model,
            stop_reason,
            usage: usage(),
        })
        .into_response();
    }
    let mut events = Vec::with_capacity(tokens.len() + 5);
    let mut push = |event: Event| {
        let data = serde_json::to_string(&event).unwrap_or_default();
        events.push(format!("event: {}\ndata: {data}\n\n", event.r#type));
    };
    push(Event {
        message: Some(StartMessage {
            id: &generation.id,
            content: [],
            model: &generation.model,
            stop_reason: None,
            stop_sequence: None,
            usage: Usage {
                input_tokens: generation.prompt_tokens(),
                output_tokens: 0,
            },
        }),
        ..Event::of("message_start")
    });
    push(Event {
        content_block: Some(TextBlock {
            r#type: "text",
            text: "",
        }),
        index: Some(0),
        ..Event::of("content_block_start")
    });
    for token in &tokens {
        push(Event {
            delta: Some(Delta {
                r#type: Some("text_delta"),
                text: Some(token),
                stop_reason: None,
            }),
            index: Some(0),
            ..Event::of("content_block_delta")
        });
    }
    push(Event {
        index: Some(0),
        ..Event::of("content_block_stop")
    });
    push(Event {
        delta: Some(Delta {
            r#type: None,
            text: None,
            stop_reason: Some(stop_reason),
        }),
        usage: Some(usage()),
        ..Event::of("message_delta")
    });
    push(Event::of("message_stop"));
    let (first_delay, delay) = (generation.first_token_delay, generation.token_delay);
    let frames = futures::stream::unfold(
        (events.into_iter().enumerate().peekable(), guard),
        move |(mut events, mut guard)| async move {
            let (i, event) = events.next()?;
            // Tokens take time; the framing events around them do not.
            if i == 0 {
                tokio::time::sleep(first_delay).await;
            } else if event.starts_with("event: content_block_delta") {
                tokio::time::sleep(delay).await;
            }
            if events.peek().is_none() {
                guard.finish();
            }
            Some((Ok::<_, Infallible>(Bytes::from(event)), (events, guard)))
        },
    );
    let mut response = Body::from_stream(frames).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}
