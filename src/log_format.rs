//! JSON log lines, in the shape of `tracing-subscriber`'s JSON format
//! (`timestamp`, `level`, `fields`, `target`, `span`) but written straight
//! into one buffer. The stock formatter re-parses the span's fields and writes
//! through `fmt::Write` piece by piece: about 32,000 instructions per line,
//! most of what a cache hit's request log cost (measured with cachegrind).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter for `log.format = "json"`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Vec::with_capacity(512);
        line.extend_from_slice(b"{\"timestamp\":\"");
        push_timestamp(&mut line, std::time::SystemTime::now());
        line.extend_from_slice(b"\",\"level\":\"");
        line.extend_from_slice(meta.level().as_str().as_bytes());
        line.extend_from_slice(b"\",\"fields\":{");
        let mut fields = JsonFieldWriter {
            line: &mut line,
            first: true,
        };
        event.record(&mut fields);
        line.extend_from_slice(b"},\"target\":");
        push_json_str(&mut line, meta.target());
        let span = if event.is_root() {
            None
        } else if let Some(id) = event.parent() {
            ctx.span(id)
        } else {
            ctx.lookup_current()
        };
        if let Some(span) = span {
            line.extend_from_slice(b",\"span\":{");
            let extensions = span.extensions();
            // The span's fields, already formatted as a JSON object when it was created.
            let recorded = extensions
                .get::<FormattedFields<N>>()
                .map(|f| f.fields.as_str())
                .and_then(|f| f.strip_prefix('{')?.strip_suffix('}'))
                .filter(|f| !f.is_empty());
            if let Some(recorded) = recorded {
                line.extend_from_slice(recorded.as_bytes());
                line.push(b',');
            }
            line.extend_from_slice(b"\"name\":");
            push_json_str(&mut line, span.name());
            line.push(b'}');
        }
        line.extend_from_slice(b"}\n");
        writer.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
    }
}

/// Writes an event's or a span's fields as JSON members. Numbers go through
/// serde_json (itoa and ryu): `fmt` machinery costs several times more.
struct JsonFieldWriter<'a> {
    line: &'a mut Vec<u8>,
    first: bool,
}

impl JsonFieldWriter<'_> {
    fn key(&mut self, field: &Field) {
        if !self.first {
            self.line.push(b',');
        }
        self.first = false;
        push_json_str(self.line, field.name());
        self.line.push(b':');
    }

    fn number(&mut self, field: &Field, value: impl serde::Serialize) {
        self.key(field);
        // Writing a number to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.line, &value);
    }
}

impl Visit for JsonFieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(self.line, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.line
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json writes a non-finite number as `null`.
        self.number(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        use fmt::Write as _;
        self.key(field);
        self.line.push(b'"');
        let _ = write!(EscapingWriter(self.line), "{value:?}");
        self.line.push(b'"');
    }
}

/// The span-field formatter for `log.format = "json"`: a span's fields as one
/// JSON object, formatted once when the span is created (and merged when a
/// field is recorded later), which [`JsonLines`] copies into each line.
pub struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut object = Vec::with_capacity(64);
        object.push(b'{');
        fields.record(&mut JsonFieldWriter {
            line: &mut object,
            first: true,
        });
        object.push(b'}');
        writer.write_str(std::str::from_utf8(&object).map_err(|_| fmt::Error)?)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let Some(members) = current
            .fields
            .strip_prefix('{')
            .and_then(|f| f.strip_suffix('}'))
        else {
            return self.format_fields(current.as_writer(), fields);
        };
        let mut object = Vec::with_capacity(current.fields.len() + 64);
        object.push(b'{');
        object.extend_from_slice(members.as_bytes());
        fields.record(&mut JsonFieldWriter {
            first: members.is_empty(),
            line: &mut object,
        });
        object.push(b'}');
        current.fields = String::from_utf8(object).map_err(|_| fmt::Error)?;
        Ok(())
    }
}

/// Writes formatted text into a JSON string body, escaping as it goes (no
/// intermediate `String`).
struct EscapingWriter<'a>(&'a mut Vec<u8>);

impl fmt::Write for EscapingWriter<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let bytes = text.as_bytes();
        let mut start = 0;
        for (i, &byte) in bytes.iter().enumerate() {
            let escape: &[u8] = match byte {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"",
                _ => continue,
            };
            self.0.extend_from_slice(&bytes[start..i]);
            if escape.is_empty() {
                self.0
                    .extend_from_slice(format!("\\u{byte:04x}").as_bytes());
            } else {
                self.0.extend_from_slice(escape);
            }
            start = i + 1;
        }
        self.0.extend_from_slice(&bytes[start..]);
        Ok(())
    }
}

thread_local! {
    /// The last second formatted on this thread, as `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// `time` in RFC 3339 with microseconds, UTC (`2026-11-26T18:44:03.123456Z`).
/// The date and time of day are formatted once per second per thread.
fn push_timestamp(line: &mut Vec<u8>, time: std::time::SystemTime) {
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != seconds {
        let formatted = i64::try_from(seconds)
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string();
        match <[u8; 19]>::try_from(formatted.as_bytes()) {
            Ok(formatted) => {
                text = formatted;
                SECOND.set((seconds, text));
            }
            // Only years past 9999 are longer: clamped.
            Err(_) => text = *b"9999-12-31T23:59:59",
        }
    }
    line.extend_from_slice(&text);
    let mut micros = since_epoch.subsec_micros();
    let mut fraction = *b".000000Z";
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    line.extend_from_slice(&fraction);
}

fn push_json_str(line: &mut Vec<u8>, value: &str) {
    // Most strings in a log line (names, ids, models) need no escaping: test
    // that first, eight bytes at a time; serde_json's escaper looks up every byte.
    let bytes = value.as_bytes();
    if needs_escape(bytes) {
        // Writing a string to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *line, value);
    } else {
        line.reserve(bytes.len() + 2);
        line.push(b'"');
        line.extend_from_slice(bytes);
        line.push(b'"');
    }
}

/// Whether `bytes` hold a control character, `"` or `\` (what JSON escapes).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Whether any byte of `x` is below `n` (n <= 128), without a branch per byte.
    let any_below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0;
    let any_equal = |x: u64, b: u8| any_below(x ^ (ONES * u64::from(b)), 1);
    let (chunks, rest) = bytes.as_chunks::<8>();
    chunks.iter().any(|chunk| {
        let x = u64::from_le_bytes(*chunk);
        any_below(x, 0x20) | any_equal(x, b'"') | any_equal(x, b'\\')
    }) || rest.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON lines `emit` logs, through the log layer `telemetry::init`
    /// sets up with `log.level = spec`.
    fn logged(spec: &str, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry()
            .with(crate::telemetry::log_filter(spec))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .fmt_fields(JsonSpanFields)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, emit);
        let text = captured.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn lines_are_json_with_the_span_fields() {
        let text = logged("trace", || {
            let span =
                tracing::info_span!("request", request_id = "req-1", key = tracing::field::Empty);
            span.record("key", "k\"1");
            let _entered = span.enter();
            tracing::info!(status = 200u16, ttft_ms = 1.5, ok = true, key = "a \"quoted\"\nkey", shown = %"tab\there \u{1}\\", "request finished");
            tracing::warn!(parent: None, nan = f64::NAN, "outside");
        });
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2);
        let first = &lines[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["fields"]["message"], "request finished");
        assert_eq!(first["fields"]["status"], 200);
        assert_eq!(first["fields"]["ttft_ms"], 1.5);
        assert_eq!(first["fields"]["ok"], true);
        assert_eq!(first["fields"]["key"], "a \"quoted\"\nkey");
        assert_eq!(first["fields"]["shown"], "tab\there \u{1}\\");
        assert_eq!(first["span"]["request_id"], "req-1");
        assert_eq!(first["span"]["key"], "k\"1");
        assert_eq!(first["span"]["name"], "request");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[1]["fields"]["nan"], serde_json::Value::Null);
        assert!(lines[1].get("span").is_none());
    }

    #[test]
    fn the_level_decides_what_is_logged() {
        // A plain level (a `Targets` filter) and a span directive (`EnvFilter`).
        for (spec, expected) in [
            ("warn", vec!["warned"]),
            ("info", vec!["informed", "warned"]),
            ("info,[other]=debug", vec!["informed", "warned"]),
        ] {
            let text = logged(spec, || {
                let span = tracing::info_span!("request", request_id = "req-7");
                let _in_request = span.enter();
                tracing::debug!("debugged");
                tracing::info!("informed");
                tracing::warn!("warned");
            });
            let messages: Vec<String> = text
                .lines()
                .map(|line| {
                    let line: serde_json::Value = serde_json::from_str(line).unwrap();
                    line["fields"]["message"].as_str().unwrap().to_string()
                })
                .collect();
            assert_eq!(messages, expected, "{spec}");
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut samples: Vec<String> = [
            "",
            "plain-id_01",
            "sim-llama",
            "quote\" inside",
            "back\\slash",
            "é ü 漢字 🦀",
            "\u{7f}del",
            "a much longer string without anything to escape in it at all, 1234567890",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        samples.extend((0u8..0x20).map(|b| format!("x{}y", b as char)));
        // Every ASCII character (and two others), at every position of an
        // eight-byte chunk and of the remainder after it.
        for special in (0u8..0x80).map(char::from).chain(['é', '漢']) {
            for at in 0..12 {
                let mut sample: String = "abcdefghijkl".into();
                sample.replace_range(at..=at, special.encode_utf8(&mut [0; 4]));
                samples.push(sample);
            }
        }
        for sample in samples {
            let mut ours = Vec::new();
            push_json_str(&mut ours, &sample);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&sample).unwrap(),
                "{sample:?}"
            );
        }
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        let stamp = |nanos: u64| {
            let mut line = Vec::new();
            push_timestamp(
                &mut line,
                std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos),
            );
            String::from_utf8(line).unwrap()
        };
        assert_eq!(
            stamp(1_795_715_326_000_001_999),
            "2026-11-26T17:48:46.000001Z"
        );
        // The same second again (cached), then the next one.
        assert_eq!(
            stamp(1_795_715_326_999_999_000),
            "2026-11-26T17:48:46.999999Z"
        );
        assert_eq!(
            stamp(1_795_715_327_123_456_789),
            "2026-11-26T17:48:47.123456Z"
        );
        let now = std::time::SystemTime::now();
        let ours = stamp(
            now.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        let chrono = chrono::DateTime::<chrono::Utc>::from(now)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        assert_eq!(ours, chrono);
    }
}
