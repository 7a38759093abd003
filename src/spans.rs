//! Trace spans as sluice records them, and the queue they wait in for export.
//!
//! A span is a [`Recording`]: a clock read, a random id and a vector of
//! attributes, moved into the [`SpanQueue`] when it ends and encoded by the
//! export thread ([`crate::otlp`]). A request's root span is owned by its
//! [`crate::telemetry::RequestTrace`]; its stages (auth, cache lookup, plugin
//! hooks, queue submission, stream delivery) are [`StageSpan`]s, which know
//! their parent and end when dropped.
//!
//! Why not `tracing-opentelemetry`: it keeps OpenTelemetry data beside every
//! `tracing` span, builds an SDK span when each one closes, and goes through
//! the subscriber's registry for every attribute set. Measured here
//! (callgrind, per cache hit with four spans), that took 35,000-40,000
//! instructions, and tracing every request cost 16 % of cache-hit
//! throughput; see the README's benchmark section for what it costs now.

use std::borrow::Cow;
use std::cell::RefCell;
use std::num::{NonZeroU64, NonZeroU128};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use smallvec::SmallVec;

/// What identifies a span across processes: what `traceparent` (and
/// `tracestate`) carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The W3C `tracestate` of the trace, passed on unchanged.
    pub trace_state: Option<Arc<str>>,
}

impl SpanContext {
    /// The context of a new span in this trace.
    fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            trace_state: self.trace_state.clone(),
        }
    }

    /// The headers that continue the trace from this span elsewhere (sampled).
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut traceparent = String::with_capacity(55);
        traceparent.push_str("00-");
        traceparent.push_str(&hex::encode(self.trace_id));
        traceparent.push('-');
        traceparent.push_str(&hex::encode(self.span_id));
        traceparent.push_str("-01");
        let mut headers = vec![("traceparent".to_string(), traceparent)];
        if let Some(state) = &self.trace_state {
            headers.push(("tracestate".to_string(), state.to_string()));
        }
        headers
    }
}

thread_local! {
    /// Ids need to be unique, not secret: a small, fast generator per thread
    /// (as the OpenTelemetry SDK's), seeded from the thread's secure one.
    static ID_RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// A random, non-zero trace id.
pub fn new_trace_id() -> [u8; 16] {
    ID_RNG
        .with_borrow_mut(|rng| rng.random::<NonZeroU128>())
        .get()
        .to_be_bytes()
}

/// A random, non-zero span id.
pub fn new_span_id() -> [u8; 8] {
    ID_RNG
        .with_borrow_mut(|rng| rng.random::<NonZeroU64>())
        .get()
        .to_be_bytes()
}

/// OpenTelemetry's span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(Cow<'static, str>),
    I64(i64),
    F64(f64),
    Bool(bool),
}

impl From<&'static str> for AttrValue {
    fn from(value: &'static str) -> Self {
        Self::Str(Cow::Borrowed(value))
    }
}

impl From<String> for AttrValue {
    fn from(value: String) -> Self {
        Self::Str(Cow::Owned(value))
    }
}

impl From<i64> for AttrValue {
    fn from(value: i64) -> Self {
        Self::I64(value)
    }
}

impl From<u64> for AttrValue {
    fn from(value: u64) -> Self {
        Self::I64(i64::try_from(value).unwrap_or(i64::MAX))
    }
}

impl From<f64> for AttrValue {
    fn from(value: f64) -> Self {
        Self::F64(value)
    }
}

impl From<bool> for AttrValue {
    fn from(value: bool) -> Self {
        Self::Bool(value)
    }
}

/// Attribute keys are literals: never allocated. Stage spans have one or
/// two attributes, kept inline; a root span's spill to the heap.
pub type Attributes = SmallVec<[(&'static str, AttrValue); 2]>;

/// A span, being recorded or finished (then `end_unix_nanos` is set).
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub context: SpanContext,
    /// `None` for the root of a trace.
    pub parent_span_id: Option<[u8; 8]>,
    /// Whether the parent is in another process (the client, or the edge for a worker).
    pub parent_is_remote: bool,
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Attributes,
    /// The status: unset, or an error with its description.
    pub error: Option<String>,
}

impl Recording {
    /// A span starting now with `context`, a child of `parent` (`None` for a
    /// trace's root) in this process unless `parent_is_remote`.
    pub fn start(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        context: SpanContext,
        parent_span_id: Option<[u8; 8]>,
        parent_is_remote: bool,
    ) -> Self {
        Self {
            context,
            parent_span_id,
            parent_is_remote,
            name: name.into(),
            kind,
            start_unix_nanos: now_unix_nanos(),
            end_unix_nanos: 0,
            attributes: SmallVec::new(),
            error: None,
        }
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        self.attributes.push((key, value.into()));
    }

    /// Marks the span as failed.
    pub fn fail(&mut self, description: impl Into<String>) {
        self.error = Some(description.into());
    }

    /// Ends the span now and queues it for export.
    pub fn end(mut self) {
        self.end_unix_nanos = now_unix_nanos();
        if let Some(queue) = QUEUE.get() {
            queue.push(self);
        }
    }
}

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A stage of a request: a span when the request is sampled, nothing (and
/// no cost) otherwise. It ends when dropped.
#[derive(Debug)]
pub struct StageSpan(Option<Box<Recording>>);

impl StageSpan {
    /// A span that records nothing.
    pub fn none() -> Self {
        Self(None)
    }

    /// A span named `name`, a child of `parent`; nothing when `parent` is
    /// `None` (the request is not sampled).
    pub fn child_of(parent: Option<&SpanContext>, name: &'static str) -> Self {
        Self(parent.map(|parent| {
            Box::new(Recording::start(
                name,
                SpanKind::Internal,
                parent.child(),
                Some(parent.span_id),
                false,
            ))
        }))
    }

    pub fn with_kind(mut self, kind: SpanKind) -> Self {
        if let Some(recording) = &mut self.0 {
            recording.kind = kind;
        }
        self
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        if let Some(recording) = &mut self.0 {
            recording.set(key, value);
        }
    }

    /// Sets an attribute whose value is only computed when the span records.
    pub fn set_with<V: Into<AttrValue>>(&mut self, key: &'static str, value: impl FnOnce() -> V) {
        if let Some(recording) = &mut self.0 {
            recording.set(key, value());
        }
    }

    /// This span's context, when it records.
    pub fn context(&self) -> Option<&SpanContext> {
        self.0.as_ref().map(|recording| &recording.context)
    }

    /// Runs `future` inside this span: the span ends when it completes.
    pub async fn during<F: Future>(self, future: F) -> F::Output {
        let output = future.await;
        drop(self);
        output
    }
}

impl Drop for StageSpan {
    fn drop(&mut self) {
        if let Some(recording) = self.0.take() {
            Recording::end(*recording);
        }
    }
}

/// Where finished spans wait for the export thread. Bounded: when the
/// exporter falls behind, new spans are dropped (and counted), never queued
/// without limit and never waited for.
#[derive(Debug)]
pub struct SpanQueue {
    pending: Mutex<Pending>,
    /// Wakes the export thread: a full batch, a flush, or shutdown.
    wake: Condvar,
    /// Wakes `flush` callers once their spans are exported.
    flushed: Condvar,
    capacity: usize,
    batch: usize,
}

#[derive(Debug, Default)]
struct Pending {
    spans: Vec<Recording>,
    dropped: u64,
    flushes_requested: u64,
    flushes_done: u64,
    closed: bool,
}

/// What one export round took from the queue.
pub struct Drained {
    /// Spans to export; hand the emptied vector back with [`SpanQueue::wait`].
    pub spans: Vec<Recording>,
    /// Spans dropped since the last round because the queue was full.
    pub dropped: u64,
    flush: u64,
    pub closed: bool,
}

/// The process's queue, set up with trace export.
static QUEUE: OnceLock<Arc<SpanQueue>> = OnceLock::new();

impl SpanQueue {
    /// A queue holding at most `capacity` spans, whose exporter is woken
    /// when `batch` are waiting.
    pub fn new(capacity: usize, batch: usize) -> Self {
        Self {
            pending: Mutex::new(Pending {
                spans: Vec::with_capacity(batch),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            capacity: capacity.max(1),
            batch: batch.clamp(1, capacity.max(1)),
        }
    }

    /// Makes `queue` the process's span queue; false if one is set already.
    pub fn install(queue: Arc<SpanQueue>) -> bool {
        QUEUE.set(queue).is_ok()
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, span: Recording) {
        let mut pending = self.lock();
        if pending.closed {
            return;
        }
        if pending.spans.len() >= self.capacity {
            pending.dropped += 1;
            return;
        }
        pending.spans.push(span);
        let full = pending.spans.len() == self.batch;
        drop(pending);
        if full {
            self.wake.notify_one();
        }
    }

    /// For the export thread: waits until a batch is ready, a flush is asked
    /// for, the queue closes or `delay` has passed, then takes what is
    /// waiting, leaving `spare` (emptied) in its place.
    pub fn wait(&self, delay: Duration, mut spare: Vec<Recording>) -> Drained {
        spare.clear();
        let deadline = Instant::now() + delay;
        let mut pending = self.lock();
        loop {
            let now = Instant::now();
            if pending.spans.len() >= self.batch
                || pending.flushes_requested > pending.flushes_done
                || pending.closed
                || now >= deadline
            {
                break;
            }
            pending = self
                .wake
                .wait_timeout(pending, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Drained {
            spans: std::mem::replace(&mut pending.spans, spare),
            dropped: std::mem::take(&mut pending.dropped),
            flush: pending.flushes_requested,
            closed: pending.closed,
        }
    }

    /// For the export thread: the spans of `drained` are exported.
    pub fn exported(&self, drained: &Drained) {
        let mut pending = self.lock();
        if drained.flush > pending.flushes_done {
            pending.flushes_done = drained.flush;
            drop(pending);
            self.flushed.notify_all();
        }
    }

    /// The largest batch the exporter should send at once.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Waits (up to `timeout`) until every span queued before the call is exported.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut pending = self.lock();
        if pending.closed {
            return;
        }
        pending.flushes_requested += 1;
        let ticket = pending.flushes_requested;
        self.wake.notify_one();
        while pending.flushes_done < ticket && !pending.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            pending = self
                .flushed
                .wait_timeout(pending, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Stops taking spans; the export thread sends what is left and stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
        self.flushed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &'static str) -> Recording {
        let root = SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            trace_state: None,
        };
        Recording::start(name, SpanKind::Internal, root, None, false)
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let queue = SpanQueue::new(3, 2);
        for _ in 0..5 {
            queue.push(span("s"));
        }
        let drained = queue.wait(Duration::ZERO, Vec::new());
        assert_eq!(drained.spans.len(), 3);
        assert_eq!(drained.dropped, 2);
        queue.push(span("t"));
        let again = queue.wait(Duration::ZERO, drained.spans);
        assert_eq!(again.spans.len(), 1);
        assert_eq!(again.dropped, 0);
    }

    #[test]
    fn a_batch_wakes_the_exporter_before_its_delay() {
        let queue = Arc::new(SpanQueue::new(100, 2));
        let exporter = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.wait(Duration::from_secs(60), Vec::new()))
        };
        queue.push(span("a"));
        queue.push(span("b"));
        let drained = exporter.join().unwrap();
        assert_eq!(drained.spans.len(), 2);
    }

    #[test]
    fn flush_returns_once_the_spans_are_exported() {
        let queue = Arc::new(SpanQueue::new(100, 50));
        queue.push(span("a"));
        let exporter = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let drained = queue.wait(Duration::from_secs(60), Vec::new());
                let names: Vec<_> = drained.spans.iter().map(|s| s.name.clone()).collect();
                queue.exported(&drained);
                names
            })
        };
        queue.flush(Duration::from_secs(60));
        assert_eq!(exporter.join().unwrap(), vec!["a"]);
    }

    #[test]
    fn stage_spans_are_children_in_the_same_trace() {
        let parent = SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            trace_state: Some("vendor=v1".into()),
        };
        let mut stage = StageSpan::child_of(Some(&parent), "cache.lookup");
        stage.set("result", "hit");
        let recording = stage.0.as_ref().unwrap();
        assert_eq!(recording.context.trace_id, parent.trace_id);
        assert_ne!(recording.context.span_id, parent.span_id);
        assert_eq!(recording.parent_span_id, Some(parent.span_id));
        assert_eq!(
            recording.attributes.as_slice(),
            [("result", AttrValue::from("hit"))]
        );
        let headers = stage.context().unwrap().headers();
        assert_eq!(
            headers[0].1,
            format!(
                "00-{}-{}-01",
                hex::encode(parent.trace_id),
                hex::encode(recording.context.span_id)
            )
        );
        assert_eq!(headers[1], ("tracestate".into(), "vendor=v1".into()));

        let mut unsampled = StageSpan::child_of(None, "cache.lookup");
        unsampled.set_with("result", || -> &'static str { unreachable!() });
        assert!(unsampled.context().is_none());
    }
}
