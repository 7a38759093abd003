//! The replay buffer in Redis: one stream (`XADD`) per recorded stream,
//! shared by every edge, so a client may resume on another edge than the
//! one that runs its generation. Event `n` is entry `1-n`; entry `0-1`
//! names the owner and the route. Writes go through one task per edge that
//! pipelines them (the delivering path only hands events to a bounded
//! channel); each write batch renews the key's expiry to `resume.retain_ms`.
//! A follower on another edge polls for new entries every `resume.poll_ms`,
//! and holds a lease (`<key>:followed`, renewed while it reads) that keeps
//! the generation from being cancelled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::*;
use fred::types::config::Options;
use tokio::sync::mpsc;

use super::{
    Attachment, Budget, Recorder, Recording, Replay, ReplayError, ReplayLog, ResumeConfig,
    event_bytes, in_background, later,
};
use crate::backends::queue::ResponseEvent;
use crate::error::ErrorInfo;
use crate::protocol::{Chunk, Route};

/// Writes waiting for the writer task, across all streams of this edge.
const WRITE_QUEUE: usize = 16_384;
/// Entries read per round trip when following.
const READ_BATCH: u64 = 512;

pub struct RedisReplay {
    client: Client,
    options: Options,
    key_prefix: String,
    writes: mpsc::Sender<Write>,
    budget: Arc<Budget>,
    retain: Duration,
    grace: Duration,
    poll: Duration,
}

/// One entry to append.
struct Write {
    key: Arc<str>,
    /// The entry id: `0-1` for the header, `1-n` for event `n`.
    id: String,
    fields: Vec<(&'static str, Value)>,
}

impl RedisReplay {
    pub async fn connect(url: &str, config: &ResumeConfig) -> Self {
        let client = crate::backends::redis::connect(url, config.timeout, "resume").await;
        let (writes, queued) = mpsc::channel(WRITE_QUEUE);
        let retain_ms = i64::try_from(config.retain.as_millis()).unwrap_or(i64::MAX);
        tokio::spawn(write_all(client.clone(), queued, retain_ms));
        Self {
            options: crate::backends::redis::one_attempt(config.timeout),
            client,
            key_prefix: config.key_prefix.clone(),
            writes,
            budget: Budget::new(config),
            retain: config.retain,
            grace: config.grace,
            poll: config.poll,
        }
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.key_prefix)
    }
}

/// The writer task: appends what is queued, a batch per round trip.
async fn write_all(client: Client, mut queued: mpsc::Receiver<Write>, retain_ms: i64) {
    let mut batch = Vec::with_capacity(256);
    while queued.recv_many(&mut batch, 256).await > 0 {
        let pipeline = client.pipeline();
        let mut keys: Vec<Arc<str>> = Vec::new();
        for write in batch.drain(..) {
            let _: Result<(), _> = pipeline
                .xadd(&*write.key, false, None::<()>, write.id, write.fields)
                .await;
            if !keys.iter().any(|key| Arc::ptr_eq(key, &write.key)) {
                keys.push(write.key);
            }
        }
        for key in keys {
            let _: Result<(), _> = pipeline.pexpire(&*key, retain_ms, None).await;
        }
        if let Err(err) = pipeline
            .try_all::<Value>()
            .await
            .into_iter()
            .try_for_each(|r| r.map(drop))
        {
            tracing::debug!(%err, "could not write to the replay buffer in Redis");
        }
    }
}

fn unavailable(err: Error) -> ReplayError {
    ReplayError::Unavailable(err.to_string())
}

#[async_trait]
impl ReplayLog for RedisReplay {
    fn record(&self, id: &str, owner: &str, route: Route) -> Box<dyn Recorder> {
        let key: Arc<str> = self.key(id).into();
        let mut recorder = RedisRecorder {
            key,
            writes: self.writes.clone(),
            budget: self.budget.clone(),
            retain: self.retain,
            sent: 0,
            bytes: 0,
            outgrown: false,
            ended: false,
        };
        recorder.send(
            "0-1".to_string(),
            vec![
                ("owner", Value::from(owner.to_string())),
                ("route", Value::from(route.path())),
            ],
        );
        Box::new(recorder)
    }

    async fn find(&self, id: &str) -> Result<Option<Recording>, ReplayError> {
        let entries: Vec<(String, HashMap<String, String>)> = self
            .client
            .with_options(&self.options)
            .xrange_values(self.key(id), "0-1", "0-1", Some(1))
            .await
            .map_err(unavailable)?;
        let Some((_, mut fields)) = entries.into_iter().next() else {
            return Ok(None);
        };
        let route = fields.get("route").and_then(|path| Route::from_path(path));
        let (Some(owner), Some(route)) = (fields.remove("owner"), route) else {
            return Ok(None);
        };
        let last = last_entry(&self.client, &self.options, &self.key(id)).await?;
        Ok(Some(Recording {
            owner,
            route,
            outgrown: matches!(last, Some(Last::Outgrown)),
        }))
    }

    fn follow(&self, id: &str, after: u64) -> Replay {
        use futures::StreamExt;
        let reader = Reader {
            client: self.client.clone(),
            options: self.options.clone(),
            key: self.key(id),
            poll: self.poll,
        };
        let pending: std::collections::VecDeque<_> = Default::default();
        futures::stream::unfold(Some((reader, after, pending)), |state| async move {
            let (reader, mut after, mut pending) = state?;
            loop {
                if let Some(item) = pending.pop_front() {
                    let next = match &item {
                        Ok(ResponseEvent::Chunk(_)) => Some((reader, after, pending)),
                        _ => None,
                    };
                    return Some((item, next));
                }
                match reader.after(after).await {
                    Ok(events) if events.is_empty() => match reader.last().await {
                        // Nothing after `after`, and nothing will come.
                        Ok(Some(Last::Ended)) => return None,
                        Ok(Some(Last::Outgrown)) => {
                            return Some((Err(ReplayError::Outgrown), None));
                        }
                        Ok(Some(Last::Open)) => tokio::time::sleep(reader.poll).await,
                        Ok(None) => return Some((Err(ReplayError::Expired), None)),
                        Err(err) => return Some((Err(err), None)),
                    },
                    Ok(events) => {
                        after += events.len() as u64;
                        pending.extend(events);
                    }
                    Err(err) => return Some((Err(err), None)),
                }
            }
        })
        .boxed()
    }

    fn attach(&self, id: &str) -> Attachment {
        let lease = format!("{}:followed", self.key(id));
        let (client, options) = (self.client.clone(), self.options.clone());
        let grace_ms = i64::try_from(self.grace.as_millis()).unwrap_or(i64::MAX);
        let every = (self.grace / 4).max(Duration::from_millis(10));
        let renew = {
            let (client, lease) = (client.clone(), lease.clone());
            tokio::spawn(async move {
                loop {
                    let expiry = Some(Expiration::PX(grace_ms));
                    let _: Result<(), _> = client
                        .with_options(&options)
                        .set(&lease, 1, expiry, None, false)
                        .await;
                    tokio::time::sleep(every).await;
                }
            })
        };
        Box::new(Lease {
            _renew: tokio_util::task::AbortOnDropHandle::new(renew),
            client,
            lease,
        })
    }

    async fn attached(&self, id: &str) -> bool {
        let lease = format!("{}:followed", self.key(id));
        let found: Result<i64, _> = self.client.with_options(&self.options).exists(lease).await;
        found.is_ok_and(|n| n > 0)
    }
}

/// A follower's lease: renewed until dropped, then deleted.
struct Lease {
    /// Aborted when the lease is dropped.
    _renew: tokio_util::task::AbortOnDropHandle<()>,
    client: Client,
    lease: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (client, lease) = (self.client.clone(), std::mem::take(&mut self.lease));
        in_background(async move {
            let _: Result<(), _> = client.del(lease).await;
        });
    }
}

struct Reader {
    client: Client,
    options: Options,
    key: String,
    poll: Duration,
}

impl Reader {
    /// The events recorded after the `after`-th, up to a batch.
    async fn after(
        &self,
        after: u64,
    ) -> Result<Vec<Result<ResponseEvent, ReplayError>>, ReplayError> {
        let entries: Vec<(String, HashMap<String, Value>)> = self
            .client
            .with_options(&self.options)
            .xrange_values(&self.key, format!("1-{}", after + 1), "+", Some(READ_BATCH))
            .await
            .map_err(unavailable)?;
        Ok(entries
            .into_iter()
            .map(|(_, fields)| decode(fields))
            .collect())
    }

    /// What the stream's last entry says; `None` when the stream is gone.
    async fn last(&self) -> Result<Option<Last>, ReplayError> {
        last_entry(&self.client, &self.options, &self.key).await
    }
}

/// Where a recorded stream stands, from its last entry.
enum Last {
    Open,
    Ended,
    Outgrown,
}

async fn last_entry(
    client: &Client,
    options: &Options,
    key: &str,
) -> Result<Option<Last>, ReplayError> {
    let last: Vec<(String, HashMap<String, Value>)> = client
        .with_options(options)
        .xrevrange_values(key, "+", "-", Some(1))
        .await
        .map_err(unavailable)?;
    Ok(last.into_iter().next().map(|(id, fields)| {
        match (
            id == "0-1",
            fields.contains_key("c"),
            fields.contains_key("x"),
        ) {
            (true, _, _) | (false, true, _) => Last::Open,
            (false, false, true) => Last::Outgrown,
            (false, false, false) => Last::Ended,
        }
    }))
}

/// An entry's event: `c` a chunk, `e` an error, `d` the end, `x` outgrown.
fn decode(mut fields: HashMap<String, Value>) -> Result<ResponseEvent, ReplayError> {
    let bytes = |value: Value| value.as_bytes().map(Bytes::copy_from_slice);
    if let Some(chunk) = fields.remove("c").and_then(bytes) {
        return Chunk::from_framed(chunk)
            .map(ResponseEvent::Chunk)
            .ok_or(ReplayError::Expired);
    }
    if let Some(error) = fields.remove("e").and_then(bytes) {
        return serde_json::from_slice::<ErrorInfo>(&error)
            .map(ResponseEvent::Error)
            .map_err(|err| ReplayError::Unavailable(err.to_string()));
    }
    if fields.contains_key("d") {
        return Ok(ResponseEvent::Done(0));
    }
    Err(ReplayError::Outgrown)
}

struct RedisRecorder {
    key: Arc<str>,
    writes: mpsc::Sender<Write>,
    budget: Arc<Budget>,
    retain: Duration,
    /// Events recorded.
    sent: u64,
    bytes: usize,
    outgrown: bool,
    ended: bool,
}

impl RedisRecorder {
    /// Queues an entry; a full queue makes the stream unresumable.
    fn send(&mut self, id: String, fields: Vec<(&'static str, Value)>) -> bool {
        let write = Write {
            key: self.key.clone(),
            id,
            fields,
        };
        self.writes.try_send(write).is_ok()
    }

    /// Marks the stream outgrown, for followers (waiting for room in the queue).
    fn outgrow(&mut self) {
        self.outgrown = true;
        self.sent += 1;
        let write = Write {
            key: self.key.clone(),
            id: format!("1-{}", self.sent),
            fields: vec![("x", Value::from(""))],
        };
        let writes = self.writes.clone();
        in_background(async move {
            let _ = writes.send(write).await;
        });
    }
}

impl Recorder for RedisRecorder {
    fn record(&mut self, event: &ResponseEvent) {
        if self.outgrown || self.ended {
            return;
        }
        let bytes = event_bytes(event);
        if !self.budget.take(self.bytes, bytes) {
            return self.outgrow();
        }
        self.bytes += bytes;
        let field = match event {
            ResponseEvent::Chunk(chunk) => ("c", Value::Bytes(chunk.framed().clone())),
            ResponseEvent::Error(info) => (
                "e",
                Value::from(serde_json::to_string(info).unwrap_or_default()),
            ),
            ResponseEvent::Done(_) => ("d", Value::from("")),
        };
        self.ended = !matches!(event, ResponseEvent::Chunk(_));
        self.sent += 1;
        let id = format!("1-{}", self.sent);
        if !self.send(id, vec![field]) {
            self.sent -= 1;
            self.outgrow();
        }
    }

    fn resumable(&self) -> bool {
        !self.outgrown
    }
}

impl Drop for RedisRecorder {
    fn drop(&mut self) {
        let (budget, bytes) = (self.budget.clone(), self.bytes);
        later(self.retain, move || budget.release(bytes));
    }
}
