//! JSON log lines in `tracing-subscriber`'s JSON shape (`timestamp`, `level`,
//! `fields`, `target`, `span`), written straight into one buffer.
//!
//! Why not the stock JSON formatter (or `json-subscriber`): both build each
//! line through `serde_json::Value`s and `fmt::Write` adaptors, which made
//! the request log line the largest single cost of a cache hit (see
//! `docs/benchmarks.md`). This formatter writes each field once (numbers and
//! string escaping still go through serde_json) and splices in the span's
//! fields, which `tracing-subscriber`'s `JsonFields` formatted once when the
//! span was created. A test checks its lines against the stock formatter's.

use std::fmt;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter for `log.format = "json"`; span fields come from [`JsonFields`].
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Vec::with_capacity(512);
        let now = chrono::Utc::now();
        let _ = write!(
            line,
            r#"{{"timestamp":"{}","level":"{}","fields":{{"#,
            now.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
            meta.level()
        );
        event.record(&mut FieldWriter {
            line: &mut line,
            first: true,
        });
        line.extend_from_slice(br#"},"target":"#);
        push_str(&mut line, meta.target());
        let span = match event.parent() {
            Some(id) => ctx.span(id),
            None if event.is_contextual() => ctx.lookup_current(),
            None => None,
        };
        if let Some(span) = span {
            line.extend_from_slice(br#","span":{"#);
            let extensions = span.extensions();
            // The span's fields, formatted as a JSON object when it was created.
            if let Some(fields) = extensions
                .get::<FormattedFields<JsonFields>>()
                .and_then(|f| f.fields.strip_prefix('{')?.strip_suffix('}'))
                .filter(|f| !f.is_empty())
            {
                line.extend_from_slice(fields.as_bytes());
                line.push(b',');
            }
            line.extend_from_slice(br#""name":"#);
            push_str(&mut line, span.name());
            line.push(b'}');
        }
        line.extend_from_slice(b"}\n");
        writer.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
    }
}

/// Appends `value` as a JSON string (escaped as serde_json, and the stock
/// formatter, escape it).
fn push_str(line: &mut Vec<u8>, value: &str) {
    let _ = serde_json::to_writer(line, value);
}

/// Appends `value` as a JSON number or boolean.
fn push_json<T: serde::Serialize>(line: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(line, value);
}

/// Writes an event's fields as JSON members.
struct FieldWriter<'a> {
    line: &'a mut Vec<u8>,
    first: bool,
}

impl FieldWriter<'_> {
    fn key(&mut self, field: &Field) {
        if !self.first {
            self.line.push(b',');
        }
        self.first = false;
        push_str(self.line, field.name());
        self.line.push(b':');
    }
}

impl Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_str(self.line, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        push_json(self.line, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        push_json(self.line, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        push_json(self.line, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        push_json(self.line, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        push_str(self.line, &format!("{value:?}"));
    }
}

/// The JSON log layer: [`JsonLines`] for events, `JsonFields` for span fields.
pub fn layer<S, W>(writer: W) -> tracing_subscriber::fmt::Layer<S, JsonFields, JsonLines, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(JsonLines)
        .with_writer(writer)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    /// A log writer for tests: what was written, shared with the test.
    #[derive(Clone, Default)]
    pub(crate) struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Buffer {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(buffer: &Buffer) -> Vec<serde_json::Value> {
        buffer
            .text()
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }

    #[test]
    fn lines_match_the_stock_json_formatter_but_for_the_timestamp() {
        let (ours, stock) = (Buffer::default(), Buffer::default());
        let (a, b) = (ours.clone(), stock.clone());
        let subscriber = tracing_subscriber::registry()
            .with(super::layer(move || a.clone()))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(move || b.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(n = 1_u64, "outside any span");
            let span = tracing::info_span!("request", request_id = "r-1", attempt = 2_i64);
            span.in_scope(|| {
                tracing::warn!(
                    text = "quotes \" back\\slash \n newline \u{1} control é",
                    negative = -5_i64,
                    ratio = 0.25_f64,
                    whole = 3.0_f64,
                    flag = true,
                    debug = ?vec![1, 2],
                    "inside {}", "a span"
                );
            });
            let empty = tracing::info_span!("empty");
            empty.in_scope(|| tracing::info!("no span fields"));
        });
        let (ours, stock) = (lines(&ours), lines(&stock));
        assert_eq!(ours.len(), 3);
        assert_eq!(ours.len(), stock.len());
        for (mut ours, mut stock) in ours.into_iter().zip(stock) {
            let timestamp = ours["timestamp"].take();
            assert!(
                chrono::DateTime::parse_from_rfc3339(timestamp.as_str().unwrap()).is_ok(),
                "{timestamp}"
            );
            stock["timestamp"].take();
            assert_eq!(ours, stock);
        }
    }
}
