//! vLLM's Responses API (`entrypoints/openai/responses`, its "simple"
//! non-harmony path, with `VLLM_ENABLE_RESPONSES_API_STORE=1`):
//! `POST /v1/responses` answers one `ResponsesResponse`, or with
//! `stream: true` the events `response.created`, `response.in_progress`,
//! `response.output_item.added`, `response.content_part.added`,
//! `response.output_text.delta`..., `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done`,
//! `response.completed` (each `event: <type>` + `data:`, numbered by
//! `sequence_number`, no `[DONE]`; the current `simple_streaming_events`,
//! whose `content_index` is the part's, 0). A function call is an output item of
//! type `function_call`, streamed as `response.function_call_arguments.delta`
//! pieces. The response's id is the request's `request_id` (vLLM's extra
//! field) or a new `resp_` id; it is stored in this instance's memory with
//! the conversation, so `previous_response_id` continues it here and only
//! here, as on a real replica. `background: true` answers `queued` at once
//! (with `stream: true`, its events as they are due) and finishes later;
//! `GET /v1/responses/{id}` reads it (with `?stream=true&starting_after=N`,
//! a background response's events after the `N`th, as they are due) and
//! `POST /v1/responses/{id}/cancel` cancels it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::SimState;
use crate::generation::Generation;
use crate::routes::{admit, error_with_param};
use crate::stream::AbortGuard;

/// A response this instance stores, with the conversation that led to it.
#[derive(Clone)]
pub(crate) struct Stored {
    response: Value,
    /// The chat messages of the request, then the answer's.
    messages: Vec<Value>,
}

/// A background response's events, each with when it is due from the start.
type Scheduled = Arc<(std::time::Instant, Vec<(Duration, String)>)>;

#[derive(Default)]
pub(crate) struct Store {
    responses: HashMap<String, Stored>,
    /// Background responses' events, for `GET ...?stream=true`.
    events: HashMap<String, Scheduled>,
    /// Background generations, cancelled by `POST .../cancel`.
    running: HashMap<String, tokio_util::sync::CancellationToken>,
}

fn not_found(id: &str) -> Response {
    error_with_param(
        StatusCode::NOT_FOUND,
        "NotFoundError",
        &format!("Response with id '{id}' not found."),
        Some("response_id"),
    )
}

fn bad_request(message: &str, param: &str) -> Response {
    error_with_param(
        StatusCode::BAD_REQUEST,
        "BadRequestError",
        message,
        Some(param),
    )
}

/// The chat vLLM builds of a request (`construct_input_messages`): the
/// instructions as a system message, the stored conversation of the
/// previous response, then the input (messages, function calls and their
/// outputs); function tools as chat tools.
fn as_chat(body: &Value, previous: Option<&Stored>) -> (Value, Vec<Value>) {
    let mut messages = Vec::new();
    if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    if let Some(previous) = previous {
        messages.extend(
            previous
                .messages
                .iter()
                .filter(|m| m["role"] != "system")
                .cloned(),
        );
    }
    match body.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for item in items {
                match item.get("type").and_then(Value::as_str) {
                    Some("function_call") => messages.push(json!({"role": "assistant",
                        "tool_calls": [{"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}]})),
                    Some("function_call_output") => messages.push(json!({"role": "tool",
                        "tool_call_id": item["call_id"], "content": item["output"]})),
                    _ => messages.push(json!({
                        "role": item.get("role").and_then(Value::as_str).unwrap_or("user"),
                        "content": crate::generation::message_text(item),
                    })),
                }
            }
        }
        _ => {}
    }
    let mut chat = json!({"model": body.get("model"), "messages": messages});
    for (name, value) in body.as_object().into_iter().flatten() {
        if name.starts_with("sim_") || matches!(name.as_str(), "temperature" | "top_p" | "seed") {
            chat[name] = value.clone();
        }
    }
    if let Some(max) = body.get("max_output_tokens") {
        chat["max_tokens"] = max.clone();
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .filter(|t| t["type"] == "function")
            .map(|t| {
                json!({"type": "function", "function": {"name": t["name"],
                    "description": t.get("description"), "parameters": t.get("parameters")}})
            })
            .collect();
        chat["tools"] = json!(tools);
        if let Some(choice) = body.get("tool_choice") {
            chat["tool_choice"] = choice.clone();
        }
    }
    let messages = chat["messages"].as_array().cloned().unwrap_or_default();
    (chat, messages)
}

fn usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
            "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
        "total_tokens": input + output,
    })
}

/// `ResponsesResponse.from_request`, dumped whole (vLLM's `model_dump`).
fn response_object(
    id: &str,
    body: &Value,
    generation: &Generation,
    status: &str,
    output: Value,
    usage: Value,
) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({
        "id": id,
        "created_at": generation.created,
        "incomplete_details": incomplete,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": generation.model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls").cloned().unwrap_or(json!(true)),
        "temperature": body.get("temperature").cloned().unwrap_or(json!(1.0)),
        "tool_choice": body.get("tool_choice").cloned().unwrap_or(json!("auto")),
        "tools": body.get("tools").cloned().unwrap_or(json!([])),
        "top_p": body.get("top_p").cloned().unwrap_or(json!(1.0)),
        "background": body.get("background").cloned().unwrap_or(json!(false)),
        "max_output_tokens": generation.max_tokens,
        "max_tool_calls": body.get("max_tool_calls"),
        "previous_response_id": body.get("previous_response_id"),
        "prompt": null,
        "reasoning": body.get("reasoning"),
        "service_tier": body.get("service_tier").cloned().unwrap_or(json!("auto")),
        "status": status,
        "text": body.get("text"),
        "top_logprobs": null,
        "truncation": body.get("truncation").cloned().unwrap_or(json!("disabled")),
        "usage": usage,
        "user": body.get("user"),
        "input_messages": null,
        "output_messages": null,
    })
}

/// What a generation produces: the output items, the assistant message to
/// store, the streamed pieces, and the status.
struct Answer {
    output: Value,
    message: Value,
    text_pieces: Vec<String>,
    status: &'static str,
}

fn answer(generation: &Generation) -> Answer {
    let tool = generation.chat.as_ref().and_then(|plan| plan.tool.as_ref());
    if let Some(tool) = tool {
        let arguments = tool.pieces.concat();
        let item = json!({"arguments": arguments, "call_id": tool.id, "name": tool.name,
            "type": "function_call", "id": format!("fc_{}", uuid::Uuid::new_v4().simple()),
            "status": "completed"});
        let message = json!({"role": "assistant", "tool_calls": [{"id": tool.id, "type": "function",
            "function": {"name": tool.name, "arguments": arguments}}]});
        return Answer {
            output: json!([item]),
            message,
            text_pieces: Vec::new(),
            status: "completed",
        };
    }
    let pieces: Vec<String> = (0..generation.text_len)
        .map(|step| generation.token(0, 0, step))
        .collect();
    let text = pieces.concat();
    let item = json!({"id": format!("msg_{}", uuid::Uuid::new_v4().simple()),
        "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": null}],
        "role": "assistant", "status": "completed", "type": "message"});
    Answer {
        output: json!([item]),
        message: json!({"role": "assistant", "content": text}),
        text_pieces: pieces,
        status: match generation.text_finish() {
            "length" => "incomplete",
            _ => "completed",
        },
    }
}

pub(crate) async fn create(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, true) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let background = body
        .get("background")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if background && !store {
        return bad_request(
            "background can only be used when `store` is true",
            "background",
        );
    }
    if background && stream {
        return bad_request(
            "the simulator does not stream background responses",
            "stream",
        );
    }
    let previous = match body.get("previous_response_id").and_then(Value::as_str) {
        None => None,
        Some(id) => match state
            .responses
            .lock()
            .ok()
            .and_then(|s| s.responses.get(id).cloned())
        {
            Some(previous) => Some(previous),
            None => return not_found(id),
        },
    };
    let id = body.get("request_id").and_then(Value::as_str).map_or_else(
        || format!("resp_{}", uuid::Uuid::new_v4().simple()),
        str::to_string,
    );
    let (mut chat, mut messages) = as_chat(&body, previous.as_ref());
    let mut generation = match Generation::from_chat_body(&state.config, request_id.clone(), &chat)
    {
        Ok(generation) => generation,
        Err(message) => return bad_request(&message, "input"),
    };
    // Without `max_output_tokens`, vLLM lets the answer run to the end of
    // the context (`get_max_tokens`), not to the chat route's default.
    if body.get("max_output_tokens").is_none_or(Value::is_null) {
        let room = u64::from(state.config.max_model_len).saturating_sub(generation.prompt_tokens());
        chat["max_tokens"] = json!(room.max(1));
        generation = match Generation::from_chat_body(&state.config, request_id.clone(), &chat) {
            Ok(generation) => generation,
            Err(message) => return bad_request(&message, "input"),
        };
    }
    let answer = answer(&generation);
    messages.push(answer.message.clone());
    let final_usage = usage(generation.prompt_tokens(), u64::from(generation.steps()));
    let done = response_object(
        &id,
        &body,
        &generation,
        answer.status,
        answer.output.clone(),
        final_usage,
    );
    let keep = |state: &SimState, response: &Value| {
        if let Ok(mut store) = state.responses.lock() {
            store.responses.insert(
                id.clone(),
                Stored {
                    response: response.clone(),
                    messages: messages.clone(),
                },
            );
        }
    };
    if background {
        let queued = response_object(&id, &body, &generation, "queued", json!([]), Value::Null);
        keep(&state, &queued);
        let events = stream_events(&id, &body, &generation, &answer, done.clone());
        let scheduled = Arc::new((std::time::Instant::now(), schedule(events, &generation)));
        if let Ok(mut store) = state.responses.lock() {
            store.events.insert(id.clone(), scheduled);
        }
        let cancel = tokio_util::sync::CancellationToken::new();
        if let Ok(mut store) = state.responses.lock() {
            store.running.insert(id.clone(), cancel.clone());
        }
        let (task_state, task_id, done) = (state.clone(), id.clone(), done.clone());
        let took = generation.first_token_delay + generation.token_delay * generation.steps();
        tokio::spawn(async move {
            let guard = AbortGuard::new(task_state.clone(), request_id);
            tokio::select! {
                () = tokio::time::sleep(took) => {}
                () = cancel.cancelled() => return,
            }
            let mut guard = guard;
            guard.finish();
            if let Ok(mut store) = task_state.responses.lock() {
                store.running.remove(&task_id);
                if let Some(stored) = store.responses.get_mut(&task_id)
                    && stored.response["status"] != "cancelled"
                {
                    stored.response = done;
                }
            }
        });
        if stream {
            return background_events(&state, &id, None);
        }
        return axum::Json(queued).into_response();
    }
    let mut guard = AbortGuard::new(state.clone(), request_id);
    if !stream {
        tokio::time::sleep(generation.first_token_delay).await;
        guard.finish();
        if store {
            keep(&state, &done);
        }
        return axum::Json(done).into_response();
    }
    if store {
        keep(&state, &done);
    }
    let events = stream_events(&id, &body, &generation, &answer, done);
    crate::stream::typed_events(events, &generation, guard)
}

/// The events of a streamed response, sent a token's delay apart.
fn stream_events(
    id: &str,
    body: &Value,
    generation: &Generation,
    answer: &Answer,
    done: Value,
) -> Vec<(bool, String)> {
    let mut events: Vec<(bool, String)> = Vec::new();
    let mut push = |token: bool, mut event: Value| {
        event["sequence_number"] = json!(events.len());
        let kind = event["type"].as_str().unwrap_or_default().to_string();
        // OpenAI's event models put `type` last.
        let kind_value = event.as_object_mut().and_then(|o| o.remove("type"));
        event["type"] = kind_value.unwrap_or(Value::Null);
        events.push((token, format!("event: {kind}\ndata: {event}\n\n")));
    };
    let initial = response_object(id, body, generation, "in_progress", json!([]), Value::Null);
    push(
        false,
        json!({"response": initial, "type": "response.created"}),
    );
    push(
        false,
        json!({"response": initial, "type": "response.in_progress"}),
    );
    let item_id = uuid::Uuid::new_v4().to_string();
    if let Some(item) = answer
        .output
        .get(0)
        .filter(|i| i["type"] == "function_call")
    {
        let mut added = item.clone();
        added["arguments"] = json!("");
        added["status"] = json!("in_progress");
        push(
            false,
            json!({"item": added, "output_index": 0, "type": "response.output_item.added"}),
        );
        let pieces = generation
            .chat
            .as_ref()
            .and_then(|p| p.tool.as_ref())
            .map(|t| t.pieces.clone());
        for piece in pieces.unwrap_or_default().iter().filter(|p| !p.is_empty()) {
            push(
                true,
                json!({"delta": piece, "item_id": item["id"], "output_index": 0,
                "type": "response.function_call_arguments.delta"}),
            );
        }
        push(
            false,
            json!({"arguments": item["arguments"], "item_id": item["id"], "name": item["name"],
            "output_index": 0, "type": "response.function_call_arguments.done"}),
        );
        push(
            false,
            json!({"item": item, "output_index": 0, "type": "response.output_item.done"}),
        );
    } else {
        push(
            false,
            json!({"item": {"id": item_id, "content": [], "role": "assistant", "status": "in_progress",
            "type": "message"}, "output_index": 0, "type": "response.output_item.added"}),
        );
        push(
            false,
            json!({"content_index": 0, "item_id": item_id, "output_index": 0,
            "part": {"annotations": [], "text": "", "type": "output_text", "logprobs": []},
            "type": "response.content_part.added"}),
        );
        for piece in &answer.text_pieces {
            push(
                true,
                json!({"content_index": 0, "delta": piece, "item_id": item_id,
                "logprobs": [], "output_index": 0, "type": "response.output_text.delta"}),
            );
        }
        let text = answer.text_pieces.concat();
        push(
            false,
            json!({"content_index": 0, "item_id": item_id, "logprobs": [],
            "output_index": 0, "text": text, "type": "response.output_text.done"}),
        );
        let part =
            json!({"annotations": [], "text": text, "type": "output_text", "logprobs": null});
        push(
            false,
            json!({"content_index": 0, "item_id": item_id, "output_index": 0,
            "part": part, "type": "response.content_part.done"}),
        );
        push(
            false,
            json!({"item": {"id": item_id, "content": [part], "role": "assistant",
            "status": "completed", "type": "message"}, "output_index": 0, "type": "response.output_item.done"}),
        );
    }
    push(
        false,
        json!({"response": done, "type": "response.completed"}),
    );
    events
}

/// When each event of a stream is due, from its start: the first with the
/// first token's delay, each later token a step after the one before.
fn schedule(events: Vec<(bool, String)>, generation: &Generation) -> Vec<(Duration, String)> {
    let mut at = generation.first_token_delay;
    let mut tokens = 0u32;
    events
        .into_iter()
        .map(|(token, event)| {
            if token && tokens > 0 {
                at += generation.token_delay;
            }
            tokens += u32::from(token);
            (at, event)
        })
        .collect()
}

pub(crate) async fn retrieve(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = crate::routes::refuse_if_down(&state) {
        return *response;
    }
    record(&state, &headers, json!({"retrieve": id, "query": query}));
    let stored = state
        .responses
        .lock()
        .ok()
        .and_then(|s| s.responses.get(&id).cloned());
    let Some(stored) = stored else {
        return not_found(&id);
    };
    if query.get("stream").map(String::as_str) == Some("true") {
        let after = query
            .get("starting_after")
            .and_then(|n| n.parse::<usize>().ok());
        return background_events(&state, &id, after);
    }
    axum::Json(stored.response).into_response()
}

/// A background response's events after `starting_after`, each sent when
/// it is due (vLLM's `responses_background_stream_generator`); a response
/// that was not made in the background has none (vLLM's 400).
fn background_events(state: &Arc<SimState>, id: &str, starting_after: Option<usize>) -> Response {
    let scheduled = state
        .responses
        .lock()
        .ok()
        .and_then(|s| s.events.get(id).cloned());
    let Some(scheduled) = scheduled else {
        return bad_request(&format!("Unknown response_id: {id}"), "response_id");
    };
    let first = starting_after.map_or(0, |n| n + 1);
    let frames = futures::stream::unfold(first, move |i| {
        let scheduled = scheduled.clone();
        async move {
            let (started, events) = &*scheduled;
            let (due, event) = events.get(i)?;
            tokio::time::sleep_until((*started + *due).into()).await;
            Some((Ok::<_, std::io::Error>(Bytes::from(event.clone())), i + 1))
        }
    });
    let mut response = axum::body::Body::from_stream(frames).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}

pub(crate) async fn cancel(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = crate::routes::refuse_if_down(&state) {
        return *response;
    }
    record(&state, &headers, json!({"cancel": id}));
    let Ok(mut store) = state.responses.lock() else {
        return not_found(&id);
    };
    let running = store.running.remove(&id);
    let Some(stored) = store.responses.get_mut(&id) else {
        return not_found(&id);
    };
    if !matches!(
        stored.response["status"].as_str(),
        Some("queued" | "in_progress")
    ) {
        return bad_request("Cannot cancel a synchronous response.", "response_id");
    }
    stored.response["status"] = json!("cancelled");
    if let Some(running) = running {
        running.cancel();
    }
    axum::Json(stored.response.clone()).into_response()
}

/// Records a retrieve or cancel among the requests received.
fn record(state: &SimState, headers: &HeaderMap, body: Value) {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let headers = headers.clone();
    state.record(|r| {
        r.received.push(crate::ReceivedRequest {
            request_id,
            body,
            headers,
        })
    });
}
