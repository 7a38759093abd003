//! A simulated vLLM server for sluice's tests, benchmarks and `sluice demo`.
//!
//! A crate of its own that imports nothing from the gateway, so that what the
//! gateway gets wrong about vLLM's wire format cannot be mirrored here.
//!
//! Beside generation it answers `/v1/embeddings`, `/v2/embed`, rerank and
//! score, `/classify`, `/pooling`,
//! `/tokenize`, `/detokenize`, Anthropic's `/v1/messages`, the Responses
//! API (`/v1/responses`, stored responses kept per instance),
//! `/version` and `/ping` in vLLM's shapes (see `pooling`).
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
//! | `sim_token_delay_ms`, `sim_first_token_delay_ms` | override the delays (on `/v1/embeddings`, the second delays the answer) |
//! | `sim_no_usage: true` | no usage chunk, even when `stream_options.include_usage` asks |
//!
//! [`Simulator::set_failing`] turns it into a failing replica (503s, its
//! `/health` too) and [`Simulator::kill`] into a crashed one.
//!
//! It records every request it receives and every generation a client
//! aborted (connection closed before the end), so tests can assert both.

mod audio;
mod generation;
mod messages;
mod pooling;
mod pooling_tasks;
mod prefix_cache;
mod responses;
mod routes;
mod scoring;
mod stream;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use generation::Generation;
use prefix_cache::PrefixCache;

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// The one model served; requests for another get vLLM's 404.
    pub model: String,
    pub token_delay: Duration,
    pub first_token_delay: Duration,
    /// `max_tokens` when the request has none (vLLM's default is 16).
    pub default_max_tokens: u32,
    /// How long a text answer is when nothing cuts it short: it ends there
    /// with `finish_reason: "stop"`, as a model's end-of-sequence token does
    /// (a function of the prompt and seed, within this range). A request
    /// with `ignore_eos: true` runs to `max_tokens`, as vLLM's does.
    pub answer_tokens: std::ops::Range<u32>,
    /// The context length: a request whose prompt and `max_tokens` do not
    /// fit gets vLLM's 400.
    pub max_model_len: u32,
    /// Record when each token chunk was handed to the connection (for benchmarks).
    pub record_emit_times: bool,
    /// Prefill time per prompt token not in the prefix cache (added to
    /// `first_token_delay`), as vLLM's prefill grows with the uncached prompt.
    pub prefill_per_token: Duration,
    /// Blocks of 16 prompt words the prefix cache holds (least recently used
    /// evicted first); 0: no prefix cache.
    pub prefix_cache_blocks: usize,
    /// The length of the vectors `/v1/embeddings` answers with (a request's
    /// `dimensions` may ask for fewer).
    pub embedding_dimensions: usize,
    /// Sequences generated at once (vLLM's `--max-num-seqs`); more wait
    /// their turn (`vllm:num_requests_waiting`). 0: no limit. Applies to
    /// completions and chat completions.
    pub max_num_seqs: usize,
    /// How much slower each token (the first too) comes as the replica
    /// fills: its delay times `1 + load_slowdown × running / max_num_seqs`.
    pub load_slowdown: f64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            model: "sim-llama".into(),
            token_delay: Duration::from_millis(20),
            first_token_delay: Duration::from_millis(50),
            default_max_tokens: 16,
            answer_tokens: 512..1024,
            max_model_len: 4096,
            record_emit_times: false,
            prefill_per_token: Duration::ZERO,
            prefix_cache_blocks: 0,
            embedding_dimensions: 384,
            max_num_seqs: 0,
            load_slowdown: 0.0,
        }
    }
}

pub use audio::wav;

/// The vLLM release whose wire format this simulates (`GET /version`).
pub const VLLM_VERSION: &str = "0.11.0";

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One request as the simulator received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub request_id: String,
    pub body: Value,
    pub headers: HeaderMap,
}

#[derive(Default)]
pub(crate) struct Records {
    pub(crate) received: Vec<ReceivedRequest>,
    pub(crate) completed: Vec<String>,
    pub(crate) aborted: Vec<String>,
    pub(crate) emitted: std::collections::HashMap<String, Vec<std::time::Instant>>,
}

pub(crate) struct SimState {
    pub(crate) config: SimulatorConfig,
    pub(crate) records: std::sync::Mutex<Records>,
    pub(crate) changed: Notify,
    pub(crate) next_id: AtomicU64,
    /// Answer 503 to everything (health checks included).
    pub(crate) failing: std::sync::atomic::AtomicBool,
    /// Killed: streams break off, connections still open get 503 and close.
    pub(crate) killed: std::sync::atomic::AtomicBool,
    pub(crate) prefix_cache: std::sync::Mutex<PrefixCache>,
    /// Requests generating now, and those waiting for a seat
    /// (`vllm:num_requests_running` is the difference).
    pub(crate) running: std::sync::atomic::AtomicI64,
    pub(crate) waiting: std::sync::atomic::AtomicI64,
    /// `max_num_seqs` seats, when limited.
    pub(crate) seats: Option<Arc<tokio::sync::Semaphore>>,
    /// The Responses API's stored responses, in this replica's memory only.
    pub(crate) responses: std::sync::Mutex<responses::Store>,
}

impl SimState {
    /// A seat to generate in: at once without a capacity model, else when
    /// one of `max_num_seqs` is free (counted as waiting meanwhile).
    pub(crate) async fn seat(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let seats = self.seats.clone()?;
        if let Ok(seat) = seats.clone().try_acquire_owned() {
            return Some(seat);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let seat = seats.acquire_owned().await.ok();
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        seat
    }

    /// The token delay as the replica's load stretches it.
    pub(crate) fn loaded(&self, delay: Duration) -> Duration {
        let seqs = self.config.max_num_seqs;
        if seqs == 0 || self.config.load_slowdown == 0.0 {
            return delay;
        }
        let generating =
            (self.running.load(Ordering::Relaxed) - self.waiting.load(Ordering::Relaxed)).max(0);
        delay.mul_f64(1.0 + self.config.load_slowdown * generating as f64 / seqs as f64)
    }

    pub(crate) fn record(&self, f: impl FnOnce(&mut Records)) {
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
            records: Default::default(),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
            failing: Default::default(),
            killed: Default::default(),
            prefix_cache: Default::default(),
            running: Default::default(),
            waiting: Default::default(),
            seats: (config.max_num_seqs > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_num_seqs))),
            config,
            responses: Default::default(),
        });
        let app = Router::new()
            .route("/v1/completions", post(routes::completions))
            .route("/v1/chat/completions", post(routes::chat_completions))
            .route("/v1/models", get(routes::models))
            .route("/v1/embeddings", post(pooling::embeddings))
            .route("/v2/embed", post(pooling_tasks::cohere_embed))
            .route("/classify", post(pooling_tasks::classify))
            .route("/pooling", post(pooling_tasks::pooling))
            .route("/rerank", post(scoring::rerank))
            .route("/v1/rerank", post(scoring::rerank))
            .route("/v2/rerank", post(scoring::rerank))
            .route("/score", post(scoring::score))
            .route("/v1/score", post(scoring::score))
            .route("/tokenize", post(pooling::tokenize_route))
            .route("/detokenize", post(pooling::detokenize_route))
            .route("/v1/audio/transcriptions", post(audio::transcriptions))
            .route("/v1/audio/translations", post(audio::translations))
            .route("/v1/messages", post(messages::messages))
            .route("/v1/messages/count_tokens", post(messages::count_tokens))
            .route("/v1/responses", post(responses::create))
            .route("/v1/responses/{id}", get(responses::retrieve))
            .route("/v1/responses/{id}/cancel", post(responses::cancel))
            .route("/version", get(routes::version))
            .route("/ping", get(routes::health).post(routes::health))
            .route("/health", get(routes::health))
            .route("/metrics", get(routes::vllm_metrics))
            .with_state(state.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let listener =
            axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
                let _ = stream.set_nodelay(true);
            });
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
        self.texts_of(Generation::from_body(&self.state.config, "x".into(), body))
    }

    /// What a chat completion for `body` answers: the text of each choice.
    pub fn expected_chat_texts(&self, body: &Value) -> Vec<String> {
        self.texts_of(Generation::from_chat_body(
            &self.state.config,
            "x".into(),
            body,
        ))
    }

    fn texts_of(&self, generation: Result<Generation, String>) -> Vec<String> {
        match generation {
            Ok(generation) => generation
                .choices()
                .map(|(p, c)| {
                    let mut text = String::new();
                    for step in 0..generation.text_len {
                        text.push_str(&generation.token(p, c, step));
                    }
                    text
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}
