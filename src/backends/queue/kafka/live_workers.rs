//! The workers an edge has heard from: each worker's sign of life on the
//! cancel topic, with the models it serves. With none alive for a model, a
//! request for it is refused at once (503) rather than after waiting out
//! every attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::reconnect::{BrokerLoss, Consumer, next_message};
use super::{H_KIND, H_MODELS, H_WORKER, KIND_WORKER_ALIVE, ReadHeaders, VersionCheck};

/// Who serves what, as last heard.
pub(super) struct LiveWorkers {
    /// Worker id → when it was last heard, and the models it serves (`*`: all).
    seen: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    /// When this edge began listening: before a worker could have been
    /// heard, nobody is presumed dead.
    since: Instant,
    /// How long a worker may be silent and still count as alive.
    timeout: Duration,
}

impl LiveWorkers {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            seen: Mutex::default(),
            since: Instant::now(),
            timeout,
        }
    }

    /// Whether a live worker serves `model` (the pool's name, "" for the
    /// one pool); `true` too while this edge has not listened long enough to know.
    pub(super) fn serve(&self, model: &str) -> bool {
        if self.since.elapsed() < self.timeout {
            return true;
        }
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.retain(|_, (at, _)| at.elapsed() < self.timeout * 10);
        seen.values().any(|(at, models)| {
            at.elapsed() < self.timeout && models.iter().any(|m| m == "*" || m == model)
        })
    }

    fn heard(&self, worker: &str, models: &str) {
        let models = models.split(',').map(String::from).collect();
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(worker.to_string(), (Instant::now(), models));
    }
}

/// Reads the cancel topic for workers' signs of life until the brokers are lost.
pub(super) async fn listen(
    consumer: Consumer,
    live: Arc<LiveWorkers>,
    topic: String,
    loss: Arc<BrokerLoss>,
) {
    let versions = VersionCheck::new(&topic);
    while let Some(message) = next_message(&consumer, &loss, &topic).await {
        let h = ReadHeaders::of(&message);
        if !versions.speaks(&h) || h.str(H_KIND) != Some(KIND_WORKER_ALIVE) {
            continue; // cancels and edges' beats are for workers
        }
        if let Some(worker) = h.str(H_WORKER) {
            live.heard(worker, h.str(H_MODELS).unwrap_or("*"));
        }
    }
    // The brokers are gone: closing the consumer waits for them, so not here.
    drop(tokio::task::spawn_blocking(move || drop(consumer)));
}
