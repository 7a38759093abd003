//! A worker's outbox per edge: the frames waiting to be produced to the
//! edge's reply partition, coalesced into one message per broker round
//! trip, bounded so that a broker that falls behind holds the job back
//! (and through it vLLM) instead of growing memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::frames::{self, Frame, FrameKind, Piece};
use super::super::{H_EDGE, H_KIND, H_WORKER, KIND_FRAMES, headers};
use super::WorkerShared;

/// Room for a response message's record overhead and headers within the
/// producer's `message.max.bytes`.
const MESSAGE_OVERHEAD: usize = 512;
/// An outbox unused this long is closed (its edge is probably gone).
const OUTBOX_IDLE: Duration = Duration::from_secs(300);

/// Where a job's responses go, and its cancellation.
pub(super) struct Reply {
    pub(super) request_id: String,
    pub(super) attempt: u32,
    pub(super) outbox: Mutex<Arc<Outbox>>,
    pub(super) edge_id: String,
    pub(super) partition: i32,
    pub(super) cancel: CancellationToken,
    /// Unix ms of the last frame queued for this job (for heartbeats).
    pub(super) last_sent_ms: AtomicI64,
}

/// Frames waiting to be produced to one edge's reply partition.
pub(super) struct Outbox {
    edge_id: String,
    partition: i32,
    buffer: Mutex<OutboxBuffer>,
    ready: Notify,
    /// Signalled when the flusher takes the buffer: room for waiting jobs.
    drained: Notify,
}

#[derive(Default)]
pub(super) struct OutboxBuffer {
    frames: Vec<u8>,
    closed: bool,
}

impl WorkerShared {
    pub(super) fn outbox(self: &Arc<Self>, edge_id: &str, partition: i32) -> Arc<Outbox> {
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
    pub(super) fn send_frame(
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
    pub(super) async fn wait_for_room(&self, reply: &Reply) {
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
