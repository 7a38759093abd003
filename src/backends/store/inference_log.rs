//! Writes one inference-log row per request, off the request path: rows go
//! into a bounded channel and a background task inserts them in batches.
//! When the store falls behind, new rows are dropped and counted rather than
//! slowing requests down.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use prometheus::IntCounter;

use crate::backends::store::{InferenceRecord, Store};
use crate::observe::metrics::{MetricsRegistry, Roles};

const BATCH: usize = 256;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct InferenceLogger {
    tx: mpsc::Sender<InferenceRecord>,
    /// `sluice_inference_log_dropped_total`.
    dropped: IntCounter,
}

impl InferenceLogger {
    /// Starts the writer; it runs until every logger clone is dropped, then flushes.
    pub fn start(
        store: Arc<dyn Store>,
        buffer: usize,
        registry: &MetricsRegistry,
    ) -> (Self, JoinHandle<()>) {
        let dropped = registry.counter(
            Roles::EDGE,
            "sluice_inference_log_dropped_total",
            "Inference-log rows dropped because the store fell behind",
        );
        let (tx, rx) = mpsc::channel(buffer);
        let task = tokio::spawn(write_batches(store, rx));
        (Self { tx, dropped }, task)
    }

    pub fn log(&self, record: InferenceRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::Receiver<InferenceRecord>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let open = match tokio::time::timeout(FLUSH_EVERY, rx.recv_many(&mut batch, BATCH)).await {
            Ok(0) => false,
            Ok(_) => true,
            Err(_) => true,
        };
        if !batch.is_empty() {
            if let Err(err) = store.insert_inferences(&batch).await {
                tracing::warn!(%err, rows = batch.len(), "could not write inference log rows");
            }
            batch.clear();
        }
        if !open {
            return;
        }
    }
}
