//! The queue stage: hands requests from edges to workers and streams each
//! upstream chunk back to the edge that waits for it.
//!
//! Edges see [`Queue`] (submit a request, read its [`ResponseStream`]; dropping
//! the stream cancels the request). Workers see [`JobSource`] (take the next
//! [`Job`], send its events to the job's [`ResponseSink`], stop when its
//! `cancel` token fires). The in-process implementation connects the two with
//! channels; the Kafka one with a request topic and a response topic.

mod config;
pub mod kafka;
mod memory;
mod metrics;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorInfo, GatewayError};
use crate::protocol::{Chunk, Route};

pub use config::{QueueBackend, QueueConfig, QueueSection};
pub use memory::MemoryQueue;
pub use metrics::QueueMetrics;

/// Which of a worker's lanes a request waits in: interactive requests are
/// taken first; batch lines only where the fleet has room left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Lane {
    #[default]
    Interactive,
    Batch,
}

/// A key's (or team's) priority class: when a model's endpoints are full,
/// waiting requests start in weighted fair order across keys and teams,
/// each class with its weight.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn name(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Its place in [`Priority::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Its share of a full pool against another class's: 4, 2, 1.
    pub fn weight(self) -> u32 {
        match self {
            Priority::High => 4,
            Priority::Normal => 2,
            Priority::Low => 1,
        }
    }

    /// vLLM's `priority` (lower runs first) for a request of this class
    /// in `lane`, when the fleet schedules by priority.
    pub fn vllm_priority(self, lane: Lane) -> i64 {
        match (lane, self) {
            (Lane::Batch, _) => 3,
            (_, Priority::High) => 0,
            (_, Priority::Normal) => 1,
            (_, Priority::Low) => 2,
        }
    }
}

/// A request as it travels to a worker.
#[derive(Debug, Clone)]
pub struct QueuedRequest {
    pub request_id: String,
    /// The model whose endpoints serve it (`[[models]]`); "" for the single pool.
    pub model: String,
    /// A hash of the prompt's start, for prefix-affine routing.
    pub prefix: u64,
    /// The client gets nothing before the whole answer (a JSON answer, not
    /// a stream): a worker may run it again on another endpoint when one
    /// fails mid-answer.
    pub buffered: bool,
    /// The upstream route the body is for.
    pub route: Route,
    /// The body for the upstream's route (JSON, already `stream: true`, on
    /// the generation routes).
    pub body: Bytes,
    /// The body's `content-type` when it is not JSON (a multipart upload).
    pub content_type: Option<String>,
    /// The stored response the request is about (a follow-up's
    /// `previous_response_id`, a retrieve's or a cancel's id): it runs on
    /// the endpoint that holds it, and nowhere else.
    pub pinned_to: Option<String>,
    /// The id its answer is stored under upstream: the worker records the
    /// endpoint that ran it.
    pub stores: Option<String>,
    /// W3C trace context (`traceparent`, `tracestate`) of the edge span.
    pub trace_context: Vec<(String, String)>,
    /// When the edge submitted it, in Unix milliseconds.
    pub submitted_at_ms: i64,
    pub lane: Lane,
    /// Whose share of a full pool it takes: `team:<id>` or `key:<id>`.
    pub tenant: String,
    pub priority: Priority,
}

impl QueuedRequest {
    pub fn new(
        request_id: String,
        model: String,
        route: Route,
        body: Bytes,
        trace_context: Vec<(String, String)>,
    ) -> Self {
        Self {
            request_id,
            model,
            prefix: 0,
            buffered: false,
            route,
            body,
            content_type: None,
            pinned_to: None,
            stores: None,
            trace_context,
            submitted_at_ms: chrono::Utc::now().timestamp_millis(),
            lane: Lane::Interactive,
            tenant: String::new(),
            priority: Priority::Normal,
        }
    }

    /// How long ago the edge submitted it.
    pub fn age(&self) -> std::time::Duration {
        let ms = chrono::Utc::now().timestamp_millis() - self.submitted_at_ms;
        std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }
}

/// What a worker sends back for a request. `Error` and `Done` end the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseEvent {
    Chunk(Chunk),
    Error(ErrorInfo),
    /// The end, and how many times the stream was continued on another
    /// endpoint after its own failed mid-answer.
    Done(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no worker capacity: the request waited {0:?} for a place in the queue")]
    Full(std::time::Duration),
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("no worker serving {0} is alive (none heard from within queue.worker_timeout_ms)")]
    NoWorker(String),
    /// The request does not fit in one queue message.
    #[error("the request body is larger than a queue message may be ({limit} bytes)")]
    TooLarge { limit: usize },
}

impl From<QueueError> for GatewayError {
    fn from(err: QueueError) -> Self {
        match err {
            QueueError::Full(_) | QueueError::NoWorker(_) => {
                GatewayError::Overloaded(err.to_string())
            }
            QueueError::Unavailable(_) => GatewayError::Backend(err.to_string()),
            QueueError::TooLarge { limit } => GatewayError::PayloadTooLarge { limit },
        }
    }
}

/// The edge side of the queue.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Submits a request; its events arrive on the returned stream.
    /// Dropping the stream cancels the request, wherever it is running.
    async fn submit(&self, request: QueuedRequest) -> Result<Box<dyn ResponseStream>, QueueError>;
    async fn ping(&self) -> Result<(), QueueError>;
}

/// The events of one submitted request, in order, each exactly once.
#[async_trait]
pub trait ResponseStream: Send {
    /// The next event; after `Error` or `Done` the stream is finished.
    async fn next(&mut self) -> ResponseEvent;
}

/// Where a worker sends the events of one job.
#[async_trait]
pub trait ResponseSink: Send {
    /// Fails when nobody waits for the response any more.
    async fn send(&mut self, event: ResponseEvent) -> Result<(), SinkClosed>;
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the requester is gone")]
pub struct SinkClosed;

/// One request for a worker to run.
pub struct Job {
    pub request: QueuedRequest,
    pub sink: Box<dyn ResponseSink>,
    /// Fires when the requester cancels (client disconnected).
    pub cancel: CancellationToken,
}

/// The worker side of the queue.
#[async_trait]
pub trait JobSource: Send + Sync + 'static {
    /// Whether the queue answers (for `sluice_backend_up{backend="queue"}`).
    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    /// The next job, or `None` when the source is shut down.
    async fn next_job(&self) -> Option<Job>;

    /// The next job of the batch lane (never, for a source without one:
    /// its batch lines arrive through [`JobSource::next_job`]).
    async fn next_batch_job(&self) -> Option<Job> {
        std::future::pending().await
    }
}
