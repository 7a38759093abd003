//! One upstream stream chunk as the exact SSE bytes the upstream sent, and
//! the views the gateway reads from it (text, finish reason, usage) without
//! re-serialising it.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize};

const SSE_PREFIX: &[u8] = b"data: ";
const SSE_SUFFIX: &[u8] = b"\n\n";

/// One upstream stream chunk, held as the SSE event bytes `data: <json>\n\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    framed: Bytes,
}

impl Chunk {
    /// Frames a JSON payload as an SSE `data:` event.
    pub fn from_payload(payload: &[u8]) -> Self {
        let mut framed =
            BytesMut::with_capacity(payload.len() + SSE_PREFIX.len() + SSE_SUFFIX.len());
        framed.put_slice(SSE_PREFIX);
        framed.put_slice(payload);
        framed.put_slice(SSE_SUFFIX);
        Self {
            framed: framed.freeze(),
        }
    }

    /// Frames a whole JSON answer (a route answered with one body) as one
    /// event. Line breaks in valid JSON can only be whitespace (a string
    /// escapes them), so they are dropped to keep the event one line.
    pub fn from_json_body(body: &[u8]) -> Self {
        if memchr::memchr2(b'\n', b'\r', body).is_none() {
            return Self::from_payload(body);
        }
        let compact: Vec<u8> = body
            .iter()
            .copied()
            .filter(|&b| b != b'\n' && b != b'\r')
            .collect();
        Self::from_payload(&compact)
    }

    /// Wraps bytes that are already exactly `data: <payload>\n\n`.
    pub fn from_framed(framed: Bytes) -> Option<Self> {
        (framed.len() >= SSE_PREFIX.len() + SSE_SUFFIX.len()
            && framed.starts_with(SSE_PREFIX)
            && framed.ends_with(SSE_SUFFIX))
        .then_some(Self { framed })
    }

    /// The SSE event, ready to write to a client.
    pub fn framed(&self) -> &Bytes {
        &self.framed
    }

    /// The JSON payload (what a WebSocket frame carries).
    pub fn payload(&self) -> Bytes {
        self.framed
            .slice(SSE_PREFIX.len()..self.framed.len() - SSE_SUFFIX.len())
    }

    pub fn payload_slice(&self) -> &[u8] {
        &self.framed[SSE_PREFIX.len()..self.framed.len() - SSE_SUFFIX.len()]
    }

    /// This chunk with its response `id` naming `request_id`, as vLLM names
    /// the chunks of its answer to `X-Request-Id: <request_id>`
    /// (`cmpl-<request_id>`; the prefix up to the first `-` is kept).
    /// Unchanged when the payload does not begin with an `"id"` (or, in an
    /// Anthropic `message_start`, its message's).
    pub fn naming(&self, request_id: &str) -> Chunk {
        const OPENAI: &[u8] = b"{\"id\":\"";
        const ANTHROPIC: &[u8] = b"{\"type\":\"message_start\",\"message\":{\"id\":\"";
        let payload = self.payload_slice();
        let Some(key_end) = [OPENAI, ANTHROPIC]
            .into_iter()
            .find(|prefix| payload.starts_with(prefix))
            .map(<[u8]>::len)
        else {
            return self.clone();
        };
        let start = SSE_PREFIX.len() + key_end;
        let Some(len) = memchr::memchr(b'"', &self.framed[start..]) else {
            return self.clone();
        };
        let id = &self.framed[start..start + len];
        let keep = id
            .iter()
            .position(|&b| b == b'-')
            .map_or(0, |dash| dash + 1);
        if &id[keep..] == request_id.as_bytes() {
            return self.clone();
        }
        let mut framed =
            BytesMut::with_capacity(self.framed.len() - (len - keep) + request_id.len());
        framed.put_slice(&self.framed[..start + keep]);
        framed.put_slice(request_id.as_bytes());
        framed.put_slice(&self.framed[start + len..]);
        Chunk {
            framed: framed.freeze(),
        }
    }

    /// Reads what the gateway needs to know about a chunk without keeping it parsed.
    pub fn summary(&self) -> ChunkSummary {
        ChunkView::parse(self).map_or_else(ChunkSummary::default, |view| view.summary())
    }

    /// The summary of a whole JSON answer (a route answered with one body):
    /// its usage, found from the end, where vLLM writes it, without parsing
    /// the vectors or documents before it. Falls back to a full parse when
    /// the key is not written compactly.
    pub fn whole_summary(&self) -> ChunkSummary {
        let payload = self.payload_slice();
        // Most events of the typed APIs (a Messages or Responses text delta)
        // carry neither usage nor choices: nothing to parse.
        let holds = |key: &[u8]| memchr::memmem::find(payload, key).is_some();
        if !holds(b"\"usage\"") && !holds(b"\"meta\"") && !holds(b"\"choices\"") {
            return ChunkSummary::default();
        }
        let usage = value_after::<Usage>(payload, b"\"usage\":").or_else(|| {
            value_after::<CohereMeta>(payload, b"\"meta\":").and_then(CohereMeta::usage)
        });
        match usage {
            Some(usage) => ChunkSummary {
                choices: 0,
                outputs: 0,
                usage: Some(usage),
            },
            None => self.summary(),
        }
    }
}

/// The parts of a chunk the token filters need, borrowed from its bytes
/// (or owned, [`ChunkView::into_owned`], to keep alongside a cached answer).
#[derive(Debug, Clone, Deserialize)]
pub struct ChunkView<'a> {
    #[serde(borrow, default)]
    pub choices: Vec<ChoiceView<'a>>,
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Cohere's embed answer (`/v2/embed`) counts its tokens here, not in `usage`.
    #[serde(default)]
    meta: Option<CohereMeta>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct CohereMeta {
    #[serde(default)]
    billed_units: Option<BilledUnits>,
}

impl CohereMeta {
    fn usage(self) -> Option<Usage> {
        let billed = self.billed_units?;
        let tokens = billed.input_tokens + billed.image_tokens;
        Some(Usage {
            prompt_tokens: tokens,
            completion_tokens: 0,
            total_tokens: tokens,
        })
    }
}

/// The JSON value after the last `key` in `payload`. In valid JSON the key's
/// quotes cannot occur unescaped inside a string, so the last match is the
/// last member of that name.
fn value_after<T: de::DeserializeOwned>(payload: &[u8], key: &[u8]) -> Option<T> {
    let at = memchr::memmem::rfind(payload, key)? + key.len();
    serde_json::Deserializer::from_slice(&payload[at..])
        .into_iter::<T>()
        .next()?
        .ok()
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct BilledUnits {
    #[serde(default, deserialize_with = "null_as_zero")]
    input_tokens: u64,
    #[serde(default, deserialize_with = "null_as_zero")]
    image_tokens: u64,
}

/// One choice of a chunk: a completion's `text`, or a chat chunk's `delta`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChoiceView<'a> {
    #[serde(default)]
    pub index: u32,
    #[serde(borrow, default, deserialize_with = "text_or_null")]
    text: Cow<'a, str>,
    #[serde(borrow, default)]
    delta: Option<DeltaView<'a>>,
    #[serde(default)]
    pub finish_reason: Option<IgnoredAny>,
}

/// The part of a chat delta token filters see: its `content`. Tool-call
/// deltas are not text and pass untouched.
#[derive(Debug, Clone, Deserialize)]
struct DeltaView<'a> {
    #[serde(borrow, default, deserialize_with = "text_or_null")]
    content: Cow<'a, str>,
    /// Present on a piece of a tool call (output, though not text).
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

impl ChoiceView<'_> {
    /// The text of the choice: a completion's `text`, a chat delta's `content`.
    pub fn text(&self) -> &str {
        match &self.delta {
            Some(delta) => &delta.content,
            None => &self.text,
        }
    }

    /// Whether the choice carries output: text, or a piece of a tool call
    /// (a role chunk or a finish chunk carries none).
    pub fn has_output(&self) -> bool {
        !self.text().is_empty() || self.delta.as_ref().is_some_and(|d| d.tool_calls.is_some())
    }

    fn into_owned(self) -> ChoiceView<'static> {
        ChoiceView {
            index: self.index,
            text: Cow::Owned(self.text.into_owned()),
            delta: self.delta.map(|d| DeltaView {
                content: Cow::Owned(d.content.into_owned()),
                tool_calls: d.tool_calls,
            }),
            finish_reason: self.finish_reason,
        }
    }
}

/// A string borrowed from the input when it has no escapes; `null` reads as "".
fn text_or_null<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Cow<'a, str>, D::Error> {
    struct Text;
    impl<'de> de::Visitor<'de> for Text {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(""))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(""))
        }
    }
    deserializer.deserialize_any(Text)
}

impl<'a> ChunkView<'a> {
    /// `None` for a payload that is not a JSON object of this shape.
    pub fn parse(chunk: &'a Chunk) -> Option<Self> {
        serde_json::from_slice(chunk.payload_slice()).ok()
    }

    pub fn into_owned(self) -> ChunkView<'static> {
        ChunkView {
            choices: self
                .choices
                .into_iter()
                .map(ChoiceView::into_owned)
                .collect(),
            usage: self.usage,
            meta: self.meta,
        }
    }

    pub fn summary(&self) -> ChunkSummary {
        ChunkSummary {
            choices: self.choices.len(),
            outputs: self.choices.iter().filter(|c| c.has_output()).count(),
            usage: self.usage.or_else(|| self.meta?.usage()),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkSummary {
    pub choices: usize,
    /// Choices that carry output (text or a tool-call piece): about a
    /// token each, what is counted when the upstream sends no usage.
    pub outputs: usize,
    pub usage: Option<Usage>,
}

impl ChunkSummary {
    /// The final `choices: []` chunk that carries only `usage`.
    pub fn is_usage_only(&self) -> bool {
        self.choices == 0 && self.usage.is_some()
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// `input_tokens` in Anthropic's usage.
    #[serde(default, alias = "input_tokens", deserialize_with = "null_as_zero")]
    pub prompt_tokens: u64,
    /// `output_tokens` in Anthropic's usage.
    #[serde(default, alias = "output_tokens", deserialize_with = "null_as_zero")]
    pub completion_tokens: u64,
    #[serde(default, deserialize_with = "null_as_zero")]
    pub total_tokens: u64,
}

/// vLLM writes `null` for counts that do not apply (`completion_tokens` of
/// an embedding, in some versions).
fn null_as_zero<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(deserializer)?.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_json_answer_is_one_event_and_its_usage_is_read() {
        let cohere = Chunk::from_json_body(
            br#"{"id":"embd-1","embeddings":{"float":[[0.1]]},"meta":{"api_version":{"version":"2"},"billed_units":{"input_tokens":7,"image_tokens":null}}}"#,
        );
        let usage = cohere.summary().usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.total_tokens), (7, 7));
        // Pretty-printed, with a null count: one line, usage still read.
        let pretty = Chunk::from_json_body(
            b"{\n  \"id\": \"embd-2\",\n  \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": null}\n}",
        );
        assert!(!pretty.payload_slice().contains(&b'\n'));
        assert_eq!(pretty.summary().usage.unwrap().prompt_tokens, 3);
        for answer in [&cohere, &pretty] {
            assert_eq!(answer.whole_summary().usage, answer.summary().usage);
        }
        // A document that quotes the key does not fool the search from the end.
        let rerank = Chunk::from_json_body(
            br#"{"id":"score-1","usage":{"prompt_tokens":9,"total_tokens":9},"results":[{"document":{"text":"say \"usage\":{\"prompt_tokens\":1}"}}]}"#,
        );
        assert_eq!(rerank.whole_summary().usage.unwrap().prompt_tokens, 9);
    }

    #[test]
    fn a_chunk_can_be_renamed_for_another_request() {
        let chunk =
            Chunk::from_payload(br#"{"id":"cmpl-abc123","object":"text_completion","choices":[]}"#);
        let renamed = chunk.naming("r-42");
        assert_eq!(
            renamed.payload_slice(),
            br#"{"id":"cmpl-r-42","object":"text_completion","choices":[]}"#
        );
        assert_eq!(renamed.naming("r-42"), renamed, "already named");
        let no_id = Chunk::from_payload(br#"{"object":"text_completion","id":"x"}"#);
        assert_eq!(no_id.naming("r-42"), no_id);
        let start = Chunk::from_payload(
            br#"{"type":"message_start","message":{"id":"chatcmpl-old","content":[]}}"#,
        );
        assert_eq!(
            start.naming("r-42").payload_slice(),
            br#"{"type":"message_start","message":{"id":"chatcmpl-r-42","content":[]}}"#
        );
    }

    #[test]
    fn chunk_payload_and_framing_round_trip() {
        let chunk = Chunk::from_payload(br#"{"id":"x","choices":[]}"#);
        assert_eq!(
            chunk.framed().as_ref(),
            b"data: {\"id\":\"x\",\"choices\":[]}\n\n"
        );
        assert_eq!(chunk.payload().as_ref(), br#"{"id":"x","choices":[]}"#);
        assert_eq!(Chunk::from_framed(chunk.framed().clone()), Some(chunk));
    }
}
