//! The Kafka queue (rdkafka): edges and workers on any number of machines.
//!
//! Topics:
//! - **request topic**: one message per request (key: request id, payload: the
//!   upstream body). Workers consume it as one consumer group.
//! - **response topic**: one message per upstream chunk (several chunks that were
//!   already waiting may share a message). Each edge reads one partition of it
//!   (its *reply partition*, from `queue.reply_partition` or a hash of its edge
//!   id) and workers produce a request's responses to the partition its edge
//!   named. An edge therefore reads only its own traffic plus that of edges
//!   sharing its partition (filtered out by the `sluice-edge` header): size the
//!   response topic with at least as many partitions as edges. Adding an edge
//!   costs one partition's worth of consumer, not a copy of all traffic.
//! - **cancel topic**: a small broadcast topic every worker reads completely, so a
//!   client disconnect reaches the worker running the request wherever it is.
//!
//! Delivery guarantees. Every response message carries the request's attempt
//! number and a sequence number. The edge accepts only the current attempt, in
//! sequence; duplicates are dropped and a gap ends the stream with an error, so
//! a client never sees a token twice or out of order. Workers commit request
//! offsets on receipt (at most once), and edges own retries: a worker that goes
//! silent (no chunk or heartbeat within `queue.worker_timeout_ms`) before
//! anything was delivered has its request resubmitted as a new attempt; one
//! that goes silent after delivering tokens ends the stream with an error.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Job, JobSource, Queue, QueueError, QueuedRequest, ResponseEvent, ResponseSink, ResponseStream, SinkClosed};
use crate::config::{KafkaConfig, QueueConfig};
use crate::error::ErrorInfo;
use crate::metrics::Metrics;
use crate::protocol::Chunk;
use crate::sse::SseParser;

const H_KIND: &str = "sluice-kind";
const H_REQUEST: &str = "sluice-request";
const H_EDGE: &str = "sluice-edge";
const H_REPLY_PARTITION: &str = "sluice-reply-partition";
const H_ATTEMPT: &str = "sluice-attempt";
const H_SEQ: &str = "sluice-seq";
const H_SUBMITTED: &str = "sluice-submitted-ms";
const H_WORKER: &str = "sluice-worker";
/// Trace-context headers carried through unchanged.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

const KIND_REQUEST: &str = "request";
const KIND_CANCEL: &str = "cancel";
const KIND_ACCEPTED: &str = "accepted";
const KIND_CHUNK: &str = "chunk";
const KIND_ERROR: &str = "error";
const KIND_DONE: &str = "done";
const KIND_HEARTBEAT: &str = "heartbeat";

/// Messages buffered per request at the edge; a client that falls further behind is cut off.
const ROUTE_BUFFER: usize = 1024;
/// How long startup waits for the brokers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Client configuration and topics
// ---------------------------------------------------------------------------

fn client_config(kafka: &KafkaConfig, defaults: &[(&str, &str)], overrides: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in overrides {
        config.set(key, value);
    }
    config
}

fn producer(kafka: &KafkaConfig) -> Result<FutureProducer, QueueError> {
    client_config(
        kafka,
        &[("linger.ms", "1"), ("enable.idempotence", "true"), ("message.timeout.ms", "30000")],
        &kafka.producer,
    )
    .create()
    .map_err(|e| unavailable(kafka, e))
}

fn unavailable(kafka: &KafkaConfig, err: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(format!("Kafka at kafka://{}: {err}", kafka.brokers))
}

/// Creates the three topics when missing; returns the response topic's partition count.
async fn ensure_topics(kafka: &KafkaConfig) -> Result<i32, QueueError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, &[], &BTreeMap::new())
        .create()
        .map_err(|e| unavailable(kafka, e))?;
    let topics = [
        NewTopic::new(&kafka.request_topic, kafka.partitions, TopicReplication::Fixed(kafka.replication_factor)),
        NewTopic::new(&kafka.response_topic, kafka.partitions, TopicReplication::Fixed(kafka.replication_factor)),
        NewTopic::new(&kafka.cancel_topic, 1, TopicReplication::Fixed(kafka.replication_factor)),
    ];
    let options = AdminOptions::new()
        .request_timeout(Some(CONNECT_TIMEOUT))
        .operation_timeout(Some(CONNECT_TIMEOUT));
    let results = tokio::time::timeout(CONNECT_TIMEOUT, admin.create_topics(&topics, &options))
        .await
        .map_err(|_| unavailable(kafka, format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unavailable(kafka, e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(unavailable(kafka, format!("cannot create topic {topic}: {code}"))),
        }
    }
    partition_count(kafka, &kafka.response_topic).await
}

async fn partition_count(kafka: &KafkaConfig, topic: &str) -> Result<i32, QueueError> {
    let consumer: StreamConsumer = client_config(kafka, &[("group.id", "sluice-metadata")], &BTreeMap::new())
        .create()
        .map_err(|e| unavailable(kafka, e))?;
    let topic = topic.to_string();
    let kafka_for_err = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map_err(|e| unavailable(&kafka_for_err, e))?;
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len());
            if partitions > 0 {
                return Ok(partitions as i32);
            }
            if std::time::Instant::now() > deadline {
                return Err(unavailable(&kafka_for_err, format!("topic {topic} has no partitions")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .map_err(|e| QueueError::Unavailable(e.to_string()))?
}

/// A consumer reading `topic` partitions from their current end, without a consumer group.
async fn tail_consumer(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    partitions: Vec<i32>,
) -> Result<StreamConsumer, QueueError> {
    let consumer: StreamConsumer = client_config(
        kafka,
        &[("group.id", group), ("enable.auto.commit", "false"), ("enable.partition.eof", "false")],
        &kafka.consumer,
    )
    .create()
    .map_err(|e| unavailable(kafka, e))?;
    let consumer = Arc::new(consumer);
    let blocking = consumer.clone();
    let topic_name = topic.to_string();
    let kafka_for_err = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let (_, high) = blocking
                .fetch_watermarks(&topic_name, partition, CONNECT_TIMEOUT)
                .map_err(|e| unavailable(&kafka_for_err, e))?;
            assignment
                .add_partition_offset(&topic_name, partition, Offset::Offset(high))
                .map_err(|e| unavailable(&kafka_for_err, e))?;
        }
        blocking.assign(&assignment).map_err(|e| unavailable(&kafka_for_err, e))
    })
    .await
    .map_err(|e| QueueError::Unavailable(e.to_string()))??;
    Arc::try_unwrap(consumer).map_err(|_| QueueError::Unavailable("consumer still shared".into()))
}

// ---------------------------------------------------------------------------
// Message headers
// ---------------------------------------------------------------------------

fn headers(pairs: &[(&str, &str)]) -> OwnedHeaders {
    pairs.iter().fold(OwnedHeaders::new_with_capacity(pairs.len()), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    })
}

/// The headers of a received message, by name.
struct ReadHeaders<'a>(Vec<(&'a str, &'a [u8])>);

impl<'a> ReadHeaders<'a> {
    fn of(message: &'a impl Message) -> Self {
        Self(
            message
                .headers()
                .map(|h| h.iter().filter_map(|h| h.value.map(|v| (h.key, v))).collect())
                .unwrap_or_default(),
        )
    }

    fn str(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .find(|(key, _)| *key == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn num<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.str(name).and_then(|v| v.parse().ok())
    }

    fn trace_context(&self) -> Vec<(String, String)> {
        TRACE_HEADERS
            .iter()
            .filter_map(|name| self.str(name).map(|v| (name.to_string(), v.to_string())))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Edge side
// ---------------------------------------------------------------------------

/// A response message routed to the request that waits for it.
struct Inbound {
    kind: InboundKind,
    attempt: u32,
    seq: Option<u64>,
    payload: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InboundKind {
    Accepted,
    Chunk,
    Error,
    Done,
    Heartbeat,
}

struct Route {
    tx: mpsc::Sender<Inbound>,
    overflowed: Arc<AtomicBool>,
}

type Routes = Arc<Mutex<HashMap<String, Route>>>;

struct EdgeShared {
    kafka: KafkaConfig,
    producer: FutureProducer,
    edge_id: String,
    reply_partition: i32,
    queue_timeout: Duration,
    worker_timeout: Duration,
    max_attempts: u32,
    metrics: Arc<Metrics>,
}

impl EdgeShared {
    fn produce_request(&self, request: &QueuedRequest, attempt: u32) -> Result<DeliveryFuture, QueueError> {
        let reply = self.reply_partition.to_string();
        let attempt_text = attempt.to_string();
        let submitted = request.submitted_at_ms.to_string();
        let mut pairs = vec![
            (H_KIND, KIND_REQUEST),
            (H_REQUEST, request.request_id.as_str()),
            (H_EDGE, self.edge_id.as_str()),
            (H_REPLY_PARTITION, reply.as_str()),
            (H_ATTEMPT, attempt_text.as_str()),
            (H_SUBMITTED, submitted.as_str()),
        ];
        for (name, value) in &request.trace_context {
            pairs.push((name.as_str(), value.as_str()));
        }
        // A retry gets its own key so it can land on a partition of a live worker.
        let key = if attempt == 1 { request.request_id.clone() } else { format!("{}#{attempt}", request.request_id) };
        let record = FutureRecord::to(&self.kafka.request_topic)
            .key(key.as_str())
            .payload(request.body.as_ref())
            .headers(headers(&pairs));
        self.producer
            .send_result(record)
            .map_err(|(e, _)| unavailable(&self.kafka, e))
    }

    /// Tells workers to stop attempts up to `attempt` of `request_id`. Fire and forget.
    fn cancel(&self, request_id: &str, attempt: u32) {
        let attempt = attempt.to_string();
        let record = FutureRecord::to(&self.kafka.cancel_topic)
            .key(request_id)
            .payload(&[][..])
            .headers(headers(&[
                (H_KIND, KIND_CANCEL),
                (H_REQUEST, request_id),
                (H_EDGE, self.edge_id.as_str()),
                (H_ATTEMPT, attempt.as_str()),
            ]));
        if let Err((err, _)) = self.producer.send_result::<str, [u8]>(record) {
            tracing::warn!(%err, request_id, "could not publish a cancellation");
        }
    }
}

/// The edge's side of the Kafka queue.
pub struct KafkaQueue {
    shared: Arc<EdgeShared>,
    routes: Routes,
    router: JoinHandle<()>,
}

impl Drop for KafkaQueue {
    fn drop(&mut self) {
        self.router.abort();
    }
}

impl KafkaQueue {
    /// Creates missing topics, starts reading this edge's reply partition.
    pub async fn connect(kafka: &KafkaConfig, queue: &QueueConfig, metrics: Arc<Metrics>) -> Result<Self, QueueError> {
        let partitions = ensure_topics(kafka).await?;
        let reply_partition = match kafka.reply_partition {
            Some(p) if p < partitions => p,
            Some(p) => {
                return Err(unavailable(
                    kafka,
                    format!("queue.reply_partition {p} does not exist: {} has {partitions} partitions", kafka.response_topic),
                ));
            }
            None => (fnv1a(kafka.edge_id.as_bytes()) % partitions as u64) as i32,
        };
        let consumer = tail_consumer(
            kafka,
            &format!("sluice-edge-{}", kafka.edge_id),
            &kafka.response_topic,
            vec![reply_partition],
        )
        .await?;
        let shared = Arc::new(EdgeShared {
            kafka: kafka.clone(),
            producer: producer(kafka)?,
            edge_id: kafka.edge_id.clone(),
            reply_partition,
            queue_timeout: queue.queue_timeout,
            worker_timeout: queue.worker_timeout,
            max_attempts: queue.max_attempts,
            metrics: metrics.clone(),
        });
        let routes: Routes = Default::default();
        let router = tokio::spawn(route_responses(consumer, shared.clone(), routes.clone()));
        tracing::info!(edge_id = %kafka.edge_id, reply_partition, brokers = %kafka.brokers, "Kafka queue connected");
        Ok(Self { shared, routes, router })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Reads the reply partition and hands each message to the request that owns it.
async fn route_responses(consumer: StreamConsumer, shared: Arc<EdgeShared>, routes: Routes) {
    let topic = shared.kafka.response_topic.clone();
    let skipped = |reason: &str| {
        shared
            .metrics
            .queue_messages_skipped
            .with_label_values(&[topic.as_str(), reason])
            .inc();
    };
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(%err, "error reading the response topic");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let h = ReadHeaders::of(&message);
        if h.str(H_EDGE) != Some(shared.edge_id.as_str()) {
            if h.str(H_EDGE).is_none() {
                skipped("malformed");
            }
            continue; // another edge sharing this partition
        }
        let (Some(request_id), Some(attempt), Some(kind)) = (h.str(H_REQUEST), h.num::<u32>(H_ATTEMPT), h.str(H_KIND)) else {
            skipped("malformed");
            tracing::warn!(offset = message.offset(), "skipping a response message without request id, attempt or kind");
            continue;
        };
        let kind = match kind {
            KIND_ACCEPTED => InboundKind::Accepted,
            KIND_CHUNK => InboundKind::Chunk,
            KIND_ERROR => InboundKind::Error,
            KIND_DONE => InboundKind::Done,
            KIND_HEARTBEAT => InboundKind::Heartbeat,
            _ => {
                skipped("malformed");
                continue;
            }
        };
        if let Some(created) = message.timestamp().to_millis() {
            let age = chrono::Utc::now().timestamp_millis() - created;
            shared.metrics.queue_consume_delay.observe(age.max(0) as f64 / 1000.0);
        }
        let inbound = Inbound {
            kind,
            attempt,
            seq: h.num(H_SEQ),
            payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        };
        let mut routes = match routes.lock() {
            Ok(routes) => routes,
            Err(poisoned) => poisoned.into_inner(),
        };
        match routes.get(request_id) {
            None => {
                drop(routes);
                skipped("stale");
            }
            Some(route) => {
                if route.tx.try_send(inbound).is_err() {
                    route.overflowed.store(true, Ordering::Relaxed);
                    routes.remove(request_id);
                }
            }
        }
    }
}

#[async_trait]
impl Queue for KafkaQueue {
    async fn submit(&self, request: QueuedRequest) -> Result<Box<dyn ResponseStream>, QueueError> {
        let (tx, rx) = mpsc::channel(ROUTE_BUFFER);
        let overflowed = Arc::new(AtomicBool::new(false));
        self.routes
            .lock()
            .map_err(|_| QueueError::Unavailable("routing table poisoned".into()))?
            .insert(
                request.request_id.clone(),
                Route {
                    tx,
                    overflowed: overflowed.clone(),
                },
            );
        let mut stream = KafkaResponses {
            shared: self.shared.clone(),
            routes: self.routes.clone(),
            request,
            rx,
            overflowed,
            attempt: 1,
            next_seq: 0,
            accepted: false,
            delivered: false,
            deadline: Instant::now(),
            pending: VecDeque::new(),
            finished: false,
        };
        let started = Instant::now();
        let delivery = self.shared.produce_request(&stream.request, 1)?;
        match tokio::time::timeout(self.shared.queue_timeout, delivery).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((err, _)))) => {
                stream.finished = true;
                return Err(unavailable(&self.shared.kafka, err));
            }
            _ => {
                stream.finished = true;
                return Err(unavailable(&self.shared.kafka, "the request was not acknowledged in time"));
            }
        }
        self.shared.metrics.queue_produce.observe(started.elapsed().as_secs_f64());
        stream.deadline = Instant::now() + self.shared.queue_timeout;
        Ok(Box::new(stream))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        partition_count(&self.shared.kafka, &self.shared.kafka.request_topic).await.map(|_| ())
    }
}

/// The responses of one request, checked for attempt and order.
struct KafkaResponses {
    shared: Arc<EdgeShared>,
    routes: Routes,
    request: QueuedRequest,
    rx: mpsc::Receiver<Inbound>,
    overflowed: Arc<AtomicBool>,
    attempt: u32,
    next_seq: u64,
    accepted: bool,
    /// Whether any chunk was handed on (then a retry could duplicate tokens).
    delivered: bool,
    /// When the current wait (for a worker to accept, or for a sign of life) runs out.
    deadline: Instant,
    pending: VecDeque<Chunk>,
    finished: bool,
}

fn gateway_error(status: StatusCode, message: impl Into<String>) -> ResponseEvent {
    ResponseEvent::Error(ErrorInfo::new(status, crate::error::kind_for_status(status), message))
}

impl KafkaResponses {
    fn finish(&mut self, event: ResponseEvent) -> ResponseEvent {
        self.finished = true;
        event
    }

    /// The worker went quiet. Retry if nothing was delivered yet, else fail.
    fn on_timeout(&mut self) -> Option<ResponseEvent> {
        let waited = if self.accepted { self.shared.worker_timeout } else { self.shared.queue_timeout };
        if self.delivered || self.attempt >= self.shared.max_attempts {
            let message = if self.accepted {
                format!("the worker serving this request stopped responding for {waited:?}")
            } else {
                format!("no worker picked the request up within {waited:?}")
            };
            let status = if self.delivered { StatusCode::BAD_GATEWAY } else { StatusCode::SERVICE_UNAVAILABLE };
            return Some(self.finish(gateway_error(status, message)));
        }
        self.shared.cancel(&self.request.request_id, self.attempt);
        self.attempt += 1;
        self.accepted = false;
        self.next_seq = 0;
        self.deadline = Instant::now() + self.shared.queue_timeout;
        self.shared.metrics.queue_retries.inc();
        tracing::warn!(request_id = %self.request.request_id, attempt = self.attempt, "worker lost before sending anything; resubmitting");
        if let Err(err) = self.shared.produce_request(&self.request, self.attempt) {
            return Some(self.finish(ResponseEvent::Error(crate::error::GatewayError::from(err).info())));
        }
        None
    }

    fn on_message(&mut self, message: Inbound) -> Option<ResponseEvent> {
        if message.attempt != self.attempt {
            return None; // a late message from an abandoned attempt
        }
        if message.kind == InboundKind::Heartbeat {
            self.deadline = Instant::now() + self.shared.worker_timeout;
            return None;
        }
        let seq = message.seq?;
        if seq < self.next_seq {
            return None; // a duplicate
        }
        if seq > self.next_seq {
            return Some(self.finish(gateway_error(
                StatusCode::BAD_GATEWAY,
                format!("response messages {}..{seq} were lost", self.next_seq),
            )));
        }
        self.next_seq += 1;
        self.deadline = Instant::now() + self.shared.worker_timeout;
        match message.kind {
            InboundKind::Accepted => {
                self.accepted = true;
                None
            }
            InboundKind::Chunk => {
                if let Some(chunk) = Chunk::from_framed(message.payload.clone()).filter(|c| !c.payload_slice().contains(&b'\n')) {
                    self.pending.push_back(chunk);
                } else {
                    let mut parser = SseParser::new();
                    parser.push(&message.payload);
                    while let Some(event) = parser.next_event() {
                        self.pending.push_back(event.chunk);
                    }
                }
                self.pending.pop_front().map(|chunk| {
                    self.delivered = true;
                    ResponseEvent::Chunk(chunk)
                })
            }
            InboundKind::Error => {
                let info = serde_json::from_slice::<ErrorInfo>(&message.payload).unwrap_or_else(|_| {
                    ErrorInfo::new(StatusCode::BAD_GATEWAY, "BadGatewayError", "the worker reported an unreadable error")
                });
                Some(self.finish(ResponseEvent::Error(info)))
            }
            InboundKind::Done => Some(self.finish(ResponseEvent::Done)),
            InboundKind::Heartbeat => None,
        }
    }
}

#[async_trait]
impl ResponseStream for KafkaResponses {
    async fn next(&mut self) -> ResponseEvent {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return ResponseEvent::Chunk(chunk);
            }
            if self.finished {
                return ResponseEvent::Done;
            }
            let message = match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    let reason = if self.overflowed.load(Ordering::Relaxed) {
                        "the client read too slowly; response buffer overflowed"
                    } else {
                        "the response router stopped"
                    };
                    return self.finish(gateway_error(StatusCode::BAD_GATEWAY, reason));
                }
                Err(_) => match self.on_timeout() {
                    Some(event) => return event,
                    None => continue,
                },
            };
            if let Some(event) = self.on_message(message) {
                return event;
            }
        }
    }
}

impl Drop for KafkaResponses {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.routes.lock() {
            routes.remove(&self.request.request_id);
        }
        if !self.finished {
            self.shared.cancel(&self.request.request_id, self.attempt);
        }
    }
}

// ---------------------------------------------------------------------------
// Worker side
// ---------------------------------------------------------------------------

/// Where a job's responses go, and its cancellation.
struct Reply {
    request_id: String,
    edge_id: String,
    partition: i32,
    attempt: u32,
    cancel: CancellationToken,
    /// Unix ms of the last message produced for this job (for heartbeats).
    last_sent_ms: AtomicI64,
}

struct WorkerShared {
    kafka: KafkaConfig,
    producer: FutureProducer,
    worker_id: String,
    inflight: Mutex<HashMap<String, Arc<Reply>>>,
    /// Request id → highest attempt cancelled, with when (to expire entries).
    cancelled: Mutex<HashMap<String, (u32, Instant)>>,
    queue_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl WorkerShared {
    fn produce(&self, reply: &Reply, kind: &str, seq: Option<u64>, payload: &[u8]) -> Result<DeliveryFuture, QueueError> {
        let attempt = reply.attempt.to_string();
        let seq_text = seq.map(|s| s.to_string());
        let mut pairs = vec![
            (H_KIND, kind),
            (H_REQUEST, reply.request_id.as_str()),
            (H_EDGE, reply.edge_id.as_str()),
            (H_ATTEMPT, attempt.as_str()),
            (H_WORKER, self.worker_id.as_str()),
        ];
        if let Some(seq) = &seq_text {
            pairs.push((H_SEQ, seq.as_str()));
        }
        let record = FutureRecord::to(&self.kafka.response_topic)
            .partition(reply.partition)
            .key(reply.request_id.as_str())
            .payload(payload)
            .headers(headers(&pairs));
        reply.last_sent_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        self.producer
            .send_result(record)
            .map_err(|(e, _)| unavailable(&self.kafka, e))
    }

    fn was_cancelled(&self, request_id: &str, attempt: u32) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.get(request_id).is_some_and(|(upto, _)| attempt <= *upto))
            .unwrap_or(false)
    }
}

/// The worker's side of the Kafka queue: a consumer-group member on the request topic.
pub struct KafkaJobSource {
    shared: Arc<WorkerShared>,
    consumer: StreamConsumer,
    tasks: Vec<JoinHandle<()>>,
}

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
        metrics: Arc<Metrics>,
    ) -> Result<Self, QueueError> {
        ensure_topics(kafka).await?;
        let worker_id = format!("worker-{}", uuid::Uuid::new_v4().simple());
        // Offsets are committed as requests are taken (at most once); edges retry lost ones.
        // A worker polls only when it has capacity, hence the long poll interval.
        let consumer: StreamConsumer = client_config(
            kafka,
            &[
                ("group.id", kafka.worker_group.as_str()),
                ("enable.auto.commit", "true"),
                ("auto.commit.interval.ms", "1000"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                ("max.poll.interval.ms", "3600000"),
            ],
            &kafka.consumer,
        )
        .create()
        .map_err(|e| unavailable(kafka, e))?;
        consumer
            .subscribe(&[&kafka.request_topic])
            .map_err(|e| unavailable(kafka, e))?;
        let cancels = tail_consumer(kafka, &format!("sluice-cancels-{worker_id}"), &kafka.cancel_topic, vec![0]).await?;
        let shared = Arc::new(WorkerShared {
            kafka: kafka.clone(),
            producer: producer(kafka)?,
            worker_id,
            inflight: Default::default(),
            cancelled: Default::default(),
            queue_timeout: queue.queue_timeout,
            metrics,
        });
        let tasks = vec![
            tokio::spawn(listen_for_cancels(cancels, shared.clone())),
            tokio::spawn(send_heartbeats(shared.clone(), queue.heartbeat)),
        ];
        tracing::info!(worker_id = %shared.worker_id, group = %kafka.worker_group, "Kafka worker connected");
        Ok(Self { shared, consumer, tasks })
    }

    fn parse_job(&self, message: &impl Message) -> Result<Option<Job>, &'static str> {
        let h = ReadHeaders::of(message);
        if h.str(H_KIND) != Some(KIND_REQUEST) {
            return Err("malformed");
        }
        let (Some(request_id), Some(edge_id), Some(partition), Some(attempt), Some(submitted_at_ms)) = (
            h.str(H_REQUEST),
            h.str(H_EDGE),
            h.num::<i32>(H_REPLY_PARTITION),
            h.num::<u32>(H_ATTEMPT),
            h.num::<i64>(H_SUBMITTED),
        ) else {
            return Err("malformed");
        };
        let body = message.payload().unwrap_or_default();
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            return Err("malformed");
        }
        let request = QueuedRequest {
            request_id: request_id.to_string(),
            body: Bytes::copy_from_slice(body),
            trace_context: h.trace_context(),
            submitted_at_ms,
        };
        self.shared.metrics.queue_consume_delay.observe(request.age().as_secs_f64());
        if request.age() > self.shared.queue_timeout {
            return Err("expired");
        }
        if self.shared.was_cancelled(request_id, attempt) {
            return Err("cancelled");
        }
        let reply = Arc::new(Reply {
            request_id: request_id.to_string(),
            edge_id: edge_id.to_string(),
            partition,
            attempt,
            cancel: CancellationToken::new(),
            last_sent_ms: AtomicI64::new(0),
        });
        if let Ok(mut inflight) = self.shared.inflight.lock() {
            inflight.insert(reply.request_id.clone(), reply.clone());
        }
        let accepted = self.shared.produce(&reply, KIND_ACCEPTED, Some(0), &[]);
        let cancel = reply.cancel.clone();
        let sink = KafkaSink {
            shared: self.shared.clone(),
            reply,
            next_seq: 1,
            last_delivery: accepted.ok(),
        };
        Ok(Some(Job {
            request,
            sink: Box::new(sink),
            cancel,
        }))
    }
}

#[async_trait]
impl JobSource for KafkaJobSource {
    async fn next_job(&self) -> Option<Job> {
        loop {
            let message = match self.consumer.recv().await {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(%err, "error reading the request topic");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.parse_job(&message) {
                Ok(Some(job)) => return Some(job),
                Ok(None) => continue,
                Err(reason) => {
                    if reason == "malformed" {
                        tracing::warn!(partition = message.partition(), offset = message.offset(), "skipping a malformed request message");
                    }
                    self.shared
                        .metrics
                        .queue_messages_skipped
                        .with_label_values(&[self.shared.kafka.request_topic.as_str(), reason])
                        .inc();
                }
            }
        }
    }
}

/// Produces one job's events to its edge's reply partition, in order.
struct KafkaSink {
    shared: Arc<WorkerShared>,
    reply: Arc<Reply>,
    next_seq: u64,
    /// The delivery of the last message produced; awaited before reporting the end.
    last_delivery: Option<DeliveryFuture>,
}

#[async_trait]
impl ResponseSink for KafkaSink {
    async fn send(&mut self, event: ResponseEvent) -> Result<(), SinkClosed> {
        if self.reply.cancel.is_cancelled() {
            return Err(SinkClosed);
        }
        let seq = Some(self.next_seq);
        self.next_seq += 1;
        let produced = match &event {
            ResponseEvent::Chunk(chunk) => self.shared.produce(&self.reply, KIND_CHUNK, seq, chunk.framed()),
            ResponseEvent::Error(info) => {
                let payload = serde_json::to_vec(info).unwrap_or_default();
                self.shared.produce(&self.reply, KIND_ERROR, seq, &payload)
            }
            ResponseEvent::Done => self.shared.produce(&self.reply, KIND_DONE, seq, &[]),
        };
        match produced {
            Ok(delivery) => self.last_delivery = Some(delivery),
            Err(err) => {
                tracing::warn!(%err, request_id = %self.reply.request_id, "could not produce a response message");
                return Err(SinkClosed);
            }
        }
        if matches!(event, ResponseEvent::Done | ResponseEvent::Error(_)) {
            if let Some(delivery) = self.last_delivery.take() {
                let started = Instant::now();
                if let Ok(Ok(_)) = delivery.await {
                    self.shared.metrics.queue_produce.observe(started.elapsed().as_secs_f64());
                }
            }
        }
        Ok(())
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.shared.inflight.lock() {
            if inflight.get(&self.reply.request_id).is_some_and(|r| Arc::ptr_eq(r, &self.reply)) {
                inflight.remove(&self.reply.request_id);
            }
        }
    }
}

async fn listen_for_cancels(consumer: StreamConsumer, shared: Arc<WorkerShared>) {
    let mut last_sweep = Instant::now();
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(%err, "error reading the cancel topic");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let h = ReadHeaders::of(&message);
        let (Some(KIND_CANCEL), Some(request_id), Some(attempt)) = (h.str(H_KIND), h.str(H_REQUEST), h.num::<u32>(H_ATTEMPT)) else {
            shared
                .metrics
                .queue_messages_skipped
                .with_label_values(&[shared.kafka.cancel_topic.as_str(), "malformed"])
                .inc();
            continue;
        };
        if let Ok(inflight) = shared.inflight.lock() {
            if let Some(reply) = inflight.get(request_id).filter(|r| r.attempt <= attempt) {
                reply.cancel.cancel();
            }
        }
        if let Ok(mut cancelled) = shared.cancelled.lock() {
            let entry = cancelled.entry(request_id.to_string()).or_insert((0, Instant::now()));
            entry.0 = entry.0.max(attempt);
            // Requests older than the queue timeout are dropped on arrival anyway.
            if last_sweep.elapsed() > shared.queue_timeout {
                let horizon = shared.queue_timeout * 2;
                cancelled.retain(|_, (_, at)| at.elapsed() < horizon);
                last_sweep = Instant::now();
            }
        }
    }
}

/// Signals life for jobs that produced nothing for a heartbeat interval
/// (a long prefill, a slow upstream), so their edges do not give up on them.
async fn send_heartbeats(shared: Arc<WorkerShared>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every_ms = every.as_millis() as i64;
    loop {
        ticker.tick().await;
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
            let _ = shared.produce(&reply, KIND_HEARTBEAT, None, &[]);
        }
    }
}

