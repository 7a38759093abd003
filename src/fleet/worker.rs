//! The worker: takes jobs from a [`JobSource`], calls the upstream with
//! `stream: true`, and forwards every chunk to the job's sink as it arrives.
//!
//! At most `concurrency` jobs run at once; the worker takes a new job only
//! when it has room, so a busy worker leaves work in the queue for others.
//! When a job is cancelled, its upstream request is dropped at once, closing
//! the connection so vLLM stops generating.
//!
//! Batch lines come in a lane of their own and start only while their
//! pool has room beyond `upstream.batch_headroom` of its capacity, so they
//! use what interactive traffic leaves and never hold a place it needs.
//!
//! A job about a stored response (`pinned_to`) runs on the endpoint the
//! [`AffinityMap`] says holds it, or fails with a clear error; a job whose
//! answer is stored (`stores`) records the endpoint that ran it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::FleetMetrics;
use crate::backends::affinity::AffinityMap;
use crate::backends::queue::{Job, JobSource, Lane, QueuedRequest, ResponseEvent};
use crate::error::GatewayError;
use crate::fleet::continuation::{self, Continuation};
use crate::fleet::endpoints::Running;
use crate::fleet::upstream::{Call, UpstreamClient, UpstreamError};
use crate::observe::telemetry::RequestTrace;
use crate::protocol::Chunk;

pub struct Worker {
    upstream: Arc<UpstreamClient>,
    metrics: Arc<FleetMetrics>,
    concurrency: usize,
    /// A job older than this when taken is answered with 503 instead of run.
    queue_timeout: Duration,
    affinity: Arc<dyn AffinityMap>,
    /// The share of capacity batch lines leave to interactive requests.
    batch_headroom: f64,
    /// Whether requests carry vLLM's `priority` for their class.
    vllm_priority: bool,
}

/// How often a batch line waiting for room looks again.
const BATCH_ROOM_POLL: Duration = Duration::from_millis(5);

impl Worker {
    pub fn new(
        upstream: Arc<UpstreamClient>,
        metrics: Arc<FleetMetrics>,
        concurrency: usize,
        queue_timeout: Duration,
        affinity: Arc<dyn AffinityMap>,
    ) -> Self {
        Self {
            upstream,
            metrics,
            concurrency,
            queue_timeout,
            affinity,
            batch_headroom: 0.05,
            vllm_priority: false,
        }
    }

    /// Requests carry vLLM's `priority` for their class (the fleet runs
    /// vLLM with priority scheduling).
    pub fn with_vllm_priority(mut self, enabled: bool) -> Self {
        self.vllm_priority = enabled;
        self
    }

    /// Batch lines leave this share of each pool's capacity free.
    pub fn with_batch_headroom(mut self, headroom: f64) -> Self {
        self.batch_headroom = headroom;
        self
    }

    /// Runs until `shutdown` fires, then waits up to `grace` for running jobs.
    pub async fn run(
        self: Arc<Self>,
        source: Arc<dyn JobSource>,
        shutdown: CancellationToken,
        grace: Duration,
    ) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        // Batch lines that arrive with the interactive requests (Kafka has
        // one request topic) go to the batch lane with their permit.
        let (to_lane, lane) = tokio::sync::mpsc::channel(self.concurrency);
        let batch_lane = tokio::spawn(self.clone().run_batch_lane(
            source.clone(),
            lane,
            shutdown.clone(),
        ));
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            let job = tokio::select! {
                job = source.next_job() => job,
                () = shutdown.cancelled() => break,
            };
            let Some(job) = job else { break };
            if job.request.lane == Lane::Batch {
                if to_lane.send((job, permit)).await.is_err() {
                    break;
                }
                continue;
            }
            let worker = self.clone();
            tokio::spawn(async move {
                worker.process(job, None).await;
                drop(permit);
            });
        }
        batch_lane.abort();
        let all = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("worker stopped with requests still running");
        }
    }

    /// Takes batch lines one at a time, each when its pool has room: from
    /// the source's batch lane, and those the main loop passes on (with the
    /// permit that counts them among the jobs the worker holds).
    async fn run_batch_lane(
        self: Arc<Self>,
        source: Arc<dyn JobSource>,
        mut passed: tokio::sync::mpsc::Receiver<(Job, OwnedSemaphorePermit)>,
        shutdown: CancellationToken,
    ) {
        loop {
            let (job, permit) = tokio::select! {
                job = source.next_batch_job() => match job {
                    Some(job) => (job, None),
                    None => return,
                },
                passed = passed.recv() => match passed {
                    Some((job, permit)) => (job, Some(permit)),
                    None => return,
                },
                () = shutdown.cancelled() => return,
            };
            let worker = self.clone();
            let mut running = None;
            if let Some(pool) = self.upstream.fleet().pool(&job.request.model) {
                while !pool.has_batch_room(self.batch_headroom) {
                    tokio::select! {
                        () = tokio::time::sleep(BATCH_ROOM_POLL) => {}
                        () = job.cancel.cancelled() => break,
                        () = shutdown.cancelled() => return,
                    }
                }
                if job.cancel.is_cancelled() {
                    continue;
                }
                // Counted from here, so the next line sees this one.
                running = Some(pool.run());
            }
            tokio::spawn(async move {
                worker.process(job, running).await;
                drop(permit);
            });
        }
    }

    /// Runs a job once its pool has room for it: a batch line comes with
    /// its place (`running`); an interactive request waits for one in
    /// weighted fair order among the tenants waiting.
    async fn process(self: Arc<Self>, mut job: Job, running: Option<Running>) {
        let trace = RequestTrace::continue_job(&job.request.request_id, &job.request.trace_context);
        // vLLM continues the trace from the worker's span.
        job.request.trace_context = trace.headers();
        let span = trace.span.clone();
        self.metrics.worker_inflight.inc();
        let cancel = job.cancel.clone();
        let pool = self.upstream.fleet().pool(&job.request.model).cloned();
        let outcome = tokio::select! {
            outcome = async {
                let _running = match (running, pool) {
                    (Some(running), _) => Some(running),
                    (None, Some(pool)) => {
                        Some(pool.enter(&job.request.tenant, job.request.priority).await)
                    }
                    (None, None) => None,
                };
                self.relay(&mut job, &trace).instrument(span.clone()).await
            } => outcome,
            () = cancel.cancelled() => "cancelled",
        };
        self.metrics.worker_inflight.dec();
        self.metrics
            .worker_requests
            .with_label_values(&[outcome])
            .inc();
        trace.record(|span| {
            span.set_attribute(opentelemetry::KeyValue::new("outcome", outcome));
            if outcome == "upstream_error" {
                crate::observe::telemetry::fail(span, "the upstream request failed");
            }
        });
        span.in_scope(|| tracing::debug!(outcome, "upstream request finished"));
    }

    /// Streams one job; returns its outcome label.
    async fn relay(&self, job: &mut Job, trace: &RequestTrace) -> &'static str {
        if job.request.lane == Lane::Interactive && job.request.age() > self.queue_timeout {
            let error = GatewayError::Overloaded(format!(
                "the request waited more than {:?} for a worker",
                self.queue_timeout
            ));
            let _ = job.sink.send(ResponseEvent::Error(error.info())).await;
            return "expired";
        }
        if self.vllm_priority
            && job.request.content_type.is_none()
            && let Some(body) = with_priority(
                &job.request.body,
                job.request.priority.vllm_priority(job.request.lane),
            )
        {
            job.request.body = body;
        }
        let mut headers = Vec::with_capacity(2 + job.request.trace_context.len());
        headers.push(("x-request-id".to_string(), job.request.request_id.clone()));
        if let Some(content_type) = &job.request.content_type {
            headers.push(("content-type".to_string(), content_type.clone()));
        }
        headers.extend(job.request.trace_context.iter().cloned());
        let request = &job.request;
        let pinned = match &request.pinned_to {
            None => None,
            Some(id) => match self.holder_of(id).await {
                Ok(endpoint) => Some(endpoint),
                Err(err) => return self.upstream_failed(job, err).await,
            },
        };
        let call = Call {
            model: &request.model,
            prefix: request.prefix,
            route: request.route,
            body: &request.body,
            headers: &headers,
            response_id: request.pinned_to.as_deref(),
            pinned: pinned.as_deref(),
        };
        if request.buffered {
            let answer = self.upstream.complete(call).await;
            let chunks = match answer {
                Ok((chunks, endpoint)) => {
                    self.place(request, endpoint.as_str()).await;
                    chunks
                }
                Err(err) => return self.upstream_failed(job, err).await,
            };
            for chunk in chunks {
                if job.sink.send(ResponseEvent::Chunk(chunk)).await.is_err() {
                    return "cancelled";
                }
            }
            let _ = job.sink.send(ResponseEvent::Done(0)).await;
            return "completed";
        }
        let mut stream = match self.upstream.open(call).await {
            Ok(stream) => stream,
            Err(err) => return self.upstream_failed(job, err).await,
        };
        if let Some(endpoint) = stream.endpoint() {
            self.place(request, endpoint.as_str()).await;
        }
        // The chunks sent, kept (shared bytes, never parsed) in case the
        // endpoint fails mid-answer and the stream is continued elsewhere.
        let continuable = request.route.generates()
            && self.upstream.max_continuations > 0
            && self
                .upstream
                .fleet()
                .pool(&request.model)
                .is_none_or(|pool| pool.continue_streams);
        let mut sent: Vec<Chunk> = Vec::new();
        let mut continued: Option<Continuation> = None;
        let mut continuations = 0;
        loop {
            let chunk = match stream.next().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    let _ = job.sink.send(ResponseEvent::Done(continuations)).await;
                    return "completed";
                }
                Err(err) if continuable && err.is_endpoint_failure() && !sent.is_empty() => {
                    let request = &job.request;
                    stream.eject(self.upstream.fleet());
                    let failed = stream.endpoint().cloned();
                    let plan = match continuations < self.upstream.max_continuations {
                        true => continuation::plan(request.route, &request.body, &sent),
                        false => None,
                    };
                    let Some(plan) = plan else {
                        self.metrics
                            .continuations
                            .with_label_values(&["not_continuable"])
                            .inc();
                        return self.upstream_failed(job, err).await;
                    };
                    let call = Call {
                        body: &plan.body,
                        ..call
                    };
                    let reopened = match &failed {
                        Some(failed) => self.upstream.open_elsewhere(call, failed).await,
                        None => self.upstream.open(call).await,
                    };
                    match reopened {
                        Ok(next) => {
                            tracing::warn!(%err, continuation = continuations + 1, "upstream endpoint failed mid-answer; continuing the stream on another endpoint");
                            self.metrics
                                .continuations
                                .with_label_values(&["continued"])
                                .inc();
                            continuations += 1;
                            let count = i64::from(continuations);
                            trace.record(|span| {
                                span.set_attribute(opentelemetry::KeyValue::new(
                                    "continuations",
                                    count,
                                ));
                            });
                            stream = next;
                            continued = Some(plan);
                            continue;
                        }
                        Err(again) => {
                            tracing::warn!(%err, %again, "upstream endpoint failed mid-answer and no other endpoint could continue it");
                            self.metrics
                                .continuations
                                .with_label_values(&["failed"])
                                .inc();
                            return self.upstream_failed(job, err).await;
                        }
                    }
                }
                Err(err) => return self.upstream_failed(job, err).await,
            };
            let chunk = match &mut continued {
                Some(plan) => match plan.follow(chunk) {
                    Some(chunk) => chunk,
                    None => continue,
                },
                None => chunk,
            };
            if continuable {
                sent.push(chunk.clone());
            }
            if job.sink.send(ResponseEvent::Chunk(chunk)).await.is_err() {
                return "cancelled";
            }
        }
    }

    /// The endpoint that holds stored response `id`.
    async fn holder_of(&self, id: &str) -> Result<String, UpstreamError> {
        match self.affinity.find(id).await {
            Ok(Some(holder)) => holder.endpoint.ok_or_else(|| not_found(id)),
            Ok(None) => Err(not_found(id)),
            Err(err) => Err(UpstreamError::HolderDown(format!(
                "cannot find the replica that holds response '{id}': {err}"
            ))),
        }
    }

    /// Records where a stored answer is held, before any of it is sent:
    /// a client can name it only once it has its id.
    async fn place(&self, request: &QueuedRequest, endpoint: &str) {
        let Some(id) = &request.stores else { return };
        if let Err(err) = self.affinity.place(id, endpoint).await {
            tracing::warn!(%err, response_id = %id, "could not record which replica holds a stored response; follow-ups naming it will fail");
        }
    }

    /// Counts an upstream failure and passes it on to the requester.
    async fn upstream_failed(&self, job: &mut Job, err: UpstreamError) -> &'static str {
        self.metrics
            .upstream_errors
            .with_label_values(&[err.kind()])
            .inc();
        let _ = job.sink.send(ResponseEvent::Error(err.info())).await;
        "upstream_error"
    }
}

/// A JSON object's body with vLLM's `priority` set last, so that it wins
/// over one the client sent; `None` when the body is not an object.
fn with_priority(body: &bytes::Bytes, priority: i64) -> Option<bytes::Bytes> {
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body[end] != b'}' {
        return None;
    }
    let before = body[..end].iter().rposition(|b| !b.is_ascii_whitespace())?;
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(&body[..end]);
    if body[before] != b'{' {
        out.push(b',');
    }
    out.extend_from_slice(format!("\"priority\":{priority}}}").as_bytes());
    Some(out.into())
}

fn not_found(id: &str) -> UpstreamError {
    UpstreamError::HolderGone(format!("Response with id '{id}' not found."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_priority_goes_last_so_it_wins() {
        let set = |body: &'static str| {
            with_priority(&bytes::Bytes::from_static(body.as_bytes()), 2)
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
        };
        assert_eq!(
            set(r#"{"model":"m","priority":-5} "#).unwrap(),
            r#"{"model":"m","priority":-5,"priority":2}"#
        );
        assert_eq!(set("{ }").unwrap(), r#"{ "priority":2}"#);
        assert_eq!(set("[1]"), None);
        let parsed: serde_json::Value =
            serde_json::from_str(&set(r#"{"priority":9}"#).unwrap()).unwrap();
        assert_eq!(
            parsed["priority"], 2,
            "the last one counts, as in vLLM's parser"
        );
    }
}
