//! The edge's side of the Kafka queue: produces requests, reads its reply
//! partition, and hands each frame to the request that waits for it, checking
//! attempt and sequence so a client sees every chunk once and in order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use bytes::Bytes;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::frames::{self, Frame, FrameKind};
use super::live_workers::{self, LiveWorkers};
use super::reconnect::{self, Consumer, Producer, Reconnecting, Session};
use super::*;
use crate::backends::queue::QueueConfig;
use crate::backends::queue::QueueMetrics;
use crate::backends::queue::{Lane, Priority, Queue, QueuedRequest, ResponseEvent, ResponseStream};
use crate::error::{ErrorInfo, GatewayError, kind_for_status};
use crate::protocol::Chunk;
use crate::protocol::sse::SseParser;

/// Frames buffered per request; a client that falls further behind is cut off
/// rather than stalling every other stream of this edge.
const ROUTE_BUFFER: usize = 1024;

/// Room for a request message's record overhead and headers (ids, route,
/// model, trace context) within the producer's `message.max.bytes`.
const REQUEST_OVERHEAD: usize = 2048;

struct Route {
    tx: mpsc::Sender<Frame>,
    overflowed: Arc<AtomicBool>,
}

type Routes = Arc<Mutex<HashMap<String, Route>>>;

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
    routes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct EdgeShared {
    kafka: KafkaConfig,
    producer: Producer,
    loss: Arc<BrokerLoss>,
    edge_id: String,
    reply_partition: i32,
    queue_timeout: Duration,
    worker_timeout: Duration,
    max_attempts: u32,
    metrics: Arc<QueueMetrics>,
    workers: Arc<LiveWorkers>,
}

impl EdgeShared {
    fn produce_request(
        &self,
        request: &QueuedRequest,
        attempt: u32,
    ) -> Result<DeliveryFuture, QueueError> {
        let reply = self.reply_partition.to_string();
        let attempt_text = attempt.to_string();
        let submitted = request.submitted_at_ms.to_string();
        let prefix = format!("{:x}", request.prefix);
        let mut pairs = vec![
            (H_KIND, KIND_REQUEST),
            (H_REQUEST, request.request_id.as_str()),
            (H_EDGE, self.edge_id.as_str()),
            (H_REPLY_PARTITION, reply.as_str()),
            (H_ATTEMPT, attempt_text.as_str()),
            (H_SUBMITTED, submitted.as_str()),
            (H_ROUTE, request.route.path()),
            (H_MODEL, request.model.as_str()),
            (H_PREFIX, prefix.as_str()),
        ];
        if request.buffered {
            pairs.push((H_BUFFERED, "1"));
        }
        if let Some(content_type) = &request.content_type {
            pairs.push((H_CONTENT_TYPE, content_type.as_str()));
        }
        if let Some(id) = &request.pinned_to {
            pairs.push((H_PINNED_TO, id.as_str()));
        }
        if let Some(id) = &request.stores {
            pairs.push((H_STORES, id.as_str()));
        }
        if request.lane == Lane::Batch {
            pairs.push((H_LANE, "batch"));
        }
        if !request.tenant.is_empty() {
            pairs.push((H_TENANT, request.tenant.as_str()));
        }
        if request.priority != Priority::Normal {
            pairs.push((H_PRIORITY, request.priority.name()));
        }
        for (name, value) in &request.trace_context {
            pairs.push((name.as_str(), value.as_str()));
        }
        // A retry gets its own key so it can land on a partition of a live worker.
        let key = if attempt == 1 {
            request.request_id.clone()
        } else {
            format!("{}#{attempt}", request.request_id)
        };
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
        if self.loss.is_lost() {
            return;
        }
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
    liveness: JoinHandle<()>,
    /// Listens for workers' signs of life.
    heard: JoinHandle<()>,
}

impl Drop for KafkaQueue {
    fn drop(&mut self) {
        self.router.abort();
        self.liveness.abort();
        self.heard.abort();
    }
}

/// Tells workers this edge is alive, every `every`, on the cancel topic.
async fn announce_liveness(shared: Arc<EdgeShared>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shared.loss.wait() => return,
        }
        let record = FutureRecord::to(&shared.kafka.cancel_topic)
            .key(shared.edge_id.as_str())
            .payload(&[][..])
            .headers(headers(&[
                (H_KIND, KIND_EDGE_ALIVE),
                (H_EDGE, shared.edge_id.as_str()),
            ]));
        // Fire and forget: a missed beat is covered by the next ones.
        if let Err((err, _)) = shared.producer.send_result::<str, [u8]>(record) {
            tracing::debug!(%err, "could not announce this edge's liveness");
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl KafkaQueue {
    /// Creates missing topics and starts reading this edge's reply partition.
    pub async fn connect(
        kafka: &KafkaConfig,
        queue: &QueueConfig,
        metrics: Arc<QueueMetrics>,
    ) -> Result<Self, QueueError> {
        let partitions = ensure_topics(kafka).await?;
        let loss = Arc::new(BrokerLoss::default());
        let reply_partition = match kafka.reply_partition {
            Some(p) if p < partitions => p,
            Some(p) => {
                return Err(unavailable(
                    kafka,
                    format!(
                        "queue.reply_partition {p} does not exist: {} has {partitions} partitions",
                        kafka.response_topic
                    ),
                ));
            }
            None => (fnv1a(kafka.edge_id.as_bytes()) % partitions as u64) as i32,
        };
        let consumer = tail_consumer(
            kafka,
            &loss,
            &format!("sluice-edge-{}", kafka.edge_id),
            &kafka.response_topic,
            vec![reply_partition],
            &[],
        )
        .await?;
        // The cancel topic, for workers' signs of life.
        let beats = tail_consumer(
            kafka,
            &loss,
            &format!("sluice-edge-beats-{}", kafka.edge_id),
            &kafka.cancel_topic,
            vec![0],
            &[("fetch.wait.max.ms", "100")],
        )
        .await?;
        let workers = Arc::new(LiveWorkers::new(queue.worker_timeout));
        let shared = Arc::new(EdgeShared {
            kafka: kafka.clone(),
            producer: producer(kafka, &loss)?,
            loss,
            edge_id: kafka.edge_id.clone(),
            reply_partition,
            queue_timeout: queue.queue_timeout,
            worker_timeout: queue.worker_timeout,
            max_attempts: queue.max_attempts.get(),
            metrics,
            workers: workers.clone(),
        });
        let routes: Routes = Default::default();
        let router = tokio::spawn(route_responses(consumer, shared.clone(), routes.clone()));
        let liveness = tokio::spawn(announce_liveness(shared.clone(), queue.heartbeat));
        let heard = tokio::spawn(live_workers::listen(
            beats,
            workers,
            kafka.cancel_topic.clone(),
            shared.loss.clone(),
        ));
        tracing::info!(edge_id = %kafka.edge_id, reply_partition, brokers = %kafka.brokers, "Kafka queue connected");
        Ok(Self {
            shared,
            routes,
            router,
            liveness,
            heard,
        })
    }
}

/// Reads the reply partition and hands each frame to the request that owns it.
async fn route_responses(consumer: Consumer, shared: Arc<EdgeShared>, routes: Routes) {
    let topic = shared.kafka.response_topic.clone();
    let versions = VersionCheck::new(&topic);
    let skipped = |reason: &str| {
        shared
            .metrics
            .messages_skipped
            .with_label_values(&[topic.as_str(), reason])
            .inc();
    };
    while let Some(message) = reconnect::next_message(&consumer, &shared.loss, &topic).await {
        let h = ReadHeaders::of(&message);
        if !versions.speaks(&h) {
            skipped("version");
            continue;
        }
        match h.str(H_EDGE) {
            Some(edge) if edge == shared.edge_id => {}
            Some(_) => continue, // another edge sharing this partition
            None => {
                skipped("malformed");
                tracing::warn!(
                    offset = message.offset(),
                    "skipping a response message without an edge id"
                );
                continue;
            }
        }
        let decoded = (h.str(H_KIND) == Some(KIND_FRAMES))
            .then(|| {
                frames::decode(Bytes::copy_from_slice(
                    message.payload().unwrap_or_default(),
                ))
            })
            .flatten();
        let Some(decoded) = decoded else {
            skipped("malformed");
            tracing::warn!(
                offset = message.offset(),
                "skipping a malformed response message"
            );
            continue;
        };
        if let Some(created) = message.timestamp().to_millis() {
            let age = chrono::Utc::now().timestamp_millis() - created;
            shared
                .metrics
                .consume_delay
                .observe(age.max(0) as f64 / 1000.0);
        }
        let mut overflowed = Vec::new();
        let mut routes = lock(&routes);
        for frame in decoded {
            let Some(route) = routes.get(&frame.request_id) else {
                skipped("stale");
                continue;
            };
            if let Err(full) = route.tx.try_send(frame) {
                route.overflowed.store(true, Ordering::Relaxed);
                let frame = full.into_inner();
                routes.remove(&frame.request_id);
                overflowed.push(frame);
            }
        }
        drop(routes);
        // A client this far behind is cut off, and its generation stopped now:
        // it may not read (and so end its stream) for a long time.
        for frame in overflowed {
            shared.cancel(&frame.request_id, frame.attempt);
        }
    }
    // The brokers are gone: closing the consumer waits for them, so not here.
    drop(tokio::task::spawn_blocking(move || drop(consumer)));
}

impl Session for KafkaQueue {
    const ROLE: &'static str = "edge";

    async fn connect(
        kafka: KafkaConfig,
        queue: QueueConfig,
        metrics: Arc<QueueMetrics>,
    ) -> Result<Self, QueueError> {
        KafkaQueue::connect(&kafka, &queue, metrics).await
    }

    fn loss(&self) -> &BrokerLoss {
        &self.shared.loss
    }

    /// Ends every stream: dropping their routes tells them the queue is gone.
    fn close(&self) {
        lock(&self.routes).clear();
    }
}

/// An edge's queue that reconnects after losing its brokers.
pub type ReconnectingQueue = Reconnecting<KafkaQueue>;

#[async_trait]
impl Queue for ReconnectingQueue {
    async fn submit(&self, request: QueuedRequest) -> Result<Box<dyn ResponseStream>, QueueError> {
        match self.current() {
            Some(queue) => queue.submit(request).await,
            None => Err(reconnect::unreachable()),
        }
    }

    async fn ping(&self) -> Result<(), QueueError> {
        match self.current() {
            Some(queue) => queue.ping().await,
            None => Err(reconnect::unreachable()),
        }
    }
}

#[async_trait]
impl Queue for KafkaQueue {
    async fn submit(&self, request: QueuedRequest) -> Result<Box<dyn ResponseStream>, QueueError> {
        // Refused here, with a 413, rather than by the producer after the fact.
        let limit = self
            .shared
            .kafka
            .max_message_bytes
            .saturating_sub(REQUEST_OVERHEAD);
        if request.body.len() > limit {
            return Err(QueueError::TooLarge { limit });
        }
        if !self.shared.workers.serve(&request.model) {
            let model = match request.model.as_str() {
                "" => "any model".to_string(),
                model => format!("model `{model}`"),
            };
            return Err(QueueError::NoWorker(model));
        }
        let (tx, rx) = mpsc::channel(ROUTE_BUFFER);
        let overflowed = Arc::new(AtomicBool::new(false));
        lock(&self.routes).insert(
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
        let delivery = stream.shared.produce_request(&stream.request, 1);
        let acknowledged = match delivery {
            Ok(delivery) => tokio::select! {
                result = tokio::time::timeout(self.shared.queue_timeout, delivery) => match result {
                    Ok(Ok(Ok(_))) => Ok(()),
                    Ok(Ok(Err((err, _)))) => Err(unavailable(&self.shared.kafka, err)),
                    _ => Err(unavailable(
                        &self.shared.kafka,
                        "the request was not acknowledged in time",
                    )),
                },
                // The producer must not outlive the session (see `reconnect`).
                () = self.shared.loss.wait() => Err(reconnect::unreachable()),
            },
            Err(err) => Err(err),
        };
        if let Err(err) = acknowledged {
            stream.finished = true;
            return Err(err);
        }
        self.shared
            .metrics
            .produce
            .observe(started.elapsed().as_secs_f64());
        stream.deadline = Instant::now() + self.shared.queue_timeout;
        Ok(Box::new(stream))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        reachable(
            &self.shared.producer,
            &self.shared.kafka,
            &self.shared.kafka.request_topic,
        )
        .await
    }
}

/// The responses of one request, checked for attempt and order.
struct KafkaResponses {
    shared: Arc<EdgeShared>,
    routes: Routes,
    request: QueuedRequest,
    rx: mpsc::Receiver<Frame>,
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
    ResponseEvent::Error(ErrorInfo::new(status, kind_for_status(status), message))
}

impl KafkaResponses {
    fn finish(&mut self, event: ResponseEvent) -> ResponseEvent {
        self.finished = true;
        event
    }

    /// A wait ran out. Not picked up within `queue_timeout`, or picked up
    /// and the worker went quiet before sending anything: send it again
    /// under another key (another partition, in case its partition lost its
    /// reader), as a new submission that workers do not drop as expired, up
    /// to `max_attempts` in all; then 503. Went quiet after sending
    /// something: 502.
    fn on_timeout(&mut self) -> Option<ResponseEvent> {
        let waited = if self.accepted {
            self.shared.worker_timeout
        } else {
            self.shared.queue_timeout
        };
        if self.delivered || self.attempt >= self.shared.max_attempts {
            self.shared.cancel(&self.request.request_id, self.attempt);
            let message = if self.accepted {
                format!("the worker serving this request stopped responding for {waited:?}")
            } else {
                format!(
                    "no worker picked the request up within {waited:?} ({} attempts)",
                    self.attempt
                )
            };
            let status = if self.delivered {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Some(self.finish(gateway_error(status, message)));
        }
        self.shared.cancel(&self.request.request_id, self.attempt);
        self.attempt += 1;
        // A new submission: workers judge its age from now, not from the first send.
        self.request.submitted_at_ms = chrono::Utc::now().timestamp_millis();
        match self.accepted {
            true => {
                tracing::warn!(request_id = %self.request.request_id, attempt = self.attempt, "the worker serving the request went quiet before sending anything; resubmitting")
            }
            false => {
                tracing::warn!(request_id = %self.request.request_id, attempt = self.attempt, "no worker picked the request up; sending it again under another key")
            }
        }
        self.accepted = false;
        self.next_seq = 0;
        self.deadline = Instant::now() + self.shared.queue_timeout;
        self.shared.metrics.retries.inc();
        if let Err(err) = self.shared.produce_request(&self.request, self.attempt) {
            return Some(self.finish(ResponseEvent::Error(GatewayError::from(err).info())));
        }
        None
    }

    fn on_frame(&mut self, frame: Frame) -> Option<ResponseEvent> {
        if frame.attempt != self.attempt {
            return None; // a late frame from an abandoned attempt
        }
        if frame.kind == FrameKind::Heartbeat {
            self.deadline = Instant::now() + self.shared.worker_timeout;
            return None;
        }
        let seq = frame.seq?;
        if seq < self.next_seq {
            return None; // a duplicate
        }
        if seq > self.next_seq {
            return Some(self.finish(gateway_error(
                StatusCode::BAD_GATEWAY,
                format!("response frames {}..{seq} were lost", self.next_seq),
            )));
        }
        self.next_seq += 1;
        self.deadline = Instant::now() + self.shared.worker_timeout;
        match frame.kind {
            FrameKind::Accepted | FrameKind::Heartbeat => {
                self.accepted = true;
                None
            }
            FrameKind::Chunk => {
                match Chunk::from_framed(frame.payload.clone())
                    .filter(|c| !c.payload_slice().contains(&b'\n'))
                {
                    Some(chunk) => self.pending.push_back(chunk),
                    None => {
                        let mut parser = SseParser::new();
                        parser.push(&frame.payload);
                        while let Some(event) = parser.next_event() {
                            self.pending.push_back(event.chunk);
                        }
                    }
                }
                self.pending.pop_front().map(|chunk| {
                    self.delivered = true;
                    ResponseEvent::Chunk(chunk)
                })
            }
            FrameKind::Error => {
                let info =
                    serde_json::from_slice::<ErrorInfo>(&frame.payload).unwrap_or_else(|_| {
                        ErrorInfo::new(
                            StatusCode::BAD_GATEWAY,
                            "BadGatewayError",
                            "the worker reported an unreadable error",
                        )
                    });
                Some(self.finish(ResponseEvent::Error(info)))
            }
            FrameKind::Done => {
                let continuations =
                    <[u8; 4]>::try_from(frame.payload.as_ref()).map_or(0, u32::from_be_bytes);
                Some(self.finish(ResponseEvent::Done(continuations)))
            }
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
                return ResponseEvent::Done(0);
            }
            // Cancel-safe: state changes only after a frame has been received.
            let frame = match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    let reason = if self.overflowed.load(Ordering::Relaxed) {
                        "the client read too slowly; its response buffer overflowed"
                    } else if self.shared.loss.is_lost() {
                        "the connection to Kafka was lost"
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
            if let Some(event) = self.on_frame(frame) {
                return event;
            }
        }
    }
}

impl Drop for KafkaResponses {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.request.request_id);
        if !self.finished {
            self.shared.cancel(&self.request.request_id, self.attempt);
        }
    }
}
