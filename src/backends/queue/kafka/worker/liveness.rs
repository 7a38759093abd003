//! Signs of life both ways: the cancel topic (a client gone, or an edge's
//! liveness beat), heartbeats for quiet jobs so their edges keep waiting,
//! and cancelling the jobs of an edge that went silent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::super::frames::FrameKind;
use super::super::reconnect::{Consumer, next_message};
use rdkafka::producer::FutureRecord;

use super::super::{
    H_ATTEMPT, H_EDGE, H_KIND, H_MODELS, H_REQUEST, H_WORKER, KIND_CANCEL, KIND_EDGE_ALIVE,
    KIND_WORKER_ALIVE, ReadHeaders, VersionCheck, headers,
};
use super::WorkerShared;
use super::outbox::Reply;

pub(super) async fn listen_for_cancels(consumer: Consumer, shared: Arc<WorkerShared>) {
    let mut last_sweep = Instant::now();
    let versions = VersionCheck::new(&shared.kafka.cancel_topic);
    let topic = shared.kafka.cancel_topic.clone();
    while let Some(message) = next_message(&consumer, &shared.loss, &topic).await {
        let h = ReadHeaders::of(&message);
        if !versions.speaks(&h) {
            shared
                .metrics
                .messages_skipped
                .with_label_values(&[shared.kafka.cancel_topic.as_str(), "version"])
                .inc();
            continue;
        }
        if h.str(H_KIND) == Some(KIND_WORKER_ALIVE) {
            continue; // for edges
        }
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

/// Signals life for jobs that sent nothing for a heartbeat interval (a long
/// prefill, a slow upstream), so their edges do not give up on them.
pub(super) async fn send_heartbeats(shared: Arc<WorkerShared>, every: Duration) {
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
        shared.announce();
        shared.cancel_orphans();
    }
}

impl WorkerShared {
    /// Tells edges this worker is alive, and which models it serves. Fire
    /// and forget: a missed beat is covered by the next ones.
    fn announce(&self) {
        let models = self.kafka.worker_models.join(",");
        let record = FutureRecord::to(&self.kafka.cancel_topic)
            .key(self.worker_id.as_str())
            .payload(&[][..])
            .headers(headers(&[
                (H_KIND, KIND_WORKER_ALIVE),
                (H_WORKER, self.worker_id.as_str()),
                (H_MODELS, models.as_str()),
            ]));
        if let Err((err, _)) = self.producer.send_result::<str, [u8]>(record) {
            tracing::debug!(%err, "could not announce this worker's liveness");
        }
    }

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
