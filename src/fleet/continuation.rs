//! Continuing a stream on another replica: when an endpoint fails after
//! chunks have gone out, the request is sent again as a continuation of
//! what was sent (a completion's prompt followed by the text so far; a
//! chat's conversation with the partial answer as a final assistant
//! message, vLLM's `continue_final_message`), `max_tokens` reduced by it.
//! For a greedy request that is exactly the rest of the undisturbed answer.
//!
//! Nothing is parsed on the way: the worker keeps the chunks it forwarded
//! (shared bytes), and reads them only when an endpoint fails. A request
//! that cannot be continued exactly (`n` > 1, logprobs, `echo`, a prompt of
//! token ids, tool calls already sent, an answer that had finished) ends
//! with the error event, as without continuation.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::protocol::{Chunk, ChunkView, Route};

/// A continuation to send, and what it takes to make its chunks follow the
/// ones already sent.
pub(super) struct Continuation {
    pub body: Bytes,
    /// The tokens already sent (the continuation's prompt holds them).
    sent_tokens: u64,
    /// A chat continuation starts with a role chunk the client already had.
    chat: bool,
    first: bool,
}

/// The continuation of `body` (sent to `route`) after `sent`, if the
/// request can be continued exactly.
pub(super) fn plan(route: Route, body: &[u8], sent: &[Chunk]) -> Option<Continuation> {
    let chat = match route {
        Route::ChatCompletions => true,
        Route::Completions => false,
        _ => return None,
    };
    let Ok(Value::Object(mut request)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let set = |key: &str| request.get(key).is_some_and(|v| !v.is_null());
    let n = request.get("n").and_then(Value::as_u64).unwrap_or(1);
    let logprobs = match chat {
        true => request.get("logprobs").and_then(Value::as_bool) == Some(true),
        false => set("logprobs"),
    };
    let echo = request.get("echo").and_then(Value::as_bool) == Some(true);
    if n != 1 || logprobs || echo || set("best_of") {
        return None;
    }
    let mut text = String::new();
    let mut tokens = 0u64;
    for chunk in sent {
        let view = ChunkView::parse(chunk)?;
        for choice in &view.choices {
            if choice.index != 0 || choice.finish_reason.is_some() {
                return None;
            }
            if choice.has_output() && choice.text().is_empty() {
                return None; // a tool call's piece: no exact continuation
            }
            if !choice.text().is_empty() {
                text.push_str(choice.text());
                tokens += 1;
            }
        }
    }
    if tokens > 0 {
        match chat {
            true => continue_chat(&mut request, text)?,
            false => match request.get_mut("prompt") {
                Some(Value::String(prompt)) => prompt.push_str(&text),
                _ => return None,
            },
        }
        for key in ["max_tokens", "max_completion_tokens"] {
            if let Some(limit) = request.get(key).and_then(Value::as_u64) {
                let left = limit.checked_sub(tokens).filter(|left| *left > 0)?;
                request.insert(key.into(), json!(left));
            }
        }
    }
    Some(Continuation {
        body: Bytes::from(serde_json::to_vec(&request).ok()?),
        sent_tokens: tokens,
        chat,
        first: true,
    })
}

/// The conversation with `text` as the start of the assistant's answer.
fn continue_chat(request: &mut Map<String, Value>, text: String) -> Option<()> {
    let Some(Value::Array(messages)) = request.get_mut("messages") else {
        return None;
    };
    messages.push(json!({"role": "assistant", "content": text}));
    request.insert("continue_final_message".into(), json!(true));
    request.insert("add_generation_prompt".into(), json!(false));
    Some(())
}

impl Continuation {
    /// A chunk of the continuation as the client gets it: `None` for the
    /// role chunk it already had; the usage chunk counting the whole answer
    /// (the continuation's prompt held the tokens sent before).
    pub(super) fn follow(&mut self, chunk: Chunk) -> Option<Chunk> {
        let first = std::mem::take(&mut self.first);
        let summary = chunk.summary();
        if first && self.chat && summary.outputs == 0 && !summary.is_usage_only() {
            return None;
        }
        if self.sent_tokens == 0 || summary.usage.is_none() {
            return Some(chunk);
        }
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(chunk.payload_slice())
        else {
            return Some(chunk);
        };
        if let Some(Value::Object(usage)) = body.get_mut("usage") {
            let count = |usage: &Map<String, Value>, key: &str| {
                usage.get(key).and_then(Value::as_u64).unwrap_or(0)
            };
            let prompt = count(usage, "prompt_tokens").saturating_sub(self.sent_tokens);
            let completion = count(usage, "completion_tokens") + self.sent_tokens;
            usage.insert("prompt_tokens".into(), json!(prompt));
            usage.insert("completion_tokens".into(), json!(completion));
            usage.insert("total_tokens".into(), json!(prompt + completion));
        }
        Some(Chunk::from_payload(&serde_json::to_vec(&body).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> Chunk {
        Chunk::from_payload(
            json!({"id": "cmpl-1", "choices": [{"index": 0, "text": text, "finish_reason": null}]})
                .to_string()
                .as_bytes(),
        )
    }

    #[test]
    fn a_completion_continues_with_its_text_and_fewer_tokens() {
        let body = br#"{"model":"m","prompt":"Once","max_tokens":10,"stream":true}"#;
        let planned = plan(Route::Completions, body, &[chunk(" upon"), chunk(" a")]).unwrap();
        let sent: Value = serde_json::from_slice(&planned.body).unwrap();
        assert_eq!(sent["prompt"], "Once upon a");
        assert_eq!(sent["max_tokens"], 8);
        for refused in [
            &br#"{"model":"m","prompt":"x","n":2}"#[..],
            br#"{"model":"m","prompt":"x","logprobs":1}"#,
            br#"{"model":"m","prompt":[1,2,3]}"#,
            br#"{"model":"m","prompt":"x","max_tokens":2}"#,
        ] {
            assert!(plan(Route::Completions, refused, &[chunk(" a"), chunk(" b")]).is_none());
        }
    }

    #[test]
    fn a_chat_continues_its_final_message_and_its_usage_counts_the_whole_answer() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5}"#;
        let role = Chunk::from_payload(
            br#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        );
        let token = Chunk::from_payload(
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":" hello"},"finish_reason":null}]}"#,
        );
        let mut planned =
            plan(Route::ChatCompletions, body, &[role.clone(), token.clone()]).unwrap();
        let sent: Value = serde_json::from_slice(&planned.body).unwrap();
        assert_eq!(
            sent["messages"][1],
            json!({"role": "assistant", "content": " hello"})
        );
        assert_eq!(sent["continue_final_message"], true);
        assert_eq!(sent["max_completion_tokens"], 4);
        assert!(planned.follow(role).is_none(), "the role chunk again");
        assert_eq!(planned.follow(token.clone()), Some(token));
        let usage = Chunk::from_payload(
            br#"{"id":"c","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":4,"total_tokens":8}}"#,
        );
        let usage: Value =
            serde_json::from_slice(planned.follow(usage).unwrap().payload_slice()).unwrap();
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
        );
    }
}
