//! Rebuilding a chunk from what the filters answered: the chunk itself when
//! nothing changed, its text spliced in place when only the text did, a
//! re-serialised chunk otherwise.

use std::borrow::Cow;

use serde_json::Value;

use super::Filtered;
use crate::protocol::{Chunk, ChunkView};

/// One choice of a chunk after the filters.
pub(super) struct ChoiceOutput<'t> {
    pub(super) text: Cow<'t, str>,
    pub(super) finishing: bool,
    pub(super) stop: bool,
}

/// The chunk to send for `chunk` after filtering: the chunk itself when no
/// filter changed it (not re-serialised), nothing when all its text is held,
/// else a rebuilt chunk.
pub(super) fn assemble(
    chunk: &Chunk,
    view: &ChunkView<'_>,
    outputs: &[ChoiceOutput<'_>],
) -> Filtered {
    let changed = view
        .choices
        .iter()
        .zip(outputs)
        .any(|(choice, out)| out.stop || out.text != choice.text());
    if !changed {
        return Filtered::Chunk(chunk.clone());
    }
    if outputs
        .iter()
        .all(|out| out.text.is_empty() && !out.finishing && !out.stop)
        && !has_tool_calls(chunk.payload_slice())
    {
        return Filtered::Skip;
    }
    // The common case (one choice, new text): splice the text in place.
    if let ([choice], [out]) = (&view.choices[..], outputs)
        && !out.stop
        && let Some(payload) = splice_text(chunk.payload_slice(), choice.text(), &out.text)
    {
        return Filtered::Chunk(Chunk::from_payload(&payload));
    }
    let stopped = outputs.iter().any(|out| out.stop);
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(chunk.payload_slice()) else {
        return Filtered::Chunk(chunk.clone());
    };
    if let Some(Value::Array(choices)) = body.get_mut("choices") {
        for (choice, out) in choices.iter_mut().zip(outputs) {
            if let Value::Object(choice) = choice {
                set_text(choice, out.text.to_string());
                if out.stop {
                    choice.insert("finish_reason".into(), Value::from("stop"));
                }
            }
        }
    }
    let rebuilt = Chunk::from_payload(&serde_json::to_vec(&body).unwrap_or_default());
    if stopped {
        Filtered::Stop(rebuilt)
    } else {
        Filtered::Chunk(rebuilt)
    }
}

/// Whether a chunk may carry tool calls (a key `"tool_calls":`, which JSON
/// text cannot hold unescaped).
pub(super) fn has_tool_calls(payload: &[u8]) -> bool {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static TOOL_CALLS: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(b"\"tool_calls\":"));
    TOOL_CALLS.find(payload).is_some()
}

/// Sets a choice's text: a chat choice's `delta.content`, a completion's `text`.
fn set_text(choice: &mut serde_json::Map<String, Value>, text: String) {
    match choice.get_mut("delta") {
        Some(Value::Object(delta)) => {
            delta.insert("content".into(), Value::String(text));
        }
        _ => {
            choice.insert("text".into(), Value::String(text));
        }
    }
}

/// `payload` with the text of its only choice (a completion's `text`, a chat
/// delta's `content`) replaced by `new`, the rest of the bytes untouched (no
/// parse into a tree and re-serialisation). `None` when the text is not
/// where expected (it is then rebuilt the slow way).
fn splice_text(payload: &[u8], old: &str, new: &str) -> Option<Vec<u8>> {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    // Built once: building a searcher costs more than searching a chunk.
    static CHOICES: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\":"));
    static TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\":"));
    static DELTA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"delta\":"));
    static CONTENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"content\":"));
    let choices = CHOICES.find(payload)?;
    // An unescaped `"text":` (or `"content":` after `"delta":`) can only be a
    // key; the choice's own comes before its logprobs. Checked below anyway:
    // it must hold exactly `old`.
    let value = match DELTA.find(&payload[choices..]) {
        Some(delta) => {
            let delta = choices + delta;
            delta + CONTENT.find(&payload[delta..])? + CONTENT.needle().len()
        }
        None => choices + TEXT.find(&payload[choices..])? + TEXT.needle().len(),
    };
    let rest = &payload[value..];
    // Borrowed when the text has no escapes (the usual case), else decoded.
    let mut borrowed = serde_json::Deserializer::from_slice(rest).into_iter::<&str>();
    let (current_is_old, len) = match borrowed.next()? {
        Ok(current) => (current == old, borrowed.byte_offset()),
        Err(_) => {
            let mut decoded = serde_json::Deserializer::from_slice(rest).into_iter::<String>();
            let current = decoded.next()?.ok()?;
            (current == old, decoded.byte_offset())
        }
    };
    if !current_is_old {
        return None;
    }
    let end = value + len;
    let mut out = Vec::with_capacity(payload.len() + new.len() + 8);
    out.extend_from_slice(&payload[..value]);
    serde_json::to_writer(&mut out, new).ok()?;
    out.extend_from_slice(&payload[end..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splicing_text_keeps_every_other_byte() {
        let payload = br#"{"id":"cmpl-\"text\":x","choices":[{"index":0,"text":"he said \"hi\"","logprobs":{"top_logprobs":[{"text":-1.0}]},"finish_reason":null}],"usage":null}"#;
        let spliced = splice_text(payload, "he said \"hi\"", "new \u{e9} \"text\"").unwrap();
        assert_eq!(
            String::from_utf8(spliced).unwrap(),
            r#"{"id":"cmpl-\"text\":x","choices":[{"index":0,"text":"new é \"text\"","logprobs":{"top_logprobs":[{"text":-1.0}]},"finish_reason":null}],"usage":null}"#
        );
        assert_eq!(splice_text(payload, "something else", "x"), None);
        let plain = br#"{"choices":[{"index":0,"text":" and","finish_reason":null}]}"#;
        assert_eq!(
            splice_text(plain, " and", " an").as_deref(),
            Some(&br#"{"choices":[{"index":0,"text":" an","finish_reason":null}]}"#[..])
        );
        assert_eq!(splice_text(plain, " an", "x"), None);
        assert_eq!(splice_text(br#"{"choices":[]}"#, "", "x"), None);
        let chat = br#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"hi"},"logprobs":{"content":[{"token":"hi"}]},"finish_reason":null}]}"#;
        assert_eq!(
            splice_text(chat, "hi", "HI").as_deref(),
            Some(&br#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"HI"},"logprobs":{"content":[{"token":"hi"}]},"finish_reason":null}]}"#[..])
        );
    }
}
