//! Answers: a stream of SSE chunks, or the whole JSON body at once; an
//! [`AbortGuard`] records a generation its client abandoned.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::SimState;
use crate::generation::{ChatPlan, Generation, chat_logprob};
use crate::wire::{ChatChunk, Logprobs, StreamChunk, UsageChunk, sse};

/// Records an abort if dropped before the generation finished.
pub(crate) struct AbortGuard {
    pub(crate) state: Arc<SimState>,
    pub(crate) request_id: String,
    pub(crate) finished: bool,
}

impl AbortGuard {
    pub(crate) fn finish(&mut self) {
        self.finished = true;
        let id = self.request_id.clone();
        self.state.record(|r| r.completed.push(id));
    }
}

impl AbortGuard {
    pub(crate) fn new(state: Arc<SimState>, request_id: String) -> Self {
        state.running.fetch_add(1, Ordering::Relaxed);
        Self {
            state,
            request_id,
            finished: false,
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        self.state.running.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            let id = std::mem::take(&mut self.request_id);
            self.state.record(|r| r.aborted.push(id));
        }
    }
}

pub(crate) struct StreamState {
    pub(crate) generation: Generation,
    pub(crate) guard: AbortGuard,
    pub(crate) step: u32,
    pub(crate) offsets: Vec<u64>,
    pub(crate) pending: std::collections::VecDeque<Bytes>,
    pub(crate) done: bool,
    /// Its place among `max_num_seqs`, taken before its first token.
    pub(crate) seat: Option<Option<tokio::sync::OwnedSemaphorePermit>>,
}

pub(crate) fn stream_response(state: Arc<SimState>, generation: Generation) -> Response {
    let choices = generation.choices().count();
    let guard = AbortGuard::new(state, generation.request_id.clone());
    let stream_state = StreamState {
        generation,
        guard,
        step: 0,
        offsets: vec![0; choices],
        pending: Default::default(),
        done: false,
        seat: None,
    };
    let body = futures::stream::unfold(stream_state, |mut s| async move {
        loop {
            if let Some(bytes) = s.pending.pop_front() {
                return Some((Ok::<_, std::io::Error>(bytes), s));
            }
            if s.done {
                return None;
            }
            if s.guard.state.killed.load(Ordering::Relaxed) {
                s.done = true;
                return Some((Err(std::io::Error::other("simulated replica crash")), s));
            }
            let g = &s.generation;
            let step = s.step;
            if g.stall_after == Some(step) {
                std::future::pending::<()>().await;
            }
            if g.drop_after == Some(step) {
                s.done = true;
                return Some((Err(std::io::Error::other("simulated connection drop")), s));
            }
            if g.error_after == Some(step) {
                let error = serde_json::json!({"error": {"message": "simulated failure mid-stream", "type": "InternalServerError", "param": null, "code": 500}});
                s.pending
                    .push_back(Bytes::from(format!("data: {error}\n\n")));
                s.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                s.done = true;
                s.guard.finish();
                continue;
            }
            if step >= g.steps() {
                let completion_tokens = u64::from(g.steps()) * s.offsets.len() as u64;
                if g.include_usage {
                    s.pending.push_back(sse(&UsageChunk {
                        id: &g.id,
                        object: g.object(),
                        created: g.created,
                        model: &g.model,
                        choices: [],
                        usage: g.usage(completion_tokens),
                    }));
                }
                s.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                s.done = true;
                s.guard.finish();
                continue;
            }
            if s.seat.is_none() {
                s.seat = Some(s.guard.state.seat().await);
            }
            let g = &s.generation;
            let state = &s.guard.state;
            tokio::time::sleep(state.loaded(if step == 0 {
                g.first_token_delay
            } else {
                g.token_delay
            }))
            .await;
            let pairs: Vec<(usize, u32)> = g.choices().collect();
            if let Some(plan) = &g.chat {
                for (p, c) in pairs {
                    for choice in g.chat_choices(plan, p, c, step) {
                        s.pending.push_back(sse(&ChatChunk {
                            id: &g.id,
                            object: g.object(),
                            created: g.created,
                            model: &g.model,
                            choices: [choice],
                            usage: g.continuous_usage.then(|| g.usage(u64::from(step + 1))),
                        }));
                    }
                }
            } else {
                for (i, (p, c)) in pairs.into_iter().enumerate() {
                    let choice = g.choice(p, c, step, &mut s.offsets[i]);
                    let usage = g.continuous_usage.then(|| g.usage(u64::from(step + 1)));
                    s.pending.push_back(sse(&StreamChunk {
                        id: &g.id,
                        object: "text_completion",
                        created: g.created,
                        model: &g.model,
                        choices: vec![choice],
                        usage,
                    }));
                }
            }
            s.step += 1;
            if s.generation.record_emit_times {
                let id = s.guard.request_id.clone();
                let now = std::time::Instant::now();
                if let Ok(mut records) = s.guard.state.records.lock() {
                    records.emitted.entry(id).or_default().push(now);
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

pub(crate) async fn full_response(generation: Generation, mut guard: AbortGuard) -> Response {
    let _seat = guard.state.seat().await;
    let g = &generation;
    let tokens = g.steps().saturating_sub(1);
    let total = guard
        .state
        .loaded(g.first_token_delay + g.token_delay * tokens);
    tokio::time::sleep(total).await;
    if let Some(plan) = &g.chat {
        let body = full_chat_body(g, plan);
        guard.finish();
        return axum::Json(body).into_response();
    }
    let mut choices = Vec::new();
    for (p, c) in g.choices() {
        let mut offset = 0;
        let mut text = String::new();
        let mut logprobs: Option<Logprobs> = None;
        for step in 0..g.text_len {
            let choice = g.choice(p, c, step, &mut offset);
            text.push_str(&choice.text);
            if let Some(lp) = choice.logprobs {
                let acc = logprobs.get_or_insert_with(|| Logprobs {
                    text_offset: vec![],
                    token_logprobs: vec![],
                    tokens: vec![],
                    top_logprobs: vec![],
                });
                acc.text_offset.extend(lp.text_offset);
                acc.token_logprobs.extend(lp.token_logprobs);
                acc.tokens.extend(lp.tokens);
                acc.top_logprobs.extend(lp.top_logprobs);
            }
        }
        choices.push(serde_json::json!({
            "index": p as u32 * g.n + c,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": if g.text_len > 0 { Value::from(g.text_finish()) } else { Value::Null },
            "stop_reason": null,
            "token_ids": null,
            "prompt_logprobs": null,
            "prompt_token_ids": null,
        }));
    }
    let usage = g.usage(u64::from(g.text_len) * choices.len() as u64);
    let body = serde_json::json!({
        "id": g.id, "object": "text_completion", "created": g.created, "model": g.model,
        "choices": choices, "service_tier": null, "system_fingerprint": null,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens,
                  "completion_tokens": usage.completion_tokens, "prompt_tokens_details": null},
        "kv_transfer_params": null,
    });
    guard.finish();
    axum::Json(body).into_response()
}

/// The body vLLM returns for a non-streaming chat request.
pub(crate) fn full_chat_body(g: &Generation, plan: &ChatPlan) -> Value {
    let mut choices = Vec::new();
    for (p, c) in g.choices() {
        let (content, tool_calls, logprobs) = match &plan.tool {
            Some(tool) => (
                Value::Null,
                serde_json::json!([{"id": tool.id, "type": "function", "function": {"name": tool.name, "arguments": tool.pieces.concat()}}]),
                Value::Null,
            ),
            None => {
                let mut text = String::new();
                let mut entries = Vec::new();
                for step in 0..g.text_len {
                    let token = g.token(p, c, step);
                    if plan.logprobs {
                        entries.push(chat_logprob(&token, step));
                    }
                    text.push_str(&token);
                }
                let logprobs = match plan.logprobs {
                    true => serde_json::json!({"content": entries}),
                    false => Value::Null,
                };
                (Value::from(text), serde_json::json!([]), logprobs)
            }
        };
        let reason = if plan.tool.is_some() {
            "tool_calls"
        } else {
            g.text_finish()
        };
        choices.push(serde_json::json!({
            "index": p as u32 * g.n + c,
            "message": {"role": "assistant", "reasoning_content": null, "content": content, "tool_calls": tool_calls},
            "logprobs": logprobs,
            "finish_reason": reason,
            "stop_reason": null,
        }));
    }
    let usage = g.usage(u64::from(g.steps()) * choices.len() as u64);
    serde_json::json!({
        "id": g.id, "object": "chat.completion", "created": g.created, "model": g.model,
        "choices": choices, "service_tier": null, "system_fingerprint": null,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens,
                  "completion_tokens": usage.completion_tokens, "prompt_tokens_details": null},
        "prompt_logprobs": null, "kv_transfer_params": null,
    })
}

/// A typed-event answer (Anthropic's Messages, the Responses API): `events`
/// are whole SSE events, those marked `true` carrying a token. As vLLM's,
/// the events up to the first token's leave with it (after the first-token
/// delay); each later token takes a step. `sim_drop_after` cuts the
/// connection after that many tokens; a killed replica breaks the stream.
pub(crate) fn typed_events(
    events: Vec<(bool, String)>,
    generation: &Generation,
    guard: AbortGuard,
) -> Response {
    let (first_delay, delay) = (generation.first_token_delay, generation.token_delay);
    let (drop_after, record_emit_times) = (generation.drop_after, generation.record_emit_times);
    let frames = futures::stream::unfold(
        (events.into_iter().enumerate().peekable(), guard, 0u32),
        move |(mut events, mut guard, mut tokens)| async move {
            if tokens == u32::MAX {
                return None;
            }
            let (i, (token, event)) = events.next()?;
            if guard.state.killed.load(Ordering::Relaxed) {
                let crash = std::io::Error::other("simulated replica crash");
                return Some((Err(crash), (events, guard, u32::MAX)));
            }
            if i == 0 {
                tokio::time::sleep(first_delay).await;
            } else if token && tokens > 0 {
                tokio::time::sleep(delay).await;
            }
            if token && drop_after == Some(tokens) {
                let drop = std::io::Error::other("simulated connection drop");
                return Some((Err(drop), (events, guard, u32::MAX)));
            }
            tokens += u32::from(token);
            if token && record_emit_times {
                let (id, now) = (guard.request_id.clone(), std::time::Instant::now());
                guard
                    .state
                    .record(|r| r.emitted.entry(id).or_default().push(now));
            }
            if events.peek().is_none() {
                guard.finish();
            }
            Some((
                Ok::<_, std::io::Error>(Bytes::from(event)),
                (events, guard, tokens),
            ))
        },
    );
    let mut response = Body::from_stream(frames).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}
