//! A simulated vLLM server for tests, benchmarks and `sluice demo`.
//!
//! It speaks vLLM's OpenAI-compatible `/v1/completions` and
//! `/v1/chat/completions` wire formats: chunk ids `cmpl-<X-Request-Id>` and
//! `chatcmpl-<X-Request-Id>`, per-choice `index`, `finish_reason`/
//! `stop_reason`, the chat role chunk and `delta`s, the usage chunk before
//! `[DONE]` when `stream_options.include_usage` is set, and error bodies
//! `{"error": {"message", "type", "param", "code"}}`. Output is deterministic
//! (a function of prompt, seed and choice), generated at a configurable delay
//! per token. A chat request with `tools` (and `tool_choice` not `"none"`)
//! whose last message is not a tool result is answered with a call of the
//! named tool (or the first), its arguments streamed in pieces.
//! Extra body fields make it misbehave on request:
//!
//! | field | effect |
//! |---|---|
//! | `sim_error_status: 503` | answer with that status and a vLLM error body |
//! | `sim_error_after: N` | after N tokens, send an error event and `[DONE]` |
//! | `sim_stall_after: N` | after N tokens, send nothing more |
//! | `sim_drop_after: N` | after N tokens, cut the connection |
//! | `sim_token_delay_ms`, `sim_first_token_delay_ms` | override the delays |
//!
//! [`Simulator::set_failing`] turns it into a failing replica (503s, its
//! `/health` too) and [`Simulator::kill`] into a crashed one.
//!
//! It records every request it receives and every generation a client
//! aborted (connection closed before the end), so tests can assert both.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const VOCABULARY: &[&str] = &[
    "the", "river", "flows", "through", "a", "quiet", "valley", "where", "light", "falls", "on",
    "stone", "and", "water", "meets", "sky", "every", "morning", "brings", "new", "sound", "of",
    "wind", "over", "fields", "gate", "opens", "slowly", "as", "boats", "drift", "past", "old",
    "mills", "lanterns", "glow", "near", "harbor", "walls", "while", "gulls", "circle", "high",
    "above", "tide", "returns", "again", "to", "sand", "shore", "bright", "cold", "deep", "long",
    "narrow", "green", "silver", "north", "south", "east", "west", "path", "bridge", "sluice",
];

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// The one model served; requests for another get vLLM's 404.
    pub model: String,
    pub token_delay: Duration,
    pub first_token_delay: Duration,
    /// `max_tokens` when the request has none (vLLM's default is 16).
    pub default_max_tokens: u32,
    /// Record when each token chunk was handed to the connection (for benchmarks).
    pub record_emit_times: bool,
    /// Prefill time per prompt token not in the prefix cache (added to
    /// `first_token_delay`), as vLLM's prefill grows with the uncached prompt.
    pub prefill_per_token: Duration,
    /// Blocks of 16 prompt words the prefix cache holds (least recently used
    /// evicted first); 0: no prefix cache.
    pub prefix_cache_blocks: usize,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            model: "sim-llama".into(),
            token_delay: Duration::from_millis(20),
            first_token_delay: Duration::from_millis(50),
            default_max_tokens: 16,
            record_emit_times: false,
            prefill_per_token: Duration::ZERO,
            prefix_cache_blocks: 0,
        }
    }
}

/// Prompt words per prefix-cache block.
const BLOCK_WORDS: usize = 16;

/// vLLM's automatic prefix caching, roughly: a prompt's leading blocks of
/// words, each keyed by the hash of everything before and in it; a request
/// reuses the leading blocks already cached.
#[derive(Default)]
struct PrefixCache {
    /// Block key to when it was last used.
    blocks: HashMap<u64, u64>,
    clock: u64,
    queried_tokens: u64,
    hit_tokens: u64,
}

impl PrefixCache {
    /// Looks `prompt` up and caches its blocks; returns how many of its words were cached.
    fn serve(&mut self, prompt: &str, capacity: usize) -> u64 {
        let words: Vec<&str> = prompt.split_whitespace().collect();
        self.queried_tokens += words.len() as u64;
        if capacity == 0 {
            return 0;
        }
        let mut hasher = std::hash::DefaultHasher::new();
        let mut cached = 0;
        let mut still_hitting = true;
        for block in words.chunks(BLOCK_WORDS) {
            if block.len() < BLOCK_WORDS {
                break; // only whole blocks are cached, as in vLLM
            }
            block.hash(&mut hasher);
            let key = hasher.finish();
            self.clock += 1;
            match self.blocks.insert(key, self.clock) {
                Some(_) if still_hitting => cached += block.len() as u64,
                _ => still_hitting = false,
            }
        }
        while self.blocks.len() > capacity {
            let oldest = self
                .blocks
                .iter()
                .min_by_key(|(_, used)| **used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.blocks.remove(&oldest);
            }
        }
        self.hit_tokens += cached;
        cached
    }
}

/// One request as the simulator received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub request_id: String,
    pub body: Value,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct Records {
    received: Vec<ReceivedRequest>,
    completed: Vec<String>,
    aborted: Vec<String>,
    emitted: std::collections::HashMap<String, Vec<std::time::Instant>>,
}

struct SimState {
    config: SimulatorConfig,
    records: std::sync::Mutex<Records>,
    changed: Notify,
    next_id: AtomicU64,
    /// Answer 503 to everything (health checks included).
    failing: std::sync::atomic::AtomicBool,
    /// Killed: streams break off, connections still open get 503 and close.
    killed: std::sync::atomic::AtomicBool,
    prefix_cache: std::sync::Mutex<PrefixCache>,
    /// Requests generating now (`vllm:num_requests_running`).
    running: std::sync::atomic::AtomicI64,
}

impl SimState {
    fn record(&self, f: impl FnOnce(&mut Records)) {
        if let Ok(mut records) = self.records.lock() {
            f(&mut records);
        }
        self.changed.notify_waiters();
    }
}

/// A running simulated vLLM server.
pub struct Simulator {
    addr: SocketAddr,
    state: Arc<SimState>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Simulator {
    /// Starts on an ephemeral port on 127.0.0.1.
    pub async fn start(config: SimulatorConfig) -> std::io::Result<Self> {
        Self::serve(config, TcpListener::bind("127.0.0.1:0").await?)
    }

    pub fn serve(config: SimulatorConfig, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(SimState {
            config,
            records: Default::default(),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
            failing: Default::default(),
            killed: Default::default(),
            prefix_cache: Default::default(),
            running: Default::default(),
        });
        let app = Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(vllm_metrics))
            .with_state(state.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let listener = crate::http::nodelay(listener);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes every answer a 503 (`/health` too) until switched back.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::Relaxed);
    }

    /// Prompt tokens looked up in the prefix cache, and how many were found there.
    pub fn prefix_cache_tokens(&self) -> (u64, u64) {
        let cache = self
            .state
            .prefix_cache
            .lock()
            .map(|c| (c.queried_tokens, c.hit_tokens));
        cache.unwrap_or_default()
    }

    /// Dies as a crashed replica does: the port stops accepting, running
    /// streams break off mid-way, connections still open get 503 and close.
    pub fn kill(&self) {
        self.state.killed.store(true, Ordering::Relaxed);
        self.server.abort();
    }

    /// The base URL to configure as `upstream.urls`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.state
            .records
            .lock()
            .map(|r| r.received.clone())
            .unwrap_or_default()
    }

    pub fn completed(&self) -> Vec<String> {
        self.state
            .records
            .lock()
            .map(|r| r.completed.clone())
            .unwrap_or_default()
    }

    /// When each token step of `request_id` was emitted (with `record_emit_times`).
    pub fn emit_times(&self, request_id: &str) -> Vec<std::time::Instant> {
        self.state
            .records
            .lock()
            .ok()
            .and_then(|mut r| r.emitted.remove(request_id))
            .unwrap_or_default()
    }

    pub fn aborted(&self) -> Vec<String> {
        self.state
            .records
            .lock()
            .map(|r| r.aborted.clone())
            .unwrap_or_default()
    }

    /// Waits until `predicate` holds over the records, or `timeout` passes.
    async fn wait_until(&self, timeout: Duration, predicate: impl Fn(&Records) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.changed.notified();
            if self
                .state
                .records
                .lock()
                .map(|r| predicate(&r))
                .unwrap_or(false)
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until the generation for `request_id` has been aborted by its client.
    pub async fn wait_for_abort(&self, request_id: &str, timeout: Duration) -> bool {
        let id = request_id.to_string();
        self.wait_until(timeout, move |r| r.aborted.contains(&id))
            .await
    }

    /// The completion an upstream call for `body` returns, computed without a call:
    /// the text of each choice, in index order.
    pub fn expected_texts(&self, body: &Value) -> Vec<String> {
        match Generation::from_body(&self.state.config, "x".into(), body) {
            Ok(generation) => generation
                .choices()
                .map(|(p, c)| {
                    let mut text = String::new();
                    for step in 0..generation.max_tokens {
                        text.push_str(&generation.token(p, c, step));
                    }
                    text
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn health(State(state): State<Arc<SimState>>) -> Response {
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
async fn vllm_metrics(State(state): State<Arc<SimState>>) -> String {
    let model = &state.config.model;
    let running = state.running.load(Ordering::Relaxed).max(0);
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
         vllm:num_requests_waiting{{model_name=\"{model}\"}} 0.0\n\
         # TYPE vllm:gpu_cache_usage_perc gauge\n\
         vllm:gpu_cache_usage_perc{{model_name=\"{model}\"}} {usage}\n\
         # TYPE vllm:prefix_cache_queries counter\n\
         vllm:prefix_cache_queries_total{{model_name=\"{model}\"}} {queried}.0\n\
         # TYPE vllm:prefix_cache_hits counter\n\
         vllm:prefix_cache_hits_total{{model_name=\"{model}\"}} {hits}.0\n"
    )
}

async fn models(State(state): State<Arc<SimState>>) -> Response {
    let body = serde_json::json!({"object": "list", "data": [{
        "id": state.config.model, "object": "model", "created": 0, "owned_by": "vllm",
        "root": state.config.model, "parent": null, "max_model_len": 4096, "permission": []
    }]});
    axum::Json(body).into_response()
}

async fn completions(state: State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(state, headers, body, false).await
}

async fn chat_completions(
    state: State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, headers, body, true).await
}

async fn generate(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
    chat: bool,
) -> Response {
    if state.killed.load(Ordering::Relaxed) {
        let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    }
    if state.failing.load(Ordering::Relaxed) {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "simulated replica failure",
        );
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                "request body must be a JSON object",
            );
        }
    };
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
        return error_response(
            status,
            crate::error::kind_for_status(status),
            "simulated upstream failure",
        );
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if model != state.config.model {
        return error_response(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("The model `{model}` does not exist."),
        );
    }
    let parsed = match chat {
        true => Generation::from_chat_body(&state.config, request_id.clone(), &body),
        false => Generation::from_body(&state.config, request_id.clone(), &body),
    };
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

/// Records an abort if dropped before the generation finished.
struct AbortGuard {
    state: Arc<SimState>,
    request_id: String,
    finished: bool,
}

impl AbortGuard {
    fn finish(&mut self) {
        self.finished = true;
        let id = self.request_id.clone();
        self.state.record(|r| r.completed.push(id));
    }
}

impl AbortGuard {
    fn new(state: Arc<SimState>, request_id: String) -> Self {
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

struct Generation {
    id: String,
    request_id: String,
    /// A chat request: what the answer is made of.
    chat: Option<ChatPlan>,
    created: u64,
    model: String,
    prompts: Vec<(String, u64)>,
    n: u32,
    max_tokens: u32,
    seed: i64,
    echo: bool,
    logprobs: Option<u32>,
    include_usage: bool,
    continuous_usage: bool,
    error_after: Option<u32>,
    stall_after: Option<u32>,
    drop_after: Option<u32>,
    first_token_delay: Duration,
    token_delay: Duration,
    record_emit_times: bool,
}

impl Generation {
    fn from_body(
        config: &SimulatorConfig,
        request_id: String,
        body: &Value,
    ) -> Result<Self, String> {
        let prompts: Vec<(String, u64)> = match body.get("prompt") {
            Some(Value::String(s)) => vec![(s.clone(), count_words(s))],
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(Value::as_str)
                .map(|s| (s.to_string(), count_words(s)))
                .collect(),
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
                vec![(format!("{items:?}"), items.len() as u64)]
            }
            Some(Value::Array(items)) => items
                .iter()
                .map(|batch| {
                    (
                        batch.to_string(),
                        batch.as_array().map_or(1, |b| b.len() as u64),
                    )
                })
                .collect(),
            _ => return Err("prompt is required".into()),
        };
        let number = |name: &str| body.get(name).and_then(Value::as_u64);
        let ms =
            |name: &str, default: Duration| number(name).map_or(default, Duration::from_millis);
        let options = body.get("stream_options");
        let option = |name: &str| {
            options
                .and_then(|o| o.get(name))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        Ok(Self {
            id: format!("cmpl-{request_id}"),
            request_id,
            chat: None,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: config.model.clone(),
            prompts,
            n: number("n").map_or(1, |n| n.max(1) as u32),
            max_tokens: number("max_tokens").map_or(config.default_max_tokens, |n| n as u32),
            seed: body.get("seed").and_then(Value::as_i64).unwrap_or(0),
            echo: body.get("echo").and_then(Value::as_bool).unwrap_or(false),
            logprobs: number("logprobs").map(|n| n as u32),
            include_usage: option("include_usage"),
            continuous_usage: option("continuous_usage_stats"),
            error_after: number("sim_error_after").map(|n| n as u32),
            stall_after: number("sim_stall_after").map(|n| n as u32),
            drop_after: number("sim_drop_after").map(|n| n as u32),
            first_token_delay: ms("sim_first_token_delay_ms", config.first_token_delay),
            token_delay: ms("sim_token_delay_ms", config.token_delay),
            record_emit_times: config.record_emit_times,
        })
    }

    /// A chat request: the conversation is the one prompt.
    fn from_chat_body(
        config: &SimulatorConfig,
        request_id: String,
        body: &Value,
    ) -> Result<Self, String> {
        let Some(Value::Array(messages)) = body.get("messages") else {
            return Err("messages is required".into());
        };
        let text_of = |message: &Value| match message.get("content") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        let conversation: String = messages
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                format!("<{role}> {}\n", text_of(m))
            })
            .collect();
        let mut prompt_body = body.clone();
        if let Value::Object(fields) = &mut prompt_body {
            fields.insert("prompt".into(), Value::String(conversation));
            if let Some(limit) = body.get("max_completion_tokens") {
                fields.insert("max_tokens".into(), limit.clone());
            }
            fields.remove("logprobs");
        }
        let mut generation = Self::from_body(config, request_id, &prompt_body)?;
        generation.id = format!("chatcmpl-{}", generation.request_id);
        let last = messages.last();
        let answered_tool =
            last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("tool");
        let tools = body
            .get("tools")
            .and_then(Value::as_array)
            .filter(|t| !t.is_empty());
        let choice = body.get("tool_choice");
        let tool_choice_none = choice.and_then(Value::as_str) == Some("none");
        let tool = match tools {
            Some(tools) if !tool_choice_none && !answered_tool => {
                let named = choice
                    .and_then(|c| c.pointer("/function/name"))
                    .and_then(Value::as_str);
                let name = named
                    .or_else(|| tools[0].pointer("/function/name").and_then(Value::as_str))
                    .unwrap_or("tool")
                    .to_string();
                let asked = last.map(text_of).unwrap_or_default();
                let query: Vec<&str> = asked.split_whitespace().take(6).collect();
                let arguments = serde_json::json!({"query": query.join(" ")}).to_string();
                Some(ToolCall {
                    id: format!("chatcmpl-tool-{:016x}", generation.hash_of(&name)),
                    name,
                    pieces: split_pieces(&arguments, 8),
                })
            }
            _ => None,
        };
        generation.chat = Some(ChatPlan {
            tool,
            logprobs: body
                .get("logprobs")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        });
        Ok(generation)
    }

    fn hash_of(&self, what: &str) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        (&self.prompts[0].0, self.seed, what).hash(&mut hasher);
        hasher.finish()
    }

    /// How many steps the answer takes: one token (or tool-call piece) per choice each.
    fn steps(&self) -> u32 {
        match self.chat.as_ref().and_then(|c| c.tool.as_ref()) {
            Some(tool) => 1 + tool.pieces.len() as u32,
            None => self.max_tokens,
        }
    }

    fn object(&self) -> &'static str {
        match self.chat {
            Some(_) => "chat.completion.chunk",
            None => "text_completion",
        }
    }

    /// The chat chunk choices of `step` for one choice (the role chunk first, at step 0).
    fn chat_choices(
        &self,
        plan: &ChatPlan,
        prompt: usize,
        choice: u32,
        step: u32,
    ) -> Vec<ChatStreamChoice> {
        let index = prompt as u32 * self.n + choice;
        let last = step + 1 == self.steps();
        let mut out = Vec::new();
        if step == 0 {
            out.push(ChatStreamChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                logprobs: Value::Null,
                finish_reason: None,
                stop_reason: None,
            });
        }
        let (delta, logprobs) = match &plan.tool {
            Some(tool) => {
                let call = match step {
                    0 => ToolCallDelta {
                        id: Some(tool.id.clone()),
                        kind: Some("function"),
                        index: 0,
                        function: FunctionDelta {
                            name: Some(tool.name.clone()),
                            arguments: String::new(),
                        },
                    },
                    _ => ToolCallDelta {
                        id: None,
                        kind: None,
                        index: 0,
                        function: FunctionDelta {
                            name: None,
                            arguments: tool.pieces[step as usize - 1].clone(),
                        },
                    },
                };
                let delta = Delta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![call]),
                };
                (delta, Value::Null)
            }
            None => {
                let token = self.token(prompt, choice, step);
                let logprobs = match plan.logprobs {
                    true => serde_json::json!({"content": [chat_logprob(&token, step)]}),
                    false => Value::Null,
                };
                let delta = Delta {
                    role: None,
                    content: Some(token),
                    tool_calls: None,
                };
                (delta, logprobs)
            }
        };
        let reason = if plan.tool.is_some() {
            "tool_calls"
        } else {
            "length"
        };
        out.push(ChatStreamChoice {
            index,
            delta,
            logprobs,
            finish_reason: last.then_some(reason),
            stop_reason: last.then_some(Value::Null),
        });
        out
    }

    /// (prompt index, choice index) pairs in output order.
    fn choices(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (0..self.prompts.len()).flat_map(move |p| (0..self.n).map(move |c| (p, c)))
    }

    fn token(&self, prompt: usize, choice: u32, step: u32) -> String {
        let mut hasher = std::hash::DefaultHasher::new();
        (&self.prompts[prompt].0, self.seed, choice, step).hash(&mut hasher);
        let word = VOCABULARY[(hasher.finish() % VOCABULARY.len() as u64) as usize];
        format!(" {word}")
    }

    fn prompt_tokens(&self) -> u64 {
        self.prompts.iter().map(|(_, n)| n).sum()
    }

    fn usage(&self, completion_tokens: u64) -> Usage {
        let prompt_tokens = self.prompt_tokens();
        Usage {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
        }
    }

    /// The choice for `step`, with the text offset before it updated in `offsets`.
    fn choice(&self, prompt: usize, choice: u32, step: u32, offset: &mut u64) -> StreamChoice {
        let token = self.token(prompt, choice, step);
        let mut text = token.clone();
        if step == 0 && self.echo {
            text = format!("{}{}", self.prompts[prompt].0, token);
        }
        let logprobs = self.logprobs.map(|_| {
            let logprob = -((step % 7) as f64 + 1.0) / 4.0;
            Logprobs {
                text_offset: vec![*offset],
                token_logprobs: vec![logprob],
                tokens: vec![token.clone()],
                top_logprobs: vec![std::iter::once((token.clone(), logprob)).collect()],
            }
        });
        *offset += text.len() as u64;
        let last = step + 1 == self.max_tokens;
        StreamChoice {
            index: prompt as u32 * self.n + choice,
            text,
            logprobs,
            finish_reason: last.then_some("length"),
            stop_reason: None,
            prompt_token_ids: None,
            token_ids: None,
        }
    }
}

/// The `logprobs.content` entry of a chat token (its own token as the top one).
fn chat_logprob(token: &str, step: u32) -> Value {
    let logprob = -((step % 7) as f64 + 1.0) / 4.0;
    let entry = serde_json::json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let mut with_top = entry.clone();
    with_top["top_logprobs"] = serde_json::json!([entry]);
    with_top
}

/// A chat stream chunk, fields in vLLM's order (`id` first, as clients and
/// the gateway's renaming of cached chunks expect).
#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatStreamChoice; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChatStreamChoice {
    index: u32,
    delta: Delta,
    logprobs: Value,
    finish_reason: Option<&'static str>,
    /// Present (as `null`) on the last chunk of a choice only.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<Value>,
}

#[derive(Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Serialize)]
struct ToolCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    index: u32,
    function: FunctionDelta,
}

#[derive(Serialize)]
struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    arguments: String,
}

/// What a chat answer is made of.
struct ChatPlan {
    tool: Option<ToolCall>,
    logprobs: bool,
}

struct ToolCall {
    id: String,
    name: String,
    /// The arguments' JSON, in the pieces it streams in.
    pieces: Vec<String>,
}

/// `text` in pieces of at most `size` bytes, cut at character boundaries.
fn split_pieces(text: &str, size: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if current.len() + c.len_utf8() > size {
            pieces.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

fn count_words(s: &str) -> u64 {
    s.split_whitespace().count().max(1) as u64
}

#[derive(Serialize, Clone)]
struct Logprobs {
    text_offset: Vec<u64>,
    token_logprobs: Vec<f64>,
    tokens: Vec<String>,
    top_logprobs: Vec<std::collections::BTreeMap<String, f64>>,
}

#[derive(Serialize)]
struct StreamChoice {
    index: u32,
    text: String,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
    stop_reason: Option<Value>,
    prompt_token_ids: Option<Vec<u32>>,
    token_ids: Option<Vec<u32>>,
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
    completion_tokens: u64,
}

#[derive(Serialize)]
struct StreamChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<StreamChoice>,
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct UsageChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [(); 0],
    usage: Usage,
}

fn sse(payload: &impl Serialize) -> Bytes {
    let mut out = b"data: ".to_vec();
    let _ = serde_json::to_writer(&mut out, payload);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

struct StreamState {
    generation: Generation,
    guard: AbortGuard,
    step: u32,
    offsets: Vec<u64>,
    pending: std::collections::VecDeque<Bytes>,
    done: bool,
}

fn stream_response(state: Arc<SimState>, generation: Generation) -> Response {
    let choices = generation.choices().count();
    let guard = AbortGuard::new(state, generation.request_id.clone());
    let stream_state = StreamState {
        generation,
        guard,
        step: 0,
        offsets: vec![0; choices],
        pending: Default::default(),
        done: false,
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
            tokio::time::sleep(if step == 0 {
                g.first_token_delay
            } else {
                g.token_delay
            })
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

async fn full_response(generation: Generation, mut guard: AbortGuard) -> Response {
    let g = &generation;
    let total = g.first_token_delay + g.token_delay * g.steps().saturating_sub(1);
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
        for step in 0..g.max_tokens {
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
            "finish_reason": if g.max_tokens > 0 { Value::from("length") } else { Value::Null },
            "stop_reason": null,
            "token_ids": null,
            "prompt_logprobs": null,
            "prompt_token_ids": null,
        }));
    }
    let usage = g.usage(u64::from(g.max_tokens) * choices.len() as u64);
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
fn full_chat_body(g: &Generation, plan: &ChatPlan) -> Value {
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
                for step in 0..g.max_tokens {
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
            "length"
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
