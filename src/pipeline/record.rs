//! A [`RequestRecord`] follows each request from authentication to its
//! last byte; when it is dropped (finished, failed or abandoned by the
//! client) it writes the request's metrics, its log line, its root span's
//! attributes and its inference-log row, and settles its limits.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use opentelemetry::KeyValue;

use super::state::Stages;
use crate::backends::store::InferenceRecord;
use crate::error::GatewayError;
use crate::observe::telemetry::RequestTrace;
use crate::protocol::{Route, Usage};
use crate::tenancy::Identity;
use crate::tenancy::limits::Admission;

/// HTTP status logged for a request whose client went away first (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// Everything measured about one request; reported when dropped.
pub struct RequestRecord {
    pub(super) state: Arc<Stages>,
    /// The request's root span (every stage's span is a child of it) and sampling decision.
    pub trace: RequestTrace,
    pub key_name: String,
    pub request_id: String,
    pub route: Route,
    pub transport: &'static str,
    pub key_id: Option<String>,
    pub model: String,
    pub cache_hit: bool,
    /// Times the stream was continued on another endpoint after its own failed.
    pub continuations: u32,
    /// Whether the cache was consulted (false when the request failed first).
    pub(super) looked_up: bool,
    /// Cleared by [`RequestRecord::discard`]: nothing is reported.
    report: bool,
    pub status: u16,
    received_at: Instant,
    first_chunk_at: Option<Instant>,
    last_chunk_at: Option<Instant>,
    pub usage: Option<Usage>,
    pub(super) chunks_sent: u64,
    /// Output pieces generated (a choice's text or tool-call piece in a
    /// chunk; about a token each): the count when the upstream sends no usage.
    pub(super) generated: u64,
    /// The request's place in its key's limits, settled when the record drops.
    pub admission: Option<Admission>,
}

impl RequestRecord {
    pub fn new(
        state: Arc<Stages>,
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
            continuations: 0,
            looked_up: false,
            report: true,
            status: CLIENT_CLOSED,
            received_at,
            first_chunk_at: None,
            last_chunk_at: None,
            usage: None,
            chunks_sent: 0,
            generated: 0,
            admission: None,
        }
    }

    pub(super) fn chunk_sent(&mut self) {
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
    pub fn identify(&mut self, identity: &Identity) {
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
            self.generated
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
                (false, None) if self.generated == 0 => 0,
                (false, None) => admission.prompt_estimate + self.generated,
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
                route = self.route.path(),
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
                route: self.route.path().to_string(),
                model: std::mem::take(&mut self.model),
                prompt_tokens: saturating_i64(usage.prompt_tokens),
                completion_tokens: saturating_i64(completion_tokens),
                cache_hit: self.cache_hit,
                continuations: i32::try_from(self.continuations).unwrap_or(i32::MAX),
                status: i32::from(self.status),
                ttft_ms,
                total_ms: elapsed.as_secs_f64() * 1000.0,
                created_at: Utc::now(),
            });
        }
    }
}

pub(super) fn saturating_i64(n: u64) -> i64 {
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
