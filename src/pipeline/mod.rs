//! The request pipeline, shared by REST and WebSocket: policy hooks, cache
//! lookup, queue submission, then a [`Completion`] that yields the chunks to
//! deliver. Transports only format what it yields.
//!
//! A [`RequestRecord`] follows each request from authentication to its last
//! byte; when it is dropped (finished, failed or abandoned by the client) it
//! writes the request's metrics and its inference-log row.

pub mod filter_chain;
pub mod models;
pub mod policy;
pub mod state;

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use crate::backends::cache::{CachedChunks, CachedResponse};
use crate::backends::queue::{QueuedRequest, ResponseEvent, ResponseStream};
use crate::backends::store::InferenceRecord;
use crate::config::CacheScope;
use crate::error::{ErrorInfo, GatewayError};
use crate::observe::telemetry::{RequestTrace, StageSpan};
use crate::pipeline::filter_chain::{FilterChain, Filtered};
use crate::pipeline::policy::RequestContext;
use crate::pipeline::state::AppState;
use crate::protocol::{Chunk, ChunkSummary, ChunkView, InferenceRequest, Route, Usage};
use crate::tenancy::limits::Admission;

/// HTTP status logged for a request whose client went away first (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// Everything measured about one request; reported when dropped.
pub struct RequestRecord {
    state: Arc<AppState>,
    /// The request's root span (every stage's span is a child of it) and sampling decision.
    pub trace: RequestTrace,
    pub key_name: String,
    pub request_id: String,
    pub route: Route,
    pub transport: &'static str,
    pub key_id: Option<String>,
    pub model: String,
    pub cache_hit: bool,
    /// Whether the cache was consulted (false when the request failed first).
    looked_up: bool,
    /// Cleared by [`RequestRecord::discard`]: nothing is reported.
    report: bool,
    pub status: u16,
    received_at: Instant,
    first_chunk_at: Option<Instant>,
    last_chunk_at: Option<Instant>,
    pub usage: Option<Usage>,
    chunks_sent: u64,
    /// The request's place in its key's limits, settled when the record drops.
    pub admission: Option<Admission>,
}

impl RequestRecord {
    pub fn new(
        state: Arc<AppState>,
        request_id: String,
        route: Route,
        transport: &'static str,
        received_at: Instant,
        trace_headers: &[(String, String)],
    ) -> Self {
        Self {
            state,
            trace: RequestTrace::start(route.span_name(), &request_id, trace_headers),
            key_name: String::new(),
            request_id,
            route,
            transport,
            key_id: None,
            model: String::new(),
            cache_hit: false,
            looked_up: false,
            report: true,
            status: CLIENT_CLOSED,
            received_at,
            first_chunk_at: None,
            last_chunk_at: None,
            usage: None,
            chunks_sent: 0,
            admission: None,
        }
    }

    fn chunk_sent(&mut self) {
        let now = Instant::now();
        match self.last_chunk_at {
            None => {
                self.first_chunk_at = Some(now);
                let cache = if self.cache_hit { "hit" } else { "miss" };
                self.state
                    .metrics
                    .time_to_first_token
                    .with_label_values(&[self.transport, cache])
                    .observe((now - self.received_at).as_secs_f64());
            }
            Some(last) => self
                .state
                .metrics
                .inter_token_latency
                .observe((now - last).as_secs_f64()),
        }
        self.last_chunk_at = Some(now);
        self.chunks_sent += 1;
    }

    /// Notes who made the request, once authenticated.
    pub fn identify(&mut self, identity: &crate::tenancy::auth::Identity) {
        self.key_id = Some(identity.key_id.clone());
        self.key_name = identity.key_name.clone();
    }

    pub fn fail(&mut self, error: &GatewayError) {
        self.status = error.status().as_u16();
    }

    /// Drops the record without reporting it: it turned out not to be a
    /// request (a WebSocket login that succeeded; its requests have records
    /// of their own).
    pub fn discard(mut self) {
        self.report = false;
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.report {
            return;
        }
        let metrics = &self.state.metrics;
        let elapsed = self.received_at.elapsed();
        let labels = [self.route.path(), self.transport, status_class(self.status)];
        metrics.requests.with_label_values(&labels).inc();
        metrics
            .request_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        let usage = self.usage.unwrap_or_default();
        let completion_tokens = if self.usage.is_some() {
            usage.completion_tokens
        } else {
            self.chunks_sent
        };
        if self.status == 200 {
            metrics
                .prompt_tokens
                .with_label_values(&[&self.model])
                .inc_by(usage.prompt_tokens);
            metrics
                .completion_tokens
                .with_label_values(&[&self.model])
                .inc_by(completion_tokens);
        }
        if let Some(admission) = self.admission.take() {
            // A hit costs the GPUs nothing; an answer cut short without usage,
            // its prompt and the chunks it got.
            let used = match (self.cache_hit, self.usage) {
                (true, _) => 0,
                (false, Some(usage)) => usage.prompt_tokens + usage.completion_tokens,
                (false, None) if self.chunks_sent == 0 => 0,
                (false, None) => admission.prompt_estimate + self.chunks_sent,
            };
            admission.settle(used);
        }
        let ttft_ms = self
            .first_chunk_at
            .map(|t| (t - self.received_at).as_secs_f64() * 1000.0);
        let cache = if self.cache_hit { "hit" } else { "miss" };
        // Absent, rather than "miss", when the request failed before the lookup.
        let looked_up = self.looked_up.then_some(cache);
        self.trace.span.in_scope(|| {
            tracing::info!(
                request_id = self.request_id.as_str(),
                key = self.key_name.as_str(),
                key_id = self.key_id.as_deref().unwrap_or("-"),
                model = self.model.as_str(),
                transport = self.transport,
                status = self.status,
                cache = looked_up,
                prompt_tokens = usage.prompt_tokens,
                completion_tokens,
                ttft_ms,
                total_ms = elapsed.as_secs_f64() * 1000.0,
                "request finished"
            )
        });
        // Set on the trace's span directly: recording `tracing` fields would
        // re-format them for the log layer.
        self.trace.record(|span| {
            span.set_attribute(KeyValue::new("transport", self.transport));
            // Unknown when the request failed before authentication or parsing.
            if !self.key_name.is_empty() {
                span.set_attribute(KeyValue::new("key", self.key_name.clone()));
            }
            if !self.model.is_empty() {
                span.set_attribute(KeyValue::new("model", self.model.clone()));
            }
            span.set_attribute(KeyValue::new("status", i64::from(self.status)));
            if let Some(cache) = looked_up {
                span.set_attribute(KeyValue::new("cache", cache));
            }
            span.set_attribute(KeyValue::new(
                "prompt_tokens",
                saturating_i64(usage.prompt_tokens),
            ));
            span.set_attribute(KeyValue::new(
                "completion_tokens",
                saturating_i64(completion_tokens),
            ));
            if let Some(ttft) = ttft_ms {
                span.set_attribute(KeyValue::new("ttft_ms", ttft));
            }
            // OpenTelemetry's HTTP convention: a server span fails on 5xx only.
            if self.status >= 500 {
                crate::observe::telemetry::fail(span, format!("answered {}", self.status));
            }
        });
        if let Some(key_id) = self.key_id.take() {
            self.state.inference_log.log(InferenceRecord {
                request_id: std::mem::take(&mut self.request_id),
                key_id,
                model: std::mem::take(&mut self.model),
                prompt_tokens: saturating_i64(usage.prompt_tokens),
                completion_tokens: saturating_i64(completion_tokens),
                cache_hit: self.cache_hit,
                status: i32::from(self.status),
                ttft_ms,
                total_ms: elapsed.as_secs_f64() * 1000.0,
                created_at: Utc::now(),
            });
        }
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `2xx`, `4xx` or `5xx`: the status label of request metrics.
fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// What a transport sends next.
#[derive(Debug)]
pub enum Delivery {
    Chunk(Chunk),
    /// The response failed; nothing follows but the end marker.
    Error(ErrorInfo),
    Done,
}

enum Source {
    Cached {
        chunks: CachedResponse,
        next: usize,
    },
    Queue {
        responses: Box<dyn ResponseStream>,
        first: Option<ResponseEvent>,
    },
}

/// A response being delivered: from the cache or from a worker, through the token filters.
pub struct Completion {
    pub record: RequestRecord,
    source: Source,
    filters: FilterChain,
    /// A cached answer's chunks after the filters, one per chunk, filtered at
    /// once on the first call (one plugin call per filter, not per chunk).
    prefiltered: Option<std::collections::VecDeque<Filtered>>,
    /// Whether the final usage-only chunk is delivered (streams that asked, and JSON assembly).
    deliver_usage_chunk: bool,
    /// On a cache miss: the key and the raw chunks to store once complete.
    to_cache: Option<(String, Vec<Chunk>)>,
    last_chunk: Option<Chunk>,
    /// A chunk that must go out before `Done` (flushed held text).
    pending_done: bool,
    /// Whether the answer comes from the cache.
    replayed: bool,
    finished: bool,
    delivery: StageSpan,
}

/// Runs the request through the hooks, the cache and the queue. Returns the
/// response to deliver, or the error to answer with (before anything was sent).
pub async fn start(
    state: &Arc<AppState>,
    ctx: &RequestContext,
    mut request: InferenceRequest,
    mut record: RequestRecord,
) -> Result<Completion, (GatewayError, RequestRecord)> {
    record.model = request.model().to_string();
    if let Err(err) = within_limits(&state.config.server, &request) {
        record.fail(&err);
        return Err((err, record));
    }
    // Before the hooks: a request over its key's limits costs no plugin work.
    match state
        .limiter
        .admit(&ctx.identity, &ctx.request_id, &request)
        .await
    {
        Ok(admission) => record.admission = admission,
        Err(err) => {
            record.fail(&err);
            return Err((err, record));
        }
    }
    let cache_key = match state
        .policy
        .admit(ctx, &mut request, state.cache.is_some())
        .await
    {
        Ok(key) => key,
        Err(err) => {
            record.fail(&err);
            return Err((err, record));
        }
    };
    // After the hooks: the model checked is the one sent (a plugin may map aliases).
    let resolved = state.models.resolve(request.model()).and_then(|resolved| {
        let allowed = ctx.identity.allows_model(request.model())
            || (!resolved.pool.is_empty() && ctx.identity.allows_model(&resolved.pool));
        match allowed {
            true => Ok(resolved),
            false => {
                state.metrics.limited.with_label_values(&["model"]).inc();
                Err(models::no_access(request.model()))
            }
        }
    });
    let resolved = match resolved {
        Ok(resolved) => resolved,
        Err(err) => {
            record.fail(&err);
            return Err((err, record));
        }
    };
    if !resolved.pool.is_empty() {
        record.model = resolved.pool.clone();
    }
    if resolved.upstream != request.model() {
        request.set_model(resolved.upstream);
    }
    let cache_config = &state.config.cache;
    let cache_key = cache_key
        .filter(|_| cache_config.sampled || !request.is_sampled())
        .map(|key| scoped(cache_config.scope, &ctx.identity, key));
    let deliver_usage_chunk = !request.is_stream() || request.wants_usage_chunk();
    let filters = FilterChain::new(state.policy.token_filters(ctx));
    let metrics = &state.metrics;
    record.looked_up = true;
    let mut lookup = record.trace.stage("cache.lookup");
    match (&state.cache, &cache_key) {
        (Some(cache), Some(key)) => match cache.get(key).await {
            Ok(Some(chunks)) => {
                lookup.set("result", "hit");
                drop(lookup);
                metrics.cache_lookups.with_label_values(&["hit"]).inc();
                record.cache_hit = true;
                return Ok(Completion::new(
                    record,
                    Source::Cached { chunks, next: 0 },
                    filters,
                    deliver_usage_chunk,
                    None,
                ));
            }
            Ok(None) => {
                lookup.set("result", "miss");
                metrics.cache_lookups.with_label_values(&["miss"]).inc();
            }
            Err(err) => {
                lookup.set("result", "error");
                metrics.cache_lookups.with_label_values(&["error"]).inc();
                tracing::debug!(%err, "cache lookup failed; serving uncached");
            }
        },
        _ => {
            lookup.set("result", "bypass");
            metrics.cache_lookups.with_label_values(&["bypass"]).inc();
        }
    }
    drop(lookup);

    let submitted = Instant::now();
    // Spans from the submission to the first chunk back; the worker's spans are its children.
    let mut submit = record
        .trace
        .stage_of_kind("queue.submit", SpanKind::Producer);
    let mut queued = QueuedRequest::new(
        ctx.request_id.clone(),
        resolved.pool,
        request.route(),
        request.upstream_body(),
        record.trace.headers_from(&submit),
    );
    // Only prefix-affine pools route by it.
    let config = &state.config;
    let prefix_routed = config.upstream.balance == crate::config::Balance::Prefix
        || config
            .models
            .iter()
            .any(|m| m.balance == crate::config::Balance::Prefix);
    if prefix_routed {
        queued.prefix = request.prefix_key();
    }
    let mut responses = match state.queue.submit(queued).await {
        Ok(responses) => responses,
        Err(err) => {
            let err = GatewayError::from(err);
            record.fail(&err);
            return Err((err, record));
        }
    };
    let first = responses.next().await;
    metrics
        .queue_wait
        .observe(submitted.elapsed().as_secs_f64());
    submit.set("wait_ms", submitted.elapsed().as_secs_f64() * 1000.0);
    drop(submit);
    if let ResponseEvent::Error(info) = first {
        let err = GatewayError::Upstream(info);
        record.fail(&err);
        return Err((err, record));
    }
    let to_cache = cache_key.map(|key| (key, Vec::new()));
    Ok(Completion::new(
        record,
        Source::Queue {
            responses,
            first: Some(first),
        },
        filters,
        deliver_usage_chunk,
        to_cache,
    ))
}

/// A cache key within its scope: one key's requests (or one team's) never
/// share an entry with another's.
fn scoped(scope: CacheScope, identity: &crate::tenancy::auth::Identity, key: String) -> String {
    match (scope, &identity.team) {
        (CacheScope::Global, _) => key,
        (CacheScope::Team, Some(team)) => format!("team:{}:{key}", team.id),
        (CacheScope::Team | CacheScope::Key, _) => format!("key:{}:{key}", identity.key_id),
    }
}

/// Refuses requests for more generations than the gateway allows at once.
fn within_limits(
    server: &crate::config::ServerConfig,
    request: &InferenceRequest,
) -> Result<(), GatewayError> {
    let n = request.n();
    if n > server.max_n {
        return Err(GatewayError::BadRequest(format!(
            "invalid value for `n`: {n} is more than the limit of {}",
            server.max_n
        )));
    }
    let InferenceRequest::Completion(completion) = request else {
        return Ok(());
    };
    let prompts = completion.prompt.count();
    if prompts > server.max_prompts {
        return Err(GatewayError::BadRequest(format!(
            "invalid value for `prompt`: {prompts} prompts are more than the limit of {}",
            server.max_prompts
        )));
    }
    Ok(())
}

impl Completion {
    fn new(
        record: RequestRecord,
        source: Source,
        filters: FilterChain,
        deliver_usage_chunk: bool,
        to_cache: Option<(String, Vec<Chunk>)>,
    ) -> Self {
        record.state.metrics.active_streams.inc();
        let delivery = record.trace.stage("stream.delivery");
        let replayed = matches!(source, Source::Cached { .. });
        Self {
            replayed,
            delivery,
            record,
            source,
            filters,
            prefiltered: None,
            deliver_usage_chunk,
            to_cache,
            last_chunk: None,
            pending_done: false,
            finished: false,
        }
    }

    async fn next_event(&mut self) -> ResponseEvent {
        match &mut self.source {
            Source::Cached { chunks, next } => match chunks.get(*next) {
                Some(chunk) => {
                    *next += 1;
                    ResponseEvent::Chunk(chunk.clone())
                }
                None => ResponseEvent::Done,
            },
            Source::Queue { responses, first } => match first.take() {
                Some(event) => event,
                None => responses.next().await,
            },
        }
    }

    /// What the gateway reads from a chunk: for a cached answer, from the
    /// views the entry keeps (parsed by its first hit), else parsed here.
    fn summary_of(&self, chunk: &Chunk) -> ChunkSummary {
        match &self.source {
            // `next_event` has moved past the chunk already.
            Source::Cached { chunks, next } => chunks
                .views()
                .get(next.wrapping_sub(1))
                .and_then(Option::as_ref)
                .map_or_else(|| chunk.summary(), ChunkView::summary),
            Source::Queue { .. } => chunk.summary(),
        }
    }

    /// The next thing to send. After `Error` or `Done`, always `Done`.
    pub async fn next(&mut self) -> Delivery {
        loop {
            if self.pending_done {
                self.pending_done = false;
                return self.complete();
            }
            if self.finished {
                return Delivery::Done;
            }
            if let Source::Cached { chunks, next: 0 } = &self.source
                && self.prefiltered.is_none()
                && self.filters.has_filters()
            {
                match self.filters.apply_all(chunks).await {
                    Ok(filtered) => self.prefiltered = Some(filtered.into()),
                    Err(err) => return self.fail(err.info()),
                }
            }
            match self.next_event().await {
                ResponseEvent::Chunk(chunk) => {
                    let prefiltered = self.prefiltered.as_mut().and_then(|f| f.pop_front());
                    let summary = self.summary_of(&chunk);
                    if summary.usage.is_some() {
                        self.record.usage = summary.usage;
                    }
                    if let Some((_, raw)) = &mut self.to_cache {
                        raw.push(chunk.clone());
                    }
                    if summary.is_usage_only() {
                        if self.deliver_usage_chunk {
                            return self.deliver(chunk);
                        }
                        continue;
                    }
                    self.last_chunk = Some(chunk.clone());
                    let filtered = match prefiltered {
                        Some(filtered) => Ok(filtered),
                        None => self.filters.apply(chunk).await,
                    };
                    match filtered {
                        Ok(Filtered::Chunk(chunk)) => {
                            self.record.chunk_sent();
                            return self.deliver(chunk);
                        }
                        Ok(Filtered::Skip) => continue,
                        Ok(Filtered::Stop(chunk)) => {
                            // The response ends here: release the upstream now and do not cache a partial answer.
                            self.source = Source::Cached {
                                chunks: CachedChunks::new(Vec::new()),
                                next: 0,
                            };
                            self.to_cache = None;
                            self.pending_done = true;
                            self.record.chunk_sent();
                            return self.deliver(chunk);
                        }
                        Err(err) => return self.fail(err.info()),
                    }
                }
                ResponseEvent::Error(info) => return self.fail(info),
                ResponseEvent::Done => match self.filters.finish(self.last_chunk.as_ref()).await {
                    Ok(Some(chunk)) => {
                        self.pending_done = true;
                        self.record.chunk_sent();
                        return self.deliver(chunk);
                    }
                    Ok(None) => return self.complete(),
                    Err(err) => return self.fail(err.info()),
                },
            }
        }
    }

    /// A chunk for the client. A replayed answer's chunks are renamed for
    /// this request, as vLLM would have named them: a client learns each
    /// request's id from its chunks' `id`, cached or not.
    fn deliver(&self, chunk: Chunk) -> Delivery {
        match self.replayed {
            true => Delivery::Chunk(chunk.naming(&self.record.request_id)),
            false => Delivery::Chunk(chunk),
        }
    }

    fn fail(&mut self, info: ErrorInfo) -> Delivery {
        self.finished = true;
        self.to_cache = None;
        self.record.status = info.status;
        Delivery::Error(info)
    }

    fn complete(&mut self) -> Delivery {
        self.finished = true;
        self.record.status = 200;
        if let (Some((key, raw)), Some(cache)) =
            (self.to_cache.take(), self.record.state.cache.clone())
            && !raw.is_empty()
        {
            let chunks = CachedChunks::new(raw);
            let metrics = self.record.state.metrics.clone();
            tokio::spawn(async move {
                let result = match cache.put(&key, chunks).await {
                    Ok(()) => "stored",
                    Err(err) => {
                        tracing::debug!(%err, "could not store the response in the cache");
                        "failed"
                    }
                };
                metrics.cache_stores.with_label_values(&[result]).inc();
            });
        }
        Delivery::Done
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.record.state.metrics.active_streams.dec();
        self.delivery
            .set("chunks", saturating_i64(self.record.chunks_sent));
        let outcome = match (self.finished, self.record.status) {
            (false, _) => "client_closed",
            (true, 200) => "completed",
            (true, _) => "failed",
        };
        self.delivery.set("outcome", outcome);
    }
}
