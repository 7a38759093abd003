//! The replay buffer in process: each stream's events in memory, kept
//! `resume.retain_ms` after its end, within the per-stream and total bounds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    Attachment, Budget, Recorder, Recording, Replay, ReplayError, ReplayLog, ResumeConfig,
    event_bytes, later,
};
use crate::backends::queue::ResponseEvent;
use crate::protocol::Route;

pub struct MemoryReplay {
    streams: Arc<Mutex<HashMap<String, Arc<Stream>>>>,
    budget: Arc<Budget>,
    retain: Duration,
}

/// One recorded stream.
struct Stream {
    recording: Recording,
    log: Mutex<Log>,
    /// Bumped after each change to `log`.
    changed: watch::Sender<u64>,
    followers: AtomicUsize,
}

#[derive(Default)]
struct Log {
    events: Vec<ResponseEvent>,
    bytes: usize,
    ended: bool,
    outgrown: bool,
    /// Past its retention: the events are gone.
    expired: bool,
}

impl Stream {
    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes followers, if any (a stream nobody follows pays no wake-up).
    fn notify(&self) {
        if self.changed.receiver_count() > 0 {
            self.changed.send_modify(|version| *version += 1);
        }
    }
}

impl MemoryReplay {
    pub fn new(config: &ResumeConfig) -> Self {
        Self {
            streams: Arc::default(),
            budget: Budget::new(config),
            retain: config.retain,
        }
    }

    fn stream(&self, id: &str) -> Option<Arc<Stream>> {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.get(id).cloned()
    }
}

#[async_trait]
impl ReplayLog for MemoryReplay {
    fn record(&self, id: &str, owner: &str, route: Route) -> Box<dyn Recorder> {
        let stream = Arc::new(Stream {
            recording: Recording {
                owner: owner.to_string(),
                route,
                outgrown: false,
            },
            log: Mutex::default(),
            changed: watch::Sender::new(0),
            followers: AtomicUsize::new(0),
        });
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.insert(id.to_string(), stream.clone());
        Box::new(MemoryRecorder {
            id: id.to_string(),
            stream,
            streams: self.streams.clone(),
            budget: self.budget.clone(),
            retain: self.retain,
        })
    }

    async fn find(&self, id: &str) -> Result<Option<Recording>, ReplayError> {
        Ok(self.stream(id).map(|stream| Recording {
            outgrown: stream.log().outgrown,
            ..stream.recording.clone()
        }))
    }

    fn follow(&self, id: &str, after: u64) -> Replay {
        use futures::StreamExt;
        let Some(stream) = self.stream(id) else {
            return futures::stream::iter([Err(ReplayError::Expired)]).boxed();
        };
        let next = usize::try_from(after).unwrap_or(usize::MAX);
        let changes = stream.changed.subscribe();
        futures::stream::unfold(Some((stream, changes, next)), |state| async move {
            let (stream, mut changes, next) = state?;
            loop {
                changes.borrow_and_update();
                let found = {
                    let log = stream.log();
                    match (log.outgrown, log.events.get(next), log.ended) {
                        (true, _, _) => Some(Err(ReplayError::Outgrown)),
                        _ if log.expired => Some(Err(ReplayError::Expired)),
                        (false, Some(event), _) => Some(Ok(event.clone())),
                        (false, None, true) => return None,
                        (false, None, false) => None,
                    }
                };
                match found {
                    Some(Ok(event)) => {
                        let done = !matches!(event, ResponseEvent::Chunk(_));
                        let state = (!done).then_some((stream, changes, next + 1));
                        return Some((Ok(event), state));
                    }
                    Some(Err(err)) => return Some((Err(err), None)),
                    None => {
                        let _ = changes.changed().await;
                    }
                }
            }
        })
        .boxed()
    }

    fn attach(&self, id: &str) -> Attachment {
        match self.stream(id) {
            Some(stream) => {
                stream.followers.fetch_add(1, Ordering::Relaxed);
                Box::new(Following(stream))
            }
            None => Box::new(()),
        }
    }

    async fn attached(&self, id: &str) -> bool {
        self.stream(id)
            .is_some_and(|stream| stream.followers.load(Ordering::Relaxed) > 0)
    }
}

struct Following(Arc<Stream>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::Relaxed);
    }
}

struct MemoryRecorder {
    id: String,
    stream: Arc<Stream>,
    streams: Arc<Mutex<HashMap<String, Arc<Stream>>>>,
    budget: Arc<Budget>,
    retain: Duration,
}

impl Recorder for MemoryRecorder {
    fn record(&mut self, event: &ResponseEvent) {
        {
            let mut log = self.stream.log();
            if log.outgrown || log.ended {
                return;
            }
            let bytes = event_bytes(event);
            if self.budget.take(log.bytes, bytes) {
                log.bytes += bytes;
                log.events.push(event.clone());
                log.ended = !matches!(event, ResponseEvent::Chunk(_));
            } else {
                self.budget.release(log.bytes);
                *log = Log {
                    outgrown: true,
                    ..Log::default()
                };
            }
        }
        self.stream.notify();
    }

    fn resumable(&self) -> bool {
        !self.stream.log().outgrown
    }
}

impl Drop for MemoryRecorder {
    fn drop(&mut self) {
        let (id, stream, streams, budget) = (
            std::mem::take(&mut self.id),
            self.stream.clone(),
            self.streams.clone(),
            self.budget.clone(),
        );
        later(self.retain, move || {
            let mut all = streams.lock().unwrap_or_else(PoisonError::into_inner);
            if all.get(&id).is_some_and(|s| Arc::ptr_eq(s, &stream)) {
                all.remove(&id);
            }
            drop(all);
            let mut log = stream.log();
            budget.release(log.bytes);
            log.bytes = 0;
            log.events = Vec::new();
            log.expired = true;
            drop(log);
            stream.notify();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Chunk;
    use futures::StreamExt;

    fn chunk(text: &str) -> ResponseEvent {
        ResponseEvent::Chunk(Chunk::from_payload(
            format!("{{\"text\":\"{text}\"}}").as_bytes(),
        ))
    }

    #[tokio::test]
    async fn a_follower_reads_what_was_recorded_then_what_comes() {
        let replay = MemoryReplay::new(&ResumeConfig::default());
        let mut recorder = replay.record("s1", "key-a", Route::Completions);
        for text in ["a", "b", "c"] {
            recorder.record(&chunk(text));
        }
        assert_eq!(replay.find("s1").await.unwrap().unwrap().owner, "key-a");
        let mut follow = replay.follow("s1", 1);
        assert_eq!(follow.next().await, Some(Ok(chunk("b"))));
        assert_eq!(follow.next().await, Some(Ok(chunk("c"))));
        let later = tokio::spawn(async move {
            let rest: Vec<_> = follow.collect().await;
            rest
        });
        recorder.record(&chunk("d"));
        recorder.record(&ResponseEvent::Done(0));
        let rest = later.await.unwrap();
        assert_eq!(rest, vec![Ok(chunk("d")), Ok(ResponseEvent::Done(0))]);
        assert!(replay.find("nope").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_stream_over_its_bound_stops_being_resumable_and_gives_its_bytes_back() {
        let config = ResumeConfig {
            max_stream_bytes: std::num::NonZeroUsize::new(200).unwrap(),
            ..ResumeConfig::default()
        };
        let replay = MemoryReplay::new(&config);
        let mut recorder = replay.record("s1", "key-a", Route::Completions);
        recorder.record(&chunk("a"));
        assert!(recorder.resumable());
        assert!(replay.budget.used() > 0);
        for _ in 0..10 {
            recorder.record(&chunk("a longer piece of text"));
        }
        assert!(!recorder.resumable());
        assert_eq!(replay.budget.used(), 0);
        let mut follow = replay.follow("s1", 0);
        assert_eq!(follow.next().await, Some(Err(ReplayError::Outgrown)));
    }

    #[tokio::test]
    async fn the_total_bound_is_shared_by_all_streams() {
        let config = ResumeConfig {
            max_stream_bytes: std::num::NonZeroUsize::new(200).unwrap(),
            max_total_bytes: std::num::NonZeroUsize::new(300).unwrap(),
            ..ResumeConfig::default()
        };
        let replay = MemoryReplay::new(&config);
        let mut first = replay.record("s1", "k", Route::Completions);
        let mut second = replay.record("s2", "k", Route::Completions);
        for _ in 0..3 {
            first.record(&chunk("some text"));
        }
        for _ in 0..3 {
            second.record(&chunk("some text"));
        }
        assert!(first.resumable());
        assert!(
            !second.resumable(),
            "the second did not fit beside the first"
        );
    }
}
