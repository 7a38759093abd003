//! Delivering a response: a [`Completion`] yields the chunks to send, from
//! the cache or from a worker, through the token filters; at the end it
//! caches a complete answer.

use std::collections::VecDeque;

use super::filter_chain::{FilterChain, Filtered};
use super::record::{RequestRecord, saturating_i64};
use crate::backends::cache::{CachedChunks, CachedResponse};
use crate::backends::queue::{ResponseEvent, ResponseStream};
use crate::error::ErrorInfo;
use crate::observe::telemetry::StageSpan;
use crate::protocol::{Chunk, ChunkSummary, ChunkView};

/// What a transport sends next.
#[derive(Debug)]
pub enum Delivery {
    Chunk(Chunk),
    /// The response failed; nothing follows but the end marker.
    Error(ErrorInfo),
    Done,
}

impl From<Delivery> for ResponseEvent {
    /// The same event, for a transport or a buffer (the continuation count
    /// is in the request's record already).
    fn from(delivery: Delivery) -> Self {
        match delivery {
            Delivery::Chunk(chunk) => Self::Chunk(chunk),
            Delivery::Error(info) => Self::Error(info),
            Delivery::Done => Self::Done(0),
        }
    }
}

pub(super) enum Source {
    Cached {
        chunks: CachedResponse,
        next: usize,
    },
    Queue {
        responses: Box<dyn ResponseStream>,
        first: Option<ResponseEvent>,
    },
}

/// A response being delivered: from the cache or from a worker, through the token filters.
pub struct Completion {
    pub record: RequestRecord,
    source: Source,
    filters: FilterChain,
    /// A cached answer's chunks after the filters, one per chunk, filtered at
    /// once on the first call (one plugin call per filter, not per chunk).
    prefiltered: Option<VecDeque<Filtered>>,
    /// Whether the final usage-only chunk is delivered (streams that asked, and JSON assembly).
    deliver_usage_chunk: bool,
    /// On a cache miss: the key and the raw chunks to store once complete.
    to_cache: Option<(String, Vec<Chunk>)>,
    last_chunk: Option<Chunk>,
    /// A chunk that must go out before `Done` (flushed held text).
    pending_done: bool,
    /// A chunk that goes out next (the second of a [`Filtered::Then`]).
    pending_chunk: Option<Chunk>,
    /// Whether the answer comes from the cache.
    replayed: bool,
    finished: bool,
    delivery: StageSpan,
}

impl Completion {
    pub(super) fn new(
        record: RequestRecord,
        source: Source,
        filters: FilterChain,
        deliver_usage_chunk: bool,
        to_cache: Option<(String, Vec<Chunk>)>,
    ) -> Self {
        record.state.metrics.active_streams.inc();
        let delivery = record.trace.stage("stream.delivery");
        let replayed = matches!(source, Source::Cached { .. });
        Self {
            replayed,
            delivery,
            record,
            source,
            filters,
            prefiltered: None,
            deliver_usage_chunk,
            to_cache,
            last_chunk: None,
            pending_done: false,
            pending_chunk: None,
            finished: false,
        }
    }

    async fn next_event(&mut self) -> ResponseEvent {
        match &mut self.source {
            Source::Cached { chunks, next } => match chunks.get(*next) {
                Some(chunk) => {
                    *next += 1;
                    ResponseEvent::Chunk(chunk.clone())
                }
                None => ResponseEvent::Done(0),
            },
            Source::Queue { responses, first } => match first.take() {
                Some(event) => event,
                None => responses.next().await,
            },
        }
    }

    /// What the gateway reads from a chunk: for a cached answer, from the
    /// views the entry keeps (parsed by its first hit), else parsed here.
    fn summary_of(&self, chunk: &Chunk) -> ChunkSummary {
        match &self.source {
            // `next_event` has moved past the chunk already.
            Source::Cached { chunks, next } => chunks
                .views()
                .get(next.wrapping_sub(1))
                .and_then(Option::as_ref)
                .map_or_else(|| chunk.summary(), ChunkView::summary),
            Source::Queue { .. } if !self.record.route.generates() => chunk.whole_summary(),
            Source::Queue { .. } => chunk.summary(),
        }
    }

    /// The next thing to send. After `Error` or `Done`, always `Done`.
    pub async fn next(&mut self) -> Delivery {
        loop {
            if let Some(chunk) = self.pending_chunk.take() {
                self.record.chunk_sent();
                return self.deliver(chunk);
            }
            if self.pending_done {
                self.pending_done = false;
                return self.complete();
            }
            if self.finished {
                return Delivery::Done;
            }
            if let Source::Cached { chunks, next: 0 } = &self.source
                && self.prefiltered.is_none()
                && self.filters.has_filters()
            {
                match self.filters.apply_all(chunks).await {
                    Ok(filtered) => self.prefiltered = Some(filtered.into()),
                    Err(err) => return self.fail(err.info()),
                }
            }
            match self.next_event().await {
                ResponseEvent::Chunk(chunk) => {
                    let prefiltered = self.prefiltered.as_mut().and_then(|f| f.pop_front());
                    let summary = self.summary_of(&chunk);
                    if summary.usage.is_some() && self.record.route.counts_usage() {
                        self.record.usage = summary.usage;
                    }
                    self.record.generated += summary.outputs as u64;
                    if let Some((_, raw)) = &mut self.to_cache {
                        raw.push(chunk.clone());
                    }
                    // A typed API's events and whole answers carry usage
                    // beside their text: they go through the filters.
                    if summary.is_usage_only() && !self.filters.is_typed() {
                        if self.deliver_usage_chunk {
                            return self.deliver(chunk);
                        }
                        continue;
                    }
                    self.last_chunk = Some(chunk.clone());
                    let filtered = match prefiltered {
                        Some(filtered) => Ok(filtered),
                        None => self.filters.apply(chunk).await,
                    };
                    match filtered {
                        Ok(Filtered::Chunk(chunk)) => {
                            self.record.chunk_sent();
                            return self.deliver(chunk);
                        }
                        Ok(Filtered::Skip) => continue,
                        Ok(Filtered::Then(first, second)) => {
                            self.pending_chunk = Some(second);
                            self.record.chunk_sent();
                            return self.deliver(first);
                        }
                        Ok(Filtered::Stop(chunk)) => {
                            // The response ends here: release the upstream now and do not cache a partial answer.
                            self.source = Source::Cached {
                                chunks: CachedChunks::new(Vec::new()),
                                next: 0,
                            };
                            self.to_cache = None;
                            self.pending_done = true;
                            self.record.chunk_sent();
                            return self.deliver(chunk);
                        }
                        Err(err) => return self.fail(err.info()),
                    }
                }
                ResponseEvent::Error(info) => return self.fail(info),
                ResponseEvent::Done(continuations) => {
                    self.record.continuations = continuations;
                    match self.filters.finish(self.last_chunk.as_ref()).await {
                        Ok(Some(chunk)) => {
                            self.pending_done = true;
                            self.record.chunk_sent();
                            return self.deliver(chunk);
                        }
                        Ok(None) => return self.complete(),
                        Err(err) => return self.fail(err.info()),
                    }
                }
            }
        }
    }

    /// A chunk for the client. A replayed answer's chunks are renamed for
    /// this request, as vLLM would have named them: a client learns each
    /// request's id from its chunks' `id`, cached or not.
    fn deliver(&self, chunk: Chunk) -> Delivery {
        match self.replayed {
            true => Delivery::Chunk(chunk.naming(&self.record.request_id)),
            false => Delivery::Chunk(chunk),
        }
    }

    /// Reads the whole answer and assembles the route's JSON body from it.
    pub async fn answer(&mut self) -> Result<bytes::Bytes, ErrorInfo> {
        let mut assembler = crate::protocol::ResponseAssembler::new(self.record.route);
        loop {
            match self.next().await {
                Delivery::Chunk(chunk) => assembler.push_chunk(&chunk),
                Delivery::Error(info) => return Err(info),
                Delivery::Done => return Ok(assembler.finish_bytes()),
            }
        }
    }

    fn fail(&mut self, info: ErrorInfo) -> Delivery {
        self.finished = true;
        self.to_cache = None;
        self.record.status = info.status;
        Delivery::Error(info)
    }

    fn complete(&mut self) -> Delivery {
        self.finished = true;
        self.record.status = 200;
        if let (Some((key, raw)), Some(cache)) =
            (self.to_cache.take(), self.record.state.cache.clone())
            && !raw.is_empty()
        {
            let chunks = CachedChunks::new(raw);
            let metrics = self.record.state.cache_metrics.clone();
            tokio::spawn(async move {
                let result = match cache.put(&key, chunks).await {
                    Ok(()) => "stored",
                    Err(err) => {
                        tracing::debug!(%err, "could not store the response in the cache");
                        "failed"
                    }
                };
                metrics.stores.with_label_values(&[result]).inc();
            });
        }
        Delivery::Done
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.record.state.metrics.active_streams.dec();
        self.delivery
            .set("chunks", saturating_i64(self.record.chunks_sent));
        let outcome = match (self.finished, self.record.status) {
            (false, _) => "client_closed",
            (true, 200) => "completed",
            (true, _) => "failed",
        };
        self.delivery.set("outcome", outcome);
    }
}
