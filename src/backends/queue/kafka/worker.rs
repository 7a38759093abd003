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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::frames::{self, Frame, FrameKind, Piece};
use super::reconnect::{self, Consumer, Producer, Reconnecting, Session};
use super::*;
use crate::backends::queue::QueueConfig;
use crate::backends::queue::QueueMetrics;
use crate::backends::queue::{
    Job, JobSource, QueuedRequest, ResponseEvent, ResponseSink, SinkClosed,
};
use crate::protocol::Route;

/// Room for a response message's record overhead and headers within the
/// producer's `message.max.bytes`.
const MESSAGE_OVERHEAD: usize = 512;
/// An outbox unused this long is closed (its edge is probably gone).
const OUTBOX_IDLE: Duration = Duration::from_secs(300);

/// Where a job's responses go, and its cancellation.
struct Reply {
    request_id: String,
    attempt: u32,
    outbox: Mutex<Arc<Outbox>>,
    edge_id: String,
    partition: i32,
    cancel: CancellationToken,
    /// Unix ms of the last frame queued for this job (for heartbeats).
    last_sent_ms: AtomicI64,
}

/// Frames waiting to be produced to one edge's reply partition.
struct Outbox {
    edge_id: String,
    partition: i32,
    buffer: Mutex<OutboxBuffer>,
    ready: Notify,
    /// Signalled when the flusher takes the buffer: room for waiting jobs.
    drained: Notify,
}

#[derive(Default)]
struct OutboxBuffer {
    frames: Vec<u8>,
    closed: bool,
}

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
    fn outbox(self: &Arc<Self>, edge_id: &str, partition: i32) -> Arc<Outbox> {
        let mut outboxes = self.outboxes.lock().unwrap_or_else(|p| p.into_inner());
        outboxes
            .entry((edge_id.to_string(), partition))
            .or_insert_with(|| {
                let outbox = Arc::new(Outbox {
                    edge_id: edge_id.to_string(),
                    partition,
                    buffer: Default::default(),
                    ready: Notify::new(),
                    drained: Notify::new(),
                });
                tokio::spawn(flush_outbox(self.clone(), outbox.clone()));
                outbox
            })
            .clone()
    }

    /// Queues one frame for the job's edge; the outbox's flusher produces
    /// it. Returns whether the outbox is now full (`max_outbox_bytes`).
    fn send_frame(
        self: &Arc<Self>,
        reply: &Reply,
        kind: FrameKind,
        seq: Option<u64>,
        payload: &[u8],
    ) -> bool {
        reply
            .last_sent_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        let mut outbox = reply.outbox.lock().unwrap_or_else(|p| p.into_inner());
        let full = loop {
            {
                let mut buffer = outbox.buffer.lock().unwrap_or_else(|p| p.into_inner());
                if !buffer.closed {
                    let before = buffer.frames.len();
                    frames::encode(
                        &mut buffer.frames,
                        kind,
                        reply.attempt,
                        seq,
                        &reply.request_id,
                        payload,
                    );
                    let added = buffer.frames.len() - before;
                    self.metrics.outbox_bytes.add(added as i64);
                    break buffer.frames.len() >= self.kafka.max_outbox_bytes;
                }
            }
            // The outbox closed after idling; open a fresh one.
            *outbox = self.outbox(&reply.edge_id, reply.partition);
        };
        outbox.ready.notify_one();
        full
    }

    /// Waits while the job's outbox holds `max_outbox_bytes` or more (the
    /// broker is behind), or until the job is cancelled.
    async fn wait_for_room(&self, reply: &Reply) {
        let mut counted = false;
        loop {
            let outbox = reply
                .outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let drained = outbox.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let buffer = outbox.buffer.lock().unwrap_or_else(|p| p.into_inner());
                if buffer.closed || buffer.frames.len() < self.kafka.max_outbox_bytes {
                    return;
                }
            }
            if !counted {
                self.metrics.outbox_full.inc();
                counted = true;
            }
            tokio::select! {
                _ = &mut drained => {}
                _ = reply.cancel.cancelled() => return,
            }
        }
    }

    /// Produces one response message and waits for its acknowledgement.
    async fn produce(
        &self,
        outbox: &Outbox,
        headers: &OwnedHeaders,
        payload: &[u8],
    ) -> Result<(), KafkaError> {
        let sent = Instant::now();
        loop {
            let record = FutureRecord::<str, [u8]>::to(&self.kafka.response_topic)
                .partition(outbox.partition)
                .key(outbox.edge_id.as_str())
                .payload(payload)
                .headers(headers.clone());
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    return match delivery.await {
                        Ok(Ok(_)) => {
                            self.metrics.produce.observe(sent.elapsed().as_secs_f64());
                            Ok(())
                        }
                        Ok(Err((err, _))) => Err(err),
                        Err(_) => Err(KafkaError::Canceled),
                    };
                }
                Err((err, _)) if err.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => return Err(err),
            }
        }
    }

    /// Produces a batch of frames: as one message when it fits, else as
    /// many as it takes, split at frame boundaries. A broker that refuses a
    /// message as too large (its limit below the producer's) gets it again
    /// in halves; a single frame too large for any message ends its request.
    async fn produce_batch(&self, outbox: &Outbox, headers: &OwnedHeaders, batch: &[u8]) {
        let mut limit = self
            .kafka
            .max_message_bytes
            .saturating_sub(MESSAGE_OVERHEAD)
            .max(1);
        let mut parts = VecDeque::from([Piece::Message(0..batch.len())]);
        while let Some(piece) = parts.pop_front() {
            let range = match piece {
                Piece::TooLarge(frame) => {
                    self.refuse(outbox, headers, frame, limit).await;
                    continue;
                }
                Piece::Message(range) => range,
            };
            let part = &batch[range.clone()];
            if part.len() <= limit {
                match self.produce(outbox, headers, part).await {
                    Ok(()) => continue,
                    Err(err) if is_too_large(&err) => limit = part.len() / 2,
                    Err(err) => {
                        tracing::warn!(%err, edge = %outbox.edge_id, "a response message was not delivered");
                        continue;
                    }
                }
            }
            for piece in frames::split(part, limit).into_iter().rev() {
                parts.push_front(piece.offset(range.start));
            }
        }
    }

    /// Ends the request of a frame no message can carry: an error to its
    /// client in the frame's place, and its job cancelled.
    async fn refuse(&self, outbox: &Outbox, headers: &OwnedHeaders, frame: Frame, limit: usize) {
        self.metrics.frames_too_large.inc();
        let size = frame.payload.len();
        tracing::warn!(
            request_id = %frame.request_id,
            size,
            limit,
            "a response chunk is larger than a queue message may be; ending its request"
        );
        if let Some(reply) = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&frame.request_id)
            .filter(|r| r.attempt == frame.attempt)
        {
            reply.cancel.cancel();
        }
        let info = crate::error::GatewayError::Internal(format!(
            "a response chunk of {size} bytes is larger than the queue's message limit ({limit} bytes)"
        ))
        .info();
        let mut error = Vec::new();
        frames::encode(
            &mut error,
            FrameKind::Error,
            frame.attempt,
            frame.seq,
            &frame.request_id,
            &serde_json::to_vec(&info).unwrap_or_default(),
        );
        if let Err(err) = self.produce(outbox, headers, &error).await {
            tracing::warn!(%err, request_id = %frame.request_id, "the error for an oversize chunk was not delivered");
        }
    }

    fn was_cancelled(&self, request_id: &str, attempt: u32) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.get(request_id).is_some_and(|(upto, _)| attempt <= *upto))
            .unwrap_or(false)
    }
}

/// Produces an outbox's frames, one message per batch, one batch at a time:
/// when idle each frame leaves at once; under load the frames that arrive
/// while a message waits for its acknowledgement share the next one.
async fn flush_outbox(shared: Arc<WorkerShared>, outbox: Arc<Outbox>) {
    let headers_for = headers(&[
        (H_KIND, KIND_FRAMES),
        (H_EDGE, outbox.edge_id.as_str()),
        (H_WORKER, shared.worker_id.as_str()),
    ]);
    loop {
        let idle = tokio::select! {
            woken = tokio::time::timeout(OUTBOX_IDLE, outbox.ready.notified()) => woken.is_err(),
            () = shared.loss.wait() => return,
        };
        let batch = {
            let mut buffer = outbox.buffer.lock().unwrap_or_else(|p| p.into_inner());
            if buffer.frames.is_empty() {
                if idle {
                    buffer.closed = true;
                    drop(buffer);
                    outbox.drained.notify_waiters();
                    let mut outboxes = shared.outboxes.lock().unwrap_or_else(|p| p.into_inner());
                    let key = (outbox.edge_id.clone(), outbox.partition);
                    if outboxes.get(&key).is_some_and(|o| Arc::ptr_eq(o, &outbox)) {
                        outboxes.remove(&key);
                    }
                    return;
                }
                continue;
            }
            std::mem::take(&mut buffer.frames)
        };
        shared.metrics.outbox_bytes.sub(batch.len() as i64);
        outbox.drained.notify_waiters();
        // A lost broker ends the wait for acknowledgements: the producer must
        // not outlive the session (see `reconnect`).
        tokio::select! {
            () = shared.produce_batch(&outbox, &headers_for, &batch) => {}
            () = shared.loss.wait() => return,
        }
        // Frames may have arrived while producing; make sure they are not left behind.
        if !outbox
            .buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frames
            .is_empty()
        {
            outbox.ready.notify_one();
        }
    }
}

fn is_too_large(err: &KafkaError) -> bool {
    err.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

/// The worker's side of the Kafka queue.
pub struct KafkaJobSource {
    shared: Arc<WorkerShared>,
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
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
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
            route,
            body: Bytes::copy_from_slice(body),
            trace_context: h.trace_context(),
            submitted_at_ms,
        };
        self.shared
            .metrics
            .consume_delay
            .observe(request.age().as_secs_f64());
        if request.age() > self.shared.queue_timeout {
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
            ResponseEvent::Done => {
                self.shared
                    .send_frame(&self.reply, FrameKind::Done, seq, &[]);
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

async fn listen_for_cancels(consumer: Consumer, shared: Arc<WorkerShared>) {
    let mut last_sweep = Instant::now();
    loop {
        let received = tokio::select! {
            received = consumer.recv() => received,
            () = shared.loss.wait() => break,
        };
        let message = match received {
            Ok(message) => message,
            Err(err) => {
                shared.loss.note(&err);
                tracing::warn!(%err, "error reading the cancel topic");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let h = ReadHeaders::of(&message);
        if let (Some(KIND_EDGE_ALIVE), Some(edge)) = (h.str(H_KIND), h.str(H_EDGE)) {
            if let Ok(mut edges) = shared.edges.lock() {
                edges.insert(edge.to_string(), Instant::now());
            }
            continue;
        }
        let (Some(KIND_CANCEL), Some(request_id), Some(attempt)) =
            (h.str(H_KIND), h.str(H_REQUEST), h.num::<u32>(H_ATTEMPT))
        else {
            shared
                .metrics
                .messages_skipped
                .with_label_values(&[shared.kafka.cancel_topic.as_str(), "malformed"])
                .inc();
            continue;
        };
        if let Ok(inflight) = shared.inflight.lock()
            && let Some(reply) = inflight.get(request_id).filter(|r| r.attempt <= attempt)
        {
            reply.cancel.cancel();
        }
        if let Ok(mut cancelled) = shared.cancelled.lock() {
            let entry = cancelled
                .entry(request_id.to_string())
                .or_insert((0, Instant::now()));
            entry.0 = entry.0.max(attempt);
            // Requests older than the queue timeout are dropped on arrival anyway.
            if last_sweep.elapsed() > shared.queue_timeout {
                let horizon = shared.queue_timeout * 2;
                cancelled.retain(|_, (_, at)| at.elapsed() < horizon);
                last_sweep = Instant::now();
            }
        }
    }
    // The brokers are gone: closing the consumer waits for them, so not here.
    drop(tokio::task::spawn_blocking(move || drop(consumer)));
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

/// Signals life for jobs that sent nothing for a heartbeat interval (a long
/// prefill, a slow upstream), so their edges do not give up on them.
async fn send_heartbeats(shared: Arc<WorkerShared>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every_ms = every.as_millis() as i64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shared.loss.wait() => return,
        }
        let now = chrono::Utc::now().timestamp_millis();
        let quiet: Vec<Arc<Reply>> = match shared.inflight.lock() {
            Ok(inflight) => inflight
                .values()
                .filter(|r| now - r.last_sent_ms.load(Ordering::Relaxed) >= every_ms)
                .cloned()
                .collect(),
            Err(_) => continue,
        };
        for reply in quiet {
            shared.send_frame(&reply, FrameKind::Heartbeat, None, &[]);
        }
        shared.cancel_orphans();
    }
}

impl WorkerShared {
    /// Cancels the requests of edges silent for `edge_timeout`: they died,
    /// and nobody will read the answers (vLLM stops generating for them).
    /// Edges never heard from are left alone.
    fn cancel_orphans(&self) {
        let silent: Vec<String> = match self.edges.lock() {
            Ok(mut edges) => {
                let silent: Vec<String> = edges
                    .iter()
                    .filter(|(_, seen)| seen.elapsed() > self.edge_timeout)
                    .map(|(edge, _)| edge.clone())
                    .collect();
                // An edge silent for long is forgotten; if it comes back it is heard again.
                edges.retain(|_, seen| seen.elapsed() < self.edge_timeout * 10);
                silent
            }
            Err(_) => return,
        };
        if silent.is_empty() {
            return;
        }
        let Ok(inflight) = self.inflight.lock() else {
            return;
        };
        for reply in inflight.values().filter(|r| silent.contains(&r.edge_id)) {
            if !reply.cancel.is_cancelled() {
                tracing::warn!(edge_id = %reply.edge_id, request_id = %reply.request_id, "the request's edge went silent; cancelling it");
                self.metrics.orphans_cancelled.inc();
                reply.cancel.cancel();
            }
        }
    }
}

/// How often a worker checks that its consumer group reads every request partition.
const GROUP_CHECK_EVERY: Duration = Duration::from_secs(3);

/// Rejoins the consumer group when, though stable, it leaves this worker
/// fewer request partitions than its share: a broker that dropped a dead
/// member without starting a new generation (tansu 0.6 does, when the member
/// was killed rather than stopped) leaves that member's partitions unread
/// until the group rebalances, and leaving and joining again makes it
/// rebalance. Two checks in a row must agree, so a rebalance under way is
/// not mistaken for it. On Apache Kafka the check never fires.
async fn watch_group(consumer: std::sync::Weak<Consumer>, shared: Arc<WorkerShared>) {
    let mut ticker = tokio::time::interval(GROUP_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut short_before = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shared.loss.wait() => return,
        }
        let (weak, kafka) = (consumer.clone(), shared.kafka.clone());
        let rejoin_if_short = short_before;
        // The lookups and the rejoin block, and if the session was dropped
        // meanwhile, the consumer is destroyed here: all off the runtime.
        let checked = tokio::task::spawn_blocking(move || {
            let consumer = weak.upgrade()?;
            let held = consumer.assignment().map_or(0, |list| list.count());
            let shortfall = share_shortfall(&consumer, &kafka, held);
            let rejoined = (shortfall.is_some() && rejoin_if_short).then(|| {
                consumer.unsubscribe();
                consumer.subscribe(&[&kafka.request_topic])
            });
            Some((held, shortfall, rejoined))
        })
        .await;
        let Ok(Some((held, shortfall, rejoined))) = checked else {
            return;
        };
        shared.metrics.assigned_partitions.set(held as i64);
        short_before = shortfall.is_some() && rejoined.is_none();
        if let (Some(short), Some(subscribed)) = (shortfall, rejoined) {
            tracing::warn!(
                held = short.held,
                share = short.share,
                members = short.members,
                partitions = short.partitions,
                "the worker group is stable but leaves request partitions unread; rejoined it so that it rebalances"
            );
            shared.metrics.group_rejoins.inc();
            if let Err(err) = subscribed {
                tracing::warn!(%err, "could not subscribe to the request topic again");
            }
        }
    }
}

/// A worker holding fewer request partitions than a stable group's share.
struct Shortfall {
    held: usize,
    share: usize,
    members: usize,
    partitions: usize,
}

fn share_shortfall(consumer: &Consumer, kafka: &KafkaConfig, held: usize) -> Option<Shortfall> {
    let timeout = Duration::from_secs(2);
    let groups = consumer
        .fetch_group_list(Some(&kafka.worker_group), timeout)
        .ok()?;
    let group = groups
        .groups()
        .iter()
        .find(|g| g.name() == kafka.worker_group && g.state() == "Stable")?;
    let members = group.members().len();
    let metadata = consumer
        .fetch_metadata(Some(&kafka.request_topic), timeout)
        .ok()?;
    let partitions = metadata.topics().first()?.partitions().len();
    let share = partitions / members.max(1);
    (members > 0 && held < share).then_some(Shortfall {
        held,
        share,
        members,
        partitions,
    })
}
