//! The in-process queue: a bounded channel of jobs to the in-process worker,
//! and a bounded channel of events back per request. Both bounds give
//! back-pressure: a full queue makes submitters wait (then fail with 503), a
//! slow client makes its worker wait, which slows the upstream read. Batch
//! lines wait in a channel of their own (the batch lane), without a
//! deadline: the batch runner bounds how many it submits.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Job, JobSource, Lane, Queue, QueueError, QueuedRequest, ResponseEvent, ResponseSink,
    ResponseStream, SinkClosed,
};
use crate::error::ErrorInfo;

/// Events buffered per request between worker and edge.
const RESPONSE_BUFFER: usize = 128;

pub struct MemoryQueue {
    jobs_tx: mpsc::Sender<Job>,
    jobs_rx: Mutex<mpsc::Receiver<Job>>,
    batch_tx: mpsc::Sender<Job>,
    batch_rx: Mutex<mpsc::Receiver<Job>>,
    submit_timeout: Duration,
}

impl MemoryQueue {
    pub fn new(capacity: usize, submit_timeout: Duration) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel(capacity);
        let (batch_tx, batch_rx) = mpsc::channel(capacity);
        Self {
            jobs_tx,
            jobs_rx: Mutex::new(jobs_rx),
            batch_tx,
            batch_rx: Mutex::new(batch_rx),
            submit_timeout,
        }
    }
}

struct ChannelStream {
    events: mpsc::Receiver<ResponseEvent>,
    _cancel_on_drop: DropGuard,
}

#[async_trait]
impl ResponseStream for ChannelStream {
    async fn next(&mut self) -> ResponseEvent {
        self.events.recv().await.unwrap_or_else(|| {
            ResponseEvent::Error(ErrorInfo::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "BadGatewayError",
                "the worker stopped before finishing the response",
            ))
        })
    }
}

struct ChannelSink(mpsc::Sender<ResponseEvent>);

#[async_trait]
impl ResponseSink for ChannelSink {
    async fn send(&mut self, event: ResponseEvent) -> Result<(), SinkClosed> {
        self.0.send(event).await.map_err(|_| SinkClosed)
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn submit(&self, request: QueuedRequest) -> Result<Box<dyn ResponseStream>, QueueError> {
        let (events_tx, events_rx) = mpsc::channel(RESPONSE_BUFFER);
        let cancel = CancellationToken::new();
        let lane = request.lane;
        let job = Job {
            request,
            sink: Box::new(ChannelSink(events_tx)),
            cancel: cancel.clone(),
        };
        let sent = match lane {
            Lane::Interactive => {
                tokio::time::timeout(self.submit_timeout, self.jobs_tx.send(job)).await
            }
            Lane::Batch => Ok(self.batch_tx.send(job).await),
        };
        match sent {
            Ok(Ok(())) => Ok(Box::new(ChannelStream {
                events: events_rx,
                _cancel_on_drop: cancel.drop_guard(),
            })),
            Ok(Err(_)) => Err(QueueError::Unavailable(
                "the in-process worker has stopped".into(),
            )),
            Err(_) => Err(QueueError::Full(self.submit_timeout)),
        }
    }

    async fn ping(&self) -> Result<(), QueueError> {
        if self.jobs_tx.is_closed() {
            return Err(QueueError::Unavailable(
                "the in-process worker has stopped".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl JobSource for MemoryQueue {
    async fn next_job(&self) -> Option<Job> {
        self.jobs_rx.lock().await.recv().await
    }

    async fn next_batch_job(&self) -> Option<Job> {
        self.batch_rx.lock().await.recv().await
    }
}
