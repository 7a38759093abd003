//! The token-filter chain of one response: runs each chunk's text through
//! the response's [`TokenFilter`]s in order and rebuilds the chunk from what
//! they answer (the chunk itself when nothing changed, nothing when all of
//! its text is held, a rebuilt chunk otherwise). A cached answer goes through
//! all at once, one filter call per filter rather than per chunk. Tool calls
//! of a chat answer go to the filters that ask for them, piece by piece.

mod batch;
mod rebuild;
#[cfg(test)]
mod tests;
mod typed;

use std::borrow::Cow;

use serde_json::Value;

use crate::error::GatewayError;
use crate::pipeline::policy::{TokenAction, TokenFilter, ToolCallAction, ToolCallPiece};
use crate::protocol::{Chunk, ChunkView};
use rebuild::{ChoiceOutput, assemble, has_tool_calls};
pub use typed::TypedApi;

/// What applying the filters to one chunk produced.
pub enum Filtered {
    Chunk(Chunk),
    /// Everything in the chunk was held back.
    Skip,
    /// The chunk to send last: a filter stopped the response.
    Stop(Chunk),
    /// Two chunks, in order: held text let out before the event that ends its block.
    Then(Chunk, Chunk),
}

/// The token filters of one response, applied to each chunk in order.
pub struct FilterChain {
    filters: Vec<Box<dyn TokenFilter>>,
    /// Whether any filter reads text, and any reads tool calls.
    text_filters: bool,
    tool_call_filters: bool,
    /// Choices the filters have seen text of, and those already finished
    /// (flushed): at the end of a stream, only the difference needs work.
    seen: Vec<u32>,
    finished: Vec<u32>,
    /// The API whose typed events the chain reads (Messages, Responses);
    /// `None`: OpenAI's completion and chat chunks.
    typed_api: Option<TypedApi>,
    typed: typed::TypedState,
}

impl FilterChain {
    pub fn new(filters: Vec<Box<dyn TokenFilter>>) -> Self {
        Self {
            text_filters: filters.iter().any(|f| f.filters_text()),
            tool_call_filters: filters.iter().any(|f| f.filters_tool_calls()),
            filters,
            seen: Vec::new(),
            finished: Vec::new(),
            typed_api: None,
            typed: Default::default(),
        }
    }

    /// The chain for an API of typed events.
    pub fn for_api(mut self, api: Option<TypedApi>) -> Self {
        self.typed_api = api;
        self
    }

    /// Whether the chain reads a typed API's events (Messages, Responses).
    pub fn is_typed(&self) -> bool {
        self.typed_api.is_some()
    }

    pub fn has_filters(&self) -> bool {
        !self.filters.is_empty()
    }

    /// Runs `text` of choice `index` through every filter; a filter's output is the next one's input.
    async fn run(
        &mut self,
        index: u32,
        text: &str,
        finishing: bool,
    ) -> Result<(String, bool), GatewayError> {
        let mut current = String::with_capacity(text.len() + 16);
        current.push_str(text);
        let mut stopped = false;
        for filter in self.filters.iter_mut() {
            if !current.is_empty() && filter.filters_text() {
                match filter.on_text(index, &current).await? {
                    TokenAction::Pass => {}
                    TokenAction::Replace(text) => current = text,
                    TokenAction::Hold => current.clear(),
                    TokenAction::Stop(text) => {
                        current = text;
                        stopped = true;
                    }
                }
            }
            if finishing || stopped {
                let held = filter.finish(index).await?;
                // Held text still passes through the filters after this one.
                current.push_str(&held);
            }
        }
        Ok((current, stopped))
    }

    /// Filters one chunk. A chunk whose text no filter changed is returned as
    /// it came, without re-serialising it.
    pub async fn apply(&mut self, chunk: Chunk) -> Result<Filtered, GatewayError> {
        if let Some(api) = self.typed_api {
            if !self.text_filters && !self.tool_call_filters {
                return Ok(Filtered::Chunk(chunk));
            }
            return self.apply_typed(api, chunk).await;
        }
        let tool_calls = self.tool_call_filters && has_tool_calls(chunk.payload_slice());
        if !self.text_filters && !tool_calls {
            return Ok(Filtered::Chunk(chunk));
        }
        // Tool calls first: the text filters finish a choice at its last chunk.
        let chunk = match tool_calls {
            true => match self.filter_tool_calls(chunk).await? {
                Filtered::Chunk(chunk) => chunk,
                stopped => return Ok(stopped),
            },
            false => chunk,
        };
        let Some(view) = ChunkView::parse(&chunk).filter(|v| !v.choices.is_empty()) else {
            return Ok(Filtered::Chunk(chunk));
        };
        let mut outputs = Vec::with_capacity(view.choices.len());
        for choice in &view.choices {
            if !self.seen.contains(&choice.index) {
                self.seen.push(choice.index);
            }
            let finishing = choice.finish_reason.is_some();
            let (filtered, stop) = self.run(choice.index, choice.text(), finishing).await?;
            if finishing || stop {
                self.finished.push(choice.index);
            }
            outputs.push(ChoiceOutput {
                text: Cow::Owned(filtered),
                finishing,
                stop,
            });
        }
        Ok(assemble(&chunk, &view, &outputs))
    }

    /// Runs each tool-call piece of `chunk` through the filters that read
    /// tool calls. The chunk itself when none changed anything.
    async fn filter_tool_calls(&mut self, chunk: Chunk) -> Result<Filtered, GatewayError> {
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(chunk.payload_slice())
        else {
            return Ok(Filtered::Chunk(chunk));
        };
        let mut changed = false;
        let Some(Value::Array(choices)) = body.get_mut("choices") else {
            return Ok(Filtered::Chunk(chunk));
        };
        for choice in choices.iter_mut() {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
            let Some(Value::Array(calls)) = choice.pointer_mut("/delta/tool_calls") else {
                continue;
            };
            let mut stop = None;
            for call in calls.iter_mut() {
                let call_index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as u32;
                let name = call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let sent = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut arguments = Cow::Borrowed(sent);
                for filter in self.filters.iter_mut().filter(|f| f.filters_tool_calls()) {
                    let piece = ToolCallPiece {
                        call_index,
                        name: name.as_deref(),
                        arguments: &arguments,
                    };
                    match filter.on_tool_call(index, piece).await? {
                        ToolCallAction::Pass => {}
                        ToolCallAction::Replace(text) => arguments = Cow::Owned(text),
                        ToolCallAction::Stop(text) => {
                            stop = Some(text);
                            break;
                        }
                    }
                }
                if stop.is_some() {
                    break;
                }
                if let Cow::Owned(arguments) = arguments {
                    changed = true;
                    if let Some(Value::Object(function)) = call.get_mut("function") {
                        function.insert("arguments".into(), Value::String(arguments));
                    }
                }
            }
            if let Some(text) = stop {
                // Held text comes out first; the stop text passes the text filters too.
                let (text, _) = self.run(index, &text, true).await?;
                self.finished.push(index);
                if let Value::Object(choice) = choice {
                    choice.insert("delta".into(), serde_json::json!({"content": text}));
                    choice.insert("finish_reason".into(), Value::from("stop"));
                }
                let payload = serde_json::to_vec(&body).unwrap_or_default();
                return Ok(Filtered::Stop(Chunk::from_payload(&payload)));
            }
        }
        if !changed {
            return Ok(Filtered::Chunk(chunk));
        }
        let payload = serde_json::to_vec(&body).unwrap_or_default();
        Ok(Filtered::Chunk(Chunk::from_payload(&payload)))
    }

    /// Filters consecutive chunks known at once (a cached answer), giving each
    /// filter all their text in one call. Returns one result per chunk, or
    /// fewer ending with the `Stop` that ended the response. The same results
    /// as `apply` on each chunk in turn.
    /// Flushes choices that never saw a `finish_reason` (a stream that ended
    /// early); returns their held text as one last chunk modelled on `template`.
    pub async fn finish(
        &mut self,
        template: Option<&Chunk>,
    ) -> Result<Option<Chunk>, GatewayError> {
        // A typed API's held text comes out at the end of its block or item.
        if self.filters.is_empty() || self.typed_api.is_some() {
            return Ok(None);
        }
        let Some(template) = template else {
            return Ok(None);
        };
        // The usual end: every choice ended with a `finish_reason` and was flushed then.
        if self.seen.iter().all(|i| self.finished.contains(i)) {
            return Ok(None);
        }
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(template.payload_slice())
        else {
            return Ok(None);
        };
        let chat = body.get("object").and_then(Value::as_str) == Some("chat.completion.chunk");
        let indices: Vec<u32> = match body.get("choices") {
            Some(Value::Array(choices)) => choices
                .iter()
                .filter_map(|c| c.get("index").and_then(Value::as_u64))
                .map(|i| i as u32)
                .filter(|i| !self.finished.contains(i))
                .collect(),
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        for index in indices {
            let (text, _) = self.run(index, "", true).await?;
            self.finished.push(index);
            if text.is_empty() {
                continue;
            }
            out.push(match chat {
                true => serde_json::json!({"index": index, "delta": {"content": text}, "logprobs": null, "finish_reason": null}),
                false => serde_json::json!({"index": index, "text": text, "logprobs": null, "finish_reason": null, "stop_reason": null}),
            });
        }
        if out.is_empty() {
            return Ok(None);
        }
        body.insert("choices".into(), Value::Array(out));
        body.insert("usage".into(), Value::Null);
        Ok(Some(Chunk::from_payload(
            &serde_json::to_vec(&body).unwrap_or_default(),
        )))
    }
}
