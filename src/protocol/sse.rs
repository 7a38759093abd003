//! An incremental parser for `text/event-stream` bodies, as vLLM sends them.
//!
//! Feed it the body as it arrives, in whatever pieces TCP delivers; it yields
//! each event's `data` once the event's blank line has arrived. Events split
//! across reads, several events in one read, CRLF line endings, comments and
//! multi-line data are all handled. A single-line `data: ...` event — every
//! event vLLM sends — is returned without copying.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::protocol::Chunk;

/// One server-sent event's `data` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event as a framed chunk (`data: <payload>\n\n`).
    pub chunk: Chunk,
}

/// The payload of Anthropic's last event: the end of a Messages stream, as
/// `[DONE]` ends an OpenAI one (an edge sends it back at the end).
pub const MESSAGE_STOP: &[u8] = br#"{"type":"message_stop"}"#;

impl SseEvent {
    /// Whether the event ends the stream: `[DONE]`, or Anthropic's `message_stop`.
    pub fn is_done(&self) -> bool {
        let payload = self.chunk.payload_slice();
        payload == b"[DONE]" || payload == MESSAGE_STOP
    }
}

#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    /// How far `buf` has been scanned for the end of the current event.
    scanned: usize,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.put_slice(bytes);
    }

    /// Bytes received but not yet part of a complete event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event carrying data, if one has fully arrived.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.find_event_end()?;
            let block = self.buf.split_to(end.block_len).freeze();
            self.scanned = 0;
            if let Some(event) = Self::parse_block(block, end.content_len) {
                return Some(event);
            }
        }
    }

    /// Finds the blank line that ends the next event. Returns the length of the
    /// block including its terminating blank line, and the length of its content.
    fn find_event_end(&mut self) -> Option<EventEnd> {
        let buf = &self.buf[..];
        let mut i = self.scanned;
        while let Some(offset) = memchr::memchr2(b'\n', b'\r', &buf[i..]) {
            let line_end = i + offset;
            let after = line_terminator_len(buf, line_end)?;
            let next = line_end + after;
            // A terminator directly followed by another terminator is a blank line.
            match buf.get(next) {
                None => {
                    self.scanned = line_end;
                    return None;
                }
                Some(b'\n') | Some(b'\r') => {
                    let blank = line_terminator_len(buf, next)?;
                    return Some(EventEnd {
                        block_len: next + blank,
                        content_len: line_end,
                    });
                }
                Some(_) => i = next,
            }
        }
        self.scanned = buf.len();
        None
    }

    fn parse_block(block: Bytes, content_len: usize) -> Option<SseEvent> {
        // Fast path: exactly `data: <payload>\n\n`.
        if let Some(chunk) = Chunk::from_framed(block.clone()) {
            let payload = chunk.payload_slice();
            if !payload.contains(&b'\n') && !payload.contains(&b'\r') {
                return Some(SseEvent { chunk });
            }
        }
        let mut content = block.slice(..content_len);
        let mut data: Option<BytesMut> = None;
        while !content.is_empty() {
            let line_len = memchr::memchr2(b'\n', b'\r', &content).unwrap_or(content.len());
            let line = content.slice(..line_len);
            let terminator = if content.get(line_len) == Some(&b'\r')
                && content.get(line_len + 1) == Some(&b'\n')
            {
                2
            } else {
                usize::from(line_len < content.len())
            };
            content.advance(line_len + terminator);
            if line.is_empty() || line.starts_with(b":") {
                continue;
            }
            let (field, value) = match memchr::memchr(b':', &line) {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (&line[..], &b""[..]),
            };
            if field == b"data" {
                let data = data.get_or_insert_with(BytesMut::new);
                if !data.is_empty() {
                    data.put_u8(b'\n');
                }
                data.put_slice(value);
            }
        }
        data.map(|payload| SseEvent {
            chunk: Chunk::from_payload(&payload),
        })
    }
}

struct EventEnd {
    block_len: usize,
    content_len: usize,
}

/// Length of the line terminator at `at` (1 or 2), or `None` when a trailing
/// `\r` might still be followed by `\n` in data not yet received.
fn line_terminator_len(buf: &[u8], at: usize) -> Option<usize> {
    match buf[at] {
        b'\r' => match buf.get(at + 1) {
            Some(b'\n') => Some(2),
            Some(_) => Some(1),
            None => None,
        },
        _ => Some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(parser: &mut SseParser, input: &[u8]) -> Vec<String> {
        parser.push(input);
        std::iter::from_fn(|| parser.next_event())
            .map(|e| String::from_utf8(e.chunk.payload().to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn several_events_in_one_read() {
        let mut p = SseParser::new();
        let events = feed(
            &mut p,
            b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(events, vec!["{\"a\":1}", "{\"b\":2}", "[DONE]"]);
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn events_split_at_every_byte() {
        let input = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":2}\r\n\r\ndata: [DONE]\n\n";
        let mut p = SseParser::new();
        let mut events = Vec::new();
        for byte in input.iter() {
            events.extend(feed(&mut p, std::slice::from_ref(byte)));
        }
        assert_eq!(events, vec!["{\"a\":1}", "{\"b\":2}", "[DONE]"]);
    }

    #[test]
    fn multi_line_data_and_other_fields() {
        let mut p = SseParser::new();
        let events = feed(
            &mut p,
            b"event: message\nid: 3\ndata: line1\ndata:line2\n\n",
        );
        assert_eq!(events, vec!["line1\nline2"]);
    }

    #[test]
    fn incomplete_event_waits_for_its_blank_line() {
        let mut p = SseParser::new();
        assert!(feed(&mut p, b"data: {\"a\":1}\n").is_empty());
        assert!(feed(&mut p, b"\r").is_empty());
        assert_eq!(feed(&mut p, b"\n"), vec!["{\"a\":1}"]);
    }

    #[test]
    fn single_line_events_are_not_copied() {
        let mut p = SseParser::new();
        p.push(b"data: {\"a\":1}\n\n");
        let event = p.next_event().unwrap();
        assert_eq!(event.chunk.framed().as_ref(), b"data: {\"a\":1}\n\n");
        assert!(!event.is_done());
    }
}
