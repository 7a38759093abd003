//! Replay buffers of streamed answers, so that a client whose connection
//! dropped can resume a stream where it left off instead of asking again.
//!
//! The edge records each event it delivers ([`Recorder`]), numbered from 1;
//! a client that comes back reads the events after the last one it saw and
//! follows the rest as it is generated ([`ReplayLog::follow`]). While a
//! stream is followed ([`ReplayLog::attach`]) its generation is not
//! cancelled. Only the key that made a stream may resume it.
//!
//! In process ([`MemoryReplay`]) for one gateway; in Redis Streams
//! ([`RedisReplay`]) when a client may reconnect to another edge. Both are
//! bounded per stream and in total: a stream that outgrows its bound goes
//! on, but can no longer be resumed.

mod config;
mod memory;
mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::backends::queue::ResponseEvent;
use crate::protocol::Route;

pub use config::ResumeConfig;
pub use memory::MemoryReplay;
pub use redis::RedisReplay;

/// What is known of a recorded stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recording {
    /// The API key that made it.
    pub owner: String,
    /// The route it answers, which says how its events are written.
    pub route: Route,
    /// It outgrew its buffer: it can no longer be resumed.
    pub outgrown: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error(
        "the stream outgrew its replay buffer (resume.max_stream_bytes or resume.max_total_bytes) and can no longer be resumed"
    )]
    Outgrown,
    #[error("the stream's replay buffer expired before it ended")]
    Expired,
    #[error("the replay buffer is unavailable: {0}")]
    Unavailable(String),
}

impl From<ReplayError> for crate::error::GatewayError {
    fn from(err: ReplayError) -> Self {
        match err {
            ReplayError::Outgrown => Self::Gone(err.to_string()),
            ReplayError::Expired => Self::NotFound(err.to_string()),
            ReplayError::Unavailable(_) => Self::Backend(err.to_string()),
        }
    }
}

/// The events of a stream after a given one, in order, ending after the
/// stream's last event.
pub type Replay = BoxStream<'static, Result<ResponseEvent, ReplayError>>;

/// Something a follower holds while it reads: dropping it detaches.
pub type Attachment = Box<dyn Send + Sync>;

#[async_trait]
pub trait ReplayLog: Send + Sync + 'static {
    /// Starts recording stream `id`, made by `owner` on `route`.
    fn record(&self, id: &str, owner: &str, route: Route) -> Box<dyn Recorder>;
    async fn find(&self, id: &str) -> Result<Option<Recording>, ReplayError>;
    /// The events after the `after`-th (0: all of them), then the rest as recorded.
    fn follow(&self, id: &str, after: u64) -> Replay;
    /// Marks `id` as followed while the attachment is held.
    fn attach(&self, id: &str) -> Attachment;
    /// Whether anyone (on any edge) follows `id`.
    async fn attached(&self, id: &str) -> bool;
}

/// Records one stream's events, in order. Never blocks: a stream that
/// cannot be recorded (over its bounds) stops being resumable.
pub trait Recorder: Send {
    fn record(&mut self, event: &ResponseEvent);
    /// Whether the stream can still be resumed.
    fn resumable(&self) -> bool;
}

/// The bytes an event holds in a buffer.
pub fn event_bytes(event: &ResponseEvent) -> usize {
    let held = match event {
        ResponseEvent::Chunk(chunk) => chunk.framed().len(),
        ResponseEvent::Error(info) => info.message.len() + info.kind.len() + 64,
        ResponseEvent::Done(_) => 0,
    };
    held + EVENT_OVERHEAD
}

/// What an event costs beside its bytes (its slot, its numbering).
const EVENT_OVERHEAD: usize = 32;

/// The bytes of events all streams of this edge keep, against `max_total_bytes`.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    per_stream: usize,
    total: usize,
}

impl Budget {
    pub fn new(config: &ResumeConfig) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            per_stream: config.max_stream_bytes.get(),
            total: config.max_total_bytes.get(),
        })
    }

    /// Takes `bytes` more for a stream that holds `held`; false when either bound is passed.
    fn take(&self, held: usize, bytes: usize) -> bool {
        if held + bytes > self.per_stream {
            return false;
        }
        let total = self.total;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + bytes <= total).then_some(used + bytes)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The replay buffer in Redis at `redis` (see `Config::resume_redis`), else in process.
pub async fn open(config: &ResumeConfig, redis: Option<&str>) -> Arc<dyn ReplayLog> {
    match redis {
        Some(url) => Arc::new(RedisReplay::connect(url, config).await),
        None => Arc::new(MemoryReplay::new(config)),
    }
}

/// Runs `work` on the current runtime, if there is one (a recorder or
/// follower dropped outside any runtime has nothing left to clean up).
fn in_background(work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work);
    }
}

/// Runs `f` after `delay`, in the background.
fn later(delay: std::time::Duration, f: impl FnOnce() + Send + 'static) {
    in_background(async move {
        tokio::time::sleep(delay).await;
        f();
    });
}
