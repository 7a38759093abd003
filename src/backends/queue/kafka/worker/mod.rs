//! The worker's side of the Kafka queue: a consumer-group member on the
//! request topic, an outbox per edge that coalesces waiting frames into one
//! response message, heartbeats for quiet jobs, and a listener on the cancel
//! topic that stops jobs whose clients went away.
//!
//! An outbox is bounded (`queue.max_outbox_bytes`): while the broker is
//! behind, a job waits for room before taking its next chunk from vLLM, so
//! the back-pressure reaches vLLM over TCP instead of piling up here. A batch
//! larger than a message may be is split at frame boundaries; a single frame
//! too large for any message ends only its own request, with an error.
//!
//! [`outbox`] holds the frames per edge, [`liveness`] the cancel topic, the
//! heartbeats and the edges' signs of life, [`group`] the check that the
//! consumer group leaves no request partition unread.

mod group;
mod liveness;
mod outbox;

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::Message;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::frames::FrameKind;
use super::reconnect::{self, Consumer, Producer, Reconnecting, Session};
use super::*;
use crate::backends::queue::QueueConfig;
use crate::backends::queue::QueueMetrics;
use crate::backends::queue::{
    Job, JobSource, Lane, Priority, QueuedRequest, ResponseEvent, ResponseSink, SinkClosed,
};
use crate::protocol::Route;
use group::watch_group;
use liveness::{listen_for_cancels, send_heartbeats};
use outbox::{Outbox, Reply};

struct WorkerShared {
    kafka: KafkaConfig,
    producer: Producer,
    loss: Arc<BrokerLoss>,
    worker_id: String,
    inflight: Mutex<HashMap<String, Arc<Reply>>>,
    outboxes: Mutex<HashMap<(String, i32), Arc<Outbox>>>,
    /// Request id → highest attempt cancelled, and when.
    cancelled: Mutex<HashMap<String, (u32, Instant)>>,
    queue_timeout: Duration,
    /// How long an edge may be silent before its requests are orphans.
    edge_timeout: Duration,
    /// When each edge last said it was alive.
    edges: Mutex<HashMap<String, Instant>>,
    metrics: Arc<QueueMetrics>,
}

impl WorkerShared {
    fn was_cancelled(&self, request_id: &str, attempt: u32) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.get(request_id).is_some_and(|(upto, _)| attempt <= *upto))
            .unwrap_or(false)
    }
}

/// The worker's side of the Kafka queue.
pub struct KafkaJobSource {
    shared: Arc<WorkerShared>,
    versions: VersionCheck,
    consumer: Arc<Consumer>,
    tasks: Vec<JoinHandle<()>>,
    /// When the offsets taken were last committed.
    committed: Mutex<Instant>,
}

/// How often a worker commits the offsets of the requests it took.
const COMMIT_EVERY: Duration = Duration::from_secs(1);

impl Drop for KafkaJobSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KafkaJobSource {
    pub async fn connect(
        kafka: &KafkaConfig,
        queue: &QueueConfig,
        metrics: Arc<QueueMetrics>,
    ) -> Result<Self, QueueError> {
        ensure_topics(kafka).await?;
        let loss = Arc::new(BrokerLoss::default());
        let worker_id = format!("worker-{}", uuid::Uuid::new_v4().simple());
        // Offsets are committed as requests are taken (at most once; every
        // second, and before partitions move to another worker), never by
        // librdkafka itself: it would commit on closing, and a session closed
        // for a lost broker must not commit its old offsets to a restarted one.
        // Edges retry lost requests. A worker polls only when it has capacity,
        // hence the long poll interval.
        let consumer: Consumer = client_config(
            kafka,
            &[
                ("group.id", kafka.worker_group.as_str()),
                ("enable.auto.commit", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                ("max.poll.interval.ms", "3600000"),
            ],
            &kafka.consumer,
        )
        .create_with_context(Watched(loss.clone()))
        .map_err(|e| unavailable(kafka, e))?;
        consumer
            .subscribe(&[&kafka.request_topic])
            .map_err(|e| unavailable(kafka, e))?;
        // Cancellations need not be as quick as tokens: a long fetch wait keeps this
        // consumer from polling a broker that, like tansu, holds every fetch that long.
        let cancels = tail_consumer(
            kafka,
            &loss,
            &format!("sluice-cancels-{worker_id}"),
            &kafka.cancel_topic,
            vec![0],
            &[("fetch.wait.max.ms", "100")],
        )
        .await?;
        let shared = Arc::new(WorkerShared {
            kafka: kafka.clone(),
            producer: producer(kafka, &loss)?,
            loss,
            worker_id,
            inflight: Default::default(),
            outboxes: Default::default(),
            cancelled: Default::default(),
            queue_timeout: queue.queue_timeout,
            edge_timeout: queue.worker_timeout,
            edges: Default::default(),
            metrics,
        });
        let consumer = Arc::new(consumer);
        let tasks = vec![
            tokio::spawn(listen_for_cancels(cancels, shared.clone())),
            tokio::spawn(send_heartbeats(shared.clone(), queue.heartbeat)),
            tokio::spawn(watch_group(Arc::downgrade(&consumer), shared.clone())),
        ];
        tracing::info!(worker_id = %shared.worker_id, group = %kafka.worker_group, "Kafka worker connected");
        Ok(Self {
            versions: VersionCheck::new(&kafka.request_topic),
            shared,
            consumer,
            tasks,
            committed: Mutex::new(Instant::now()),
        })
    }

    /// Commits the offsets taken so far, at most every [`COMMIT_EVERY`] (a
    /// message's offset is stored as it is received).
    fn commit_now_and_then(&self) {
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if committed.elapsed() >= COMMIT_EVERY {
            *committed = Instant::now();
            let _ = self
                .consumer
                .commit_consumer_state(rdkafka::consumer::CommitMode::Async);
        }
    }

    fn parse_job(&self, message: &impl Message) -> Result<Job, &'static str> {
        let h = ReadHeaders::of(message);
        if !self.versions.speaks(&h) {
            return Err("version");
        }
        if h.str(H_KIND) != Some(KIND_REQUEST) {
            return Err("malformed");
        }
        let (
            Some(request_id),
            Some(edge_id),
            Some(partition),
            Some(attempt),
            Some(submitted_at_ms),
        ) = (
            h.str(H_REQUEST),
            h.str(H_EDGE),
            h.num::<i32>(H_REPLY_PARTITION),
            h.num::<u32>(H_ATTEMPT),
            h.num::<i64>(H_SUBMITTED),
        )
        else {
            return Err("malformed");
        };
        let body = message.payload().unwrap_or_default();
        let content_type = h.str(H_CONTENT_TYPE).map(str::to_string);
        // A body without a content-type of its own is JSON (an upload is a multipart form).
        if content_type.is_none() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err()
        {
            return Err("malformed");
        }
        let route = match h.str(H_ROUTE) {
            None => Route::Completions,
            Some(path) => Route::from_path(path).ok_or("malformed")?,
        };
        let request = QueuedRequest {
            request_id: request_id.to_string(),
            model: h.str(H_MODEL).unwrap_or_default().to_string(),
            prefix: h
                .str(H_PREFIX)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .unwrap_or(0),
            buffered: h.str(H_BUFFERED) == Some("1"),
            route,
            body: Bytes::copy_from_slice(body),
            content_type,
            pinned_to: h.str(H_PINNED_TO).map(str::to_string),
            stores: h.str(H_STORES).map(str::to_string),
            trace_context: h.trace_context(),
            submitted_at_ms,
            lane: match h.str(H_LANE) {
                Some("batch") => Lane::Batch,
                _ => Lane::Interactive,
            },
            tenant: h.str(H_TENANT).unwrap_or_default().to_string(),
            priority: h
                .str(H_PRIORITY)
                .and_then(Priority::parse)
                .unwrap_or_default(),
        };
        self.shared
            .metrics
            .consume_delay
            .observe(request.age().as_secs_f64());
        if request.lane == Lane::Interactive && request.age() > self.shared.queue_timeout {
            return Err("expired");
        }
        if self.shared.was_cancelled(request_id, attempt) {
            return Err("cancelled");
        }
        let reply = Arc::new(Reply {
            request_id: request_id.to_string(),
            attempt,
            outbox: Mutex::new(self.shared.outbox(edge_id, partition)),
            edge_id: edge_id.to_string(),
            partition,
            cancel: CancellationToken::new(),
            last_sent_ms: AtomicI64::new(0),
        });
        if let Ok(mut inflight) = self.shared.inflight.lock() {
            inflight.insert(reply.request_id.clone(), reply.clone());
        }
        self.shared
            .send_frame(&reply, FrameKind::Accepted, Some(0), &[]);
        let cancel = reply.cancel.clone();
        Ok(Job {
            request,
            sink: Box::new(KafkaSink {
                shared: self.shared.clone(),
                reply,
                next_seq: 1,
                ended: false,
            }),
            cancel,
        })
    }
}

#[async_trait]
impl JobSource for KafkaJobSource {
    async fn ping(&self) -> Result<(), QueueError> {
        reachable(
            &self.shared.producer,
            &self.shared.kafka,
            &self.shared.kafka.request_topic,
        )
        .await
    }

    async fn next_job(&self) -> Option<Job> {
        loop {
            // An idle worker still commits what it took, once its second is up.
            let received = tokio::select! {
                received = self.consumer.recv() => received,
                () = tokio::time::sleep(COMMIT_EVERY) => {
                    self.commit_now_and_then();
                    continue;
                }
            };
            let message = match received {
                Ok(message) => message,
                Err(err) => {
                    self.shared.loss.note(&err);
                    tracing::warn!(%err, "error reading the request topic");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.commit_now_and_then();
            match self.parse_job(&message) {
                Ok(job) => return Some(job),
                Err(reason) => {
                    if reason == "malformed" {
                        tracing::warn!(
                            partition = message.partition(),
                            offset = message.offset(),
                            "skipping a malformed request message"
                        );
                    }
                    self.shared
                        .metrics
                        .messages_skipped
                        .with_label_values(&[self.shared.kafka.request_topic.as_str(), reason])
                        .inc();
                }
            }
        }
    }
}

/// Queues one job's events, in order, for its edge.
struct KafkaSink {
    shared: Arc<WorkerShared>,
    reply: Arc<Reply>,
    next_seq: u64,
    ended: bool,
}

#[async_trait]
impl ResponseSink for KafkaSink {
    async fn send(&mut self, event: ResponseEvent) -> Result<(), SinkClosed> {
        if self.reply.cancel.is_cancelled() || self.ended {
            return Err(SinkClosed);
        }
        let seq = Some(self.next_seq);
        self.next_seq += 1;
        match &event {
            ResponseEvent::Chunk(chunk) => {
                // The job takes its next chunk from vLLM only once there is room.
                if self
                    .shared
                    .send_frame(&self.reply, FrameKind::Chunk, seq, chunk.framed())
                {
                    self.shared.wait_for_room(&self.reply).await;
                }
            }
            ResponseEvent::Error(info) => {
                let payload = serde_json::to_vec(info).unwrap_or_default();
                self.shared
                    .send_frame(&self.reply, FrameKind::Error, seq, &payload);
                self.ended = true;
            }
            ResponseEvent::Done(continuations) => {
                // Empty when 0, as an edge from before the count expects.
                let count = continuations.to_be_bytes();
                let payload: &[u8] = if *continuations == 0 { &[] } else { &count };
                self.shared
                    .send_frame(&self.reply, FrameKind::Done, seq, payload);
                self.ended = true;
            }
        }
        Ok(())
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.shared.inflight.lock()
            && inflight
                .get(&self.reply.request_id)
                .is_some_and(|r| Arc::ptr_eq(r, &self.reply))
        {
            inflight.remove(&self.reply.request_id);
        }
    }
}

impl Session for KafkaJobSource {
    const ROLE: &'static str = "worker";

    async fn connect(
        kafka: KafkaConfig,
        queue: QueueConfig,
        metrics: Arc<QueueMetrics>,
    ) -> Result<Self, QueueError> {
        KafkaJobSource::connect(&kafka, &queue, metrics).await
    }

    fn loss(&self) -> &BrokerLoss {
        &self.shared.loss
    }

    /// Stops every job: their answers can no longer reach their edges.
    fn close(&self) {
        let inflight = self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for reply in inflight.values() {
            reply.cancel.cancel();
        }
    }
}

/// A worker's job source that reconnects after losing its brokers.
pub type ReconnectingJobSource = Reconnecting<KafkaJobSource>;

#[async_trait]
impl JobSource for ReconnectingJobSource {
    async fn ping(&self) -> Result<(), QueueError> {
        match self.current() {
            Some(source) => source.ping().await,
            None => Err(reconnect::unreachable()),
        }
    }

    async fn next_job(&self) -> Option<Job> {
        loop {
            let source = self.connected().await;
            tokio::select! {
                job = source.next_job() => return job,
                () = source.loss().wait() => {
                    // The last holder drops the session; its consumer closes off the runtime.
                    drop(tokio::task::spawn_blocking(move || drop(source)));
                }
            }
        }
    }
}
