//! Streams that outlive their connection. A resumable stream is delivered
//! by a task of its own, which records each event in the replay buffer
//! ([`ReplayLog`]) before handing it to the client's connection through a
//! bounded channel (a slow client still slows the stream). When the client
//! disconnects, the task goes on for `resume.grace_ms`: a client that
//! resumes (on this edge or, with a shared buffer, another) keeps it going
//! until the end; when nobody has followed it for the grace period, the
//! generation is cancelled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::Completion;
use crate::backends::queue::ResponseEvent;
use crate::backends::replay::{Attachment, Recorder, Replay, ReplayLog};
use crate::error::{ErrorInfo, GatewayError};
use crate::observe::metrics::{MetricsRegistry, Roles};

/// Events handed to the live connection ahead of its writes.
const LIVE_BUFFER: usize = 64;

/// What makes streams resumable: the buffer and the grace period.
pub struct Resumption {
    pub log: Arc<dyn ReplayLog>,
    pub grace: Duration,
    pub metrics: ResumeMetrics,
}

pub struct ResumeMetrics {
    /// Attempts to resume, by outcome.
    pub resumes: IntCounterVec,
    /// Generations cancelled because nobody came back within the grace period.
    pub abandoned: IntCounter,
}

/// The outcomes of the `outcome` label of `sluice_stream_resumes_total`.
pub const RESUME_OUTCOMES: [&str; 4] = ["resumed", "not_found", "outgrown", "expired"];

impl ResumeMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let resumes = registry.counter_vec(
            Roles::EDGE,
            "sluice_stream_resumes_total",
            "Requests to resume a stream, by outcome",
            &["outcome"],
        );
        for outcome in RESUME_OUTCOMES {
            resumes.with_label_values(&[outcome]);
        }
        Self {
            resumes,
            abandoned: registry.counter(
                Roles::EDGE,
                "sluice_streams_abandoned_total",
                "Streams whose client left and did not resume within resume.grace_ms (their generation was cancelled)",
            ),
        }
    }
}

/// A resumable stream's live side: its events, numbered from 1 in the
/// order received.
pub struct Live {
    pub id: String,
    events: mpsc::Receiver<ResponseEvent>,
    /// Cancels the generation at once, with no grace period.
    stop: CancellationToken,
}

impl Live {
    /// The next event; after the last one (`Done` or `Error`), `None`.
    pub async fn next(&mut self) -> Option<ResponseEvent> {
        self.events.recv().await
    }
}

impl Resumption {
    /// Delivers `completion` from a task of its own, recording its events.
    pub fn detach(self: &Arc<Self>, completion: Completion) -> Live {
        let id = completion.record.request_id.clone();
        let owner = completion.record.key_id.clone().unwrap_or_default();
        let recorder = self.log.record(&id, &owner, completion.record.route);
        let (live, events) = mpsc::channel(LIVE_BUFFER);
        let abandon = CancellationToken::new();
        let watchdog = tokio::spawn(self.clone().abandon_unfollowed(
            live.clone(),
            id.clone(),
            abandon.clone(),
        ));
        tokio::spawn(deliver(
            completion,
            recorder,
            live,
            abandon.clone(),
            watchdog,
        ));
        Live {
            id,
            events,
            stop: abandon,
        }
    }

    /// Once the client is gone, cancels the stream when nobody has followed
    /// it for the grace period.
    async fn abandon_unfollowed(
        self: Arc<Self>,
        live: mpsc::Sender<ResponseEvent>,
        id: String,
        abandon: CancellationToken,
    ) {
        live.closed().await;
        drop(live);
        let mut followed_at = Instant::now();
        let every = (self.grace / 4).max(Duration::from_millis(5));
        loop {
            tokio::time::sleep(every).await;
            if self.log.attached(&id).await {
                followed_at = Instant::now();
            } else if followed_at.elapsed() >= self.grace {
                self.metrics.abandoned.inc();
                abandon.cancel();
                return;
            }
        }
    }
}

/// The delivering task: each event recorded, then sent to the live client
/// while it is connected, until the end or until abandoned.
async fn deliver(
    mut completion: Completion,
    mut recorder: Box<dyn Recorder>,
    live: mpsc::Sender<ResponseEvent>,
    abandon: CancellationToken,
    watchdog: tokio::task::JoinHandle<()>,
) {
    let _watchdog = AbortOnDropHandle::new(watchdog);
    let mut live = Some(live);
    loop {
        let delivery = tokio::select! {
            biased;
            () = abandon.cancelled() => {
                recorder.record(&ResponseEvent::Error(abandoned()));
                return;
            }
            delivery = completion.next() => delivery,
        };
        let event = ResponseEvent::from(delivery);
        let end = !matches!(event, ResponseEvent::Chunk(_));
        recorder.record(&event);
        if let Some(sender) = &live
            && sender.send(event).await.is_err()
        {
            live = None;
            // Nobody can come back to a stream that outgrew its buffer.
            if !recorder.resumable() {
                return;
            }
        }
        if end {
            return;
        }
    }
}

/// The event that ends a stream nobody came back for.
fn abandoned() -> ErrorInfo {
    ErrorInfo {
        status: 499,
        kind: "client_closed".into(),
        message: "the client left and did not resume the stream within resume.grace_ms; its generation was cancelled".into(),
        param: None,
        code: None,
    }
}

/// Where a transport reads a stream's events from, numbered from 1.
pub enum Events {
    /// Straight from the completion: the stream is not resumable.
    Direct {
        completion: Box<Completion>,
        ended: bool,
    },
    /// From the task that delivers a resumable stream.
    Live(Live),
    /// A resumed stream, from the replay buffer (followed while held).
    Resumed {
        id: String,
        replay: Replay,
        _following: Attachment,
    },
}

impl Events {
    /// The events of `completion`, resumable when `resumption` is given.
    pub fn of(completion: Completion, resumption: Option<&Arc<Resumption>>) -> Self {
        match resumption {
            Some(resumption) => Self::Live(resumption.detach(completion)),
            None => Self::Direct {
                completion: Box::new(completion),
                ended: false,
            },
        }
    }

    /// The id a client resumes the stream by, when it can.
    pub fn resumable_id(&self) -> Option<&str> {
        match self {
            Self::Live(Live { id, .. }) | Self::Resumed { id, .. } => Some(id),
            Self::Direct { .. } => None,
        }
    }

    /// What cancels a live stream's generation at once (when its client
    /// may not come back: its key was revoked).
    pub fn stopper(&self) -> Option<CancellationToken> {
        match self {
            Self::Live(live) => Some(live.stop.clone()),
            _ => None,
        }
    }

    /// The next event; `None` after the last (`Done` or `Error`).
    pub async fn next(&mut self) -> Option<ResponseEvent> {
        match self {
            Self::Direct { ended: true, .. } => None,
            Self::Direct { completion, ended } => {
                let event = ResponseEvent::from(completion.next().await);
                *ended = !matches!(event, ResponseEvent::Chunk(_));
                Some(event)
            }
            Self::Live(live) => live.next().await,
            Self::Resumed { replay, .. } => match replay.next().await? {
                Ok(event) => Some(event),
                Err(err) => Some(ResponseEvent::Error(GatewayError::from(err).info())),
            },
        }
    }
}
