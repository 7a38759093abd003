//! vLLM's Anthropic Messages API: `POST /v1/messages` (one message, or with
//! `stream: true` the events `message_start`, `content_block_start`,
//! `content_block_delta`..., `content_block_stop`, `message_delta`,
//! `message_stop`, each as `event: <type>` + `data:`) and
//! `POST /v1/messages/count_tokens`, in the shapes of vLLM's
//! `entrypoints/anthropic` (its pydantic dumps: `exclude_none` on a whole
//! message, `exclude_unset` on events, so a `message_start`'s message has no
//! `type` or `role`). Like vLLM, it converts the request to a chat (the
//! `system` first, text blocks joined, tools as functions, tool results as
//! tool messages) and answers it as the chat route would: text, or a
//! `tool_use` block (streamed as `input_json_delta` pieces).
//! Errors are Anthropic-shaped with vLLM's OpenAI-style `type` names.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
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

/// `AnthropicContentBlock`: text, or a tool call (`input` its arguments).
#[derive(Serialize)]
struct Block<'a> {
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<Value>,
}

impl<'a> Block<'a> {
    fn text(text: &'a str) -> Self {
        Self {
            r#type: "text",
            text: Some(text),
            id: None,
            name: None,
            input: None,
        }
    }

    fn tool_use(id: &'a str, name: &'a str, input: Value) -> Self {
        Self {
            r#type: "tool_use",
            text: None,
            id: Some(id),
            name: Some(name),
            input: Some(input),
        }
    }
}

/// `AnthropicCountTokensResponse`.
#[derive(Serialize)]
struct TokenCount {
    input_tokens: u64,
    context_management: ContextManagement,
}

#[derive(Serialize)]
struct ContextManagement {
    original_input_tokens: u64,
}

/// `AnthropicMessagesResponse` dumped with `exclude_none`.
#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    r#type: &'static str,
    role: &'static str,
    content: Vec<Block<'a>>,
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

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    r#type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partial_json: Option<&'a str>,
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
    content_block: Option<Block<'a>>,
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

/// The chat request vLLM makes of a Messages request: `system` first, text
/// blocks as content, `tool_result` blocks as tool messages, tools as
/// functions (`tool_choice` `any` as `required`, `tool` as a named function).
fn as_chat(body: &Value) -> Value {
    let mut messages = Vec::new();
    let system = text_of(body.get("system"));
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    let all = body.get("messages").and_then(Value::as_array);
    for message in all.into_iter().flatten() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        let blocks = message.get("content").and_then(Value::as_array);
        let results: Vec<&Value> = blocks
            .into_iter()
            .flatten()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .collect();
        for result in &results {
            messages.push(
                json!({"role": "tool", "tool_call_id": result.get("tool_use_id"),
                "content": text_of(result.get("content"))}),
            );
        }
        if results.is_empty() {
            messages.push(json!({"role": role, "content": text_of(message.get("content"))}));
        }
    }
    let mut chat = json!({"model": body.get("model"), "messages": messages});
    // The simulator's own knobs (`sim_drop_after`, delays...) apply as on chat.
    for (name, value) in body.as_object().into_iter().flatten() {
        if name.starts_with("sim_") {
            chat[name] = value.clone();
        }
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {"name": t.get("name"),
                    "description": t.get("description"), "parameters": t.get("input_schema")}})
            })
            .collect();
        chat["tools"] = json!(tools);
        chat["tool_choice"] = match body.pointer("/tool_choice/type").and_then(Value::as_str) {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function",
                "function": {"name": body.pointer("/tool_choice/name")}}),
            _ => json!("auto"),
        };
    }
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
            let input_tokens = generation.prompt_tokens();
            axum::Json(TokenCount {
                input_tokens,
                context_management: ContextManagement {
                    original_input_tokens: input_tokens,
                },
            })
            .into_response()
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
    let tool = generation.chat.as_ref().and_then(|plan| plan.tool.as_ref());
    let tokens: Vec<String> = match tool {
        Some(_) => Vec::new(),
        None => (0..generation.text_len)
            .map(|step| generation.token(0, 0, step))
            .collect(),
    };
    let stop_reason = match (tool, generation.text_finish()) {
        (Some(_), _) => "tool_use",
        (None, "length") => "max_tokens",
        (None, _) => "end_turn",
    };
    let usage = || Usage {
        input_tokens: generation.prompt_tokens(),
        output_tokens: u64::from(generation.steps()),
    };
    let arguments = tool.map(|tool| tool.pieces.concat()).unwrap_or_default();
    let mut guard = AbortGuard::new(state.clone(), request_id);
    if !body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        tokio::time::sleep(generation.first_token_delay).await;
        guard.finish();
        let text = tokens.concat();
        let content = match tool {
            Some(tool) => {
                let input = serde_json::from_str(&arguments).unwrap_or(Value::Null);
                vec![Block::tool_use(&tool.id, &tool.name, input)]
            }
            None => vec![Block::text(&text)],
        };
        return axum::Json(Message {
            id: &generation.id,
            r#type: "message",
            role: "assistant",
            content,
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
    let block = match tool {
        Some(tool) => Block::tool_use(&tool.id, &tool.name, json!({})),
        None => Block::text(""),
    };
    push(Event {
        content_block: Some(block),
        index: Some(0),
        ..Event::of("content_block_start")
    });
    for token in &tokens {
        push(Event {
            delta: Some(Delta {
                r#type: Some("text_delta"),
                text: Some(token),
                ..Delta::default()
            }),
            index: Some(0),
            ..Event::of("content_block_delta")
        });
    }
    for piece in tool
        .iter()
        .flat_map(|tool| &tool.pieces)
        .filter(|p| !p.is_empty())
    {
        push(Event {
            delta: Some(Delta {
                r#type: Some("input_json_delta"),
                partial_json: Some(piece),
                ..Delta::default()
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
            stop_reason: Some(stop_reason),
            ..Delta::default()
        }),
        usage: Some(usage()),
        ..Event::of("message_delta")
    });
    push(Event::of("message_stop"));
    let events = events
        .into_iter()
        .map(|event| (event.starts_with("event: content_block_delta"), event))
        .collect();
    crate::stream::typed_events(events, &generation, guard)
}
