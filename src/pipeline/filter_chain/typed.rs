//! Token filters on the APIs whose answers are typed events: Anthropic's
//! Messages (the `text_delta`s of `content_block_delta`, the
//! `input_json_delta`s of a `tool_use` block) and OpenAI's Responses API
//! (`response.output_text.delta`, `response.function_call_arguments.delta`),
//! streamed, or as one JSON answer (a message's text blocks, a response's
//! output text). A filter's "choice" is the content block (Messages) or the
//! output item (Responses). Held text comes out as one more delta event
//! before the event that ends its block or item; the Responses API's `done`
//! events and its final response carry the text as filtered, and the events
//! after an added one are renumbered so `sequence_number` stays contiguous.
//! Every other event passes untouched.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::{FilterChain, Filtered};
use crate::error::GatewayError;
use crate::pipeline::policy::{ToolCallAction, ToolCallPiece};
use crate::protocol::{Chunk, event_type};

/// Which API's events a chain filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypedApi {
    Anthropic,
    Responses,
}

/// What the chain remembers across a typed stream.
#[derive(Default)]
pub(super) struct TypedState {
    /// The filtered text of each block or item so far.
    texts: HashMap<u32, String>,
    /// How many events were added so far (Responses' numbering shifts by it).
    added: u64,
}

fn serialize(body: &Value) -> Chunk {
    Chunk::from_payload(&serde_json::to_vec(body).unwrap_or_default())
}

/// The value at a JSON pointer in an object.
fn at<'a>(body: &'a Map<String, Value>, pointer: &str) -> Option<&'a Value> {
    let rest = pointer.strip_prefix('/')?;
    let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let value = body.get(first)?;
    match tail.is_empty() {
        true => Some(value),
        false => value.pointer(&format!("/{tail}")),
    }
}

fn index_of(body: &Map<String, Value>, key: &str) -> u32 {
    body.get(key)
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(0)
}

impl FilterChain {
    /// Filters one chunk of a typed API's answer.
    pub(super) async fn apply_typed(
        &mut self,
        api: TypedApi,
        chunk: Chunk,
    ) -> Result<Filtered, GatewayError> {
        let kind = event_type(chunk.payload_slice()).map(str::to_owned);
        let interesting = match (api, kind.as_deref()) {
            (TypedApi::Anthropic, Some(kind)) => matches!(
                kind,
                "content_block_start" | "content_block_delta" | "content_block_stop" | "message"
            ),
            // A response object (a JSON answer or a retrieve) has no `type`.
            (TypedApi::Responses, None) => true,
            (TypedApi::Responses, Some(kind)) => {
                kind.ends_with(".delta") || kind.ends_with(".done") || kind.starts_with("response.")
            }
            (TypedApi::Anthropic, None) => false,
        };
        if !interesting {
            return Ok(self.renumbered(api, chunk));
        }
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(chunk.payload_slice())
        else {
            return Ok(Filtered::Chunk(chunk));
        };
        let filtered = match (api, kind.as_deref()) {
            (TypedApi::Anthropic, Some("message")) | (TypedApi::Responses, None) => {
                self.whole_answer(api, &mut body).await?
            }
            (TypedApi::Anthropic, Some(kind)) => self.anthropic_event(kind, &mut body).await?,
            (TypedApi::Responses, Some(kind)) => self.responses_event(kind, &mut body).await?,
            (TypedApi::Anthropic, None) => None,
        };
        Ok(match filtered {
            Some(filtered) => filtered,
            None if self.typed.added > 0 && api == TypedApi::Responses => {
                self.number(&mut body);
                Filtered::Chunk(serialize(&Value::Object(body)))
            }
            None => Filtered::Chunk(chunk),
        })
    }

    /// The chunk, renumbered if events were added before it.
    fn renumbered(&mut self, api: TypedApi, chunk: Chunk) -> Filtered {
        if api != TypedApi::Responses || self.typed.added == 0 {
            return Filtered::Chunk(chunk);
        }
        match serde_json::from_slice::<Value>(chunk.payload_slice()) {
            Ok(Value::Object(mut body)) => {
                self.number(&mut body);
                Filtered::Chunk(serialize(&Value::Object(body)))
            }
            _ => Filtered::Chunk(chunk),
        }
    }

    fn number(&self, body: &mut Map<String, Value>) {
        if let Some(n) = body.get("sequence_number").and_then(Value::as_u64) {
            body.insert("sequence_number".into(), json!(n + self.typed.added));
        }
    }

    /// A whole answer: each text block (Messages) or each message item's
    /// output text (Responses) through the filters, start to end.
    async fn whole_answer(
        &mut self,
        api: TypedApi,
        body: &mut Map<String, Value>,
    ) -> Result<Option<Filtered>, GatewayError> {
        let mut changed = false;
        let mut stopped = false;
        let key = match api {
            TypedApi::Anthropic => "content",
            TypedApi::Responses => "output",
        };
        let Some(Value::Array(items)) = body.get_mut(key) else {
            return Ok(None);
        };
        let mut stopped_at = None;
        for (i, item) in items.iter_mut().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let tool_call = matches!(
                (api, item["type"].as_str()),
                (TypedApi::Anthropic, Some("tool_use"))
                    | (TypedApi::Responses, Some("function_call"))
            );
            if tool_call {
                if self.tool_call_filters {
                    let (edited, stop) = self.whole_tool_call(api, index, item).await?;
                    changed |= edited;
                    if stop {
                        stopped = true;
                        stopped_at = Some(i);
                        break;
                    }
                }
                continue;
            }
            let text = match api {
                TypedApi::Anthropic if item["type"] == "text" => item.get_mut("text"),
                TypedApi::Responses if item["type"] == "message" => {
                    item.pointer_mut("/content/0/text")
                }
                _ => None,
            };
            let Some(Value::String(text)) = text else {
                continue;
            };
            self.seen.push(index);
            let (filtered, stop) = self.run(index, text, true).await?;
            self.finished.push(index);
            if filtered != *text {
                *text = filtered;
                changed = true;
            }
            if stop {
                stopped = true;
                stopped_at = Some(i);
                break;
            }
        }
        // A stopped answer ends at the item that stopped it.
        if let Some(at) = stopped_at {
            items.truncate(at + 1);
            if api == TypedApi::Anthropic {
                body.insert("stop_reason".into(), json!("end_turn"));
            }
        }
        Ok(changed.then(|| {
            let chunk = serialize(&Value::Object(std::mem::take(body)));
            match stopped {
                true => Filtered::Stop(chunk),
                false => Filtered::Chunk(chunk),
            }
        }))
    }

    async fn anthropic_event(
        &mut self,
        kind: &str,
        body: &mut Map<String, Value>,
    ) -> Result<Option<Filtered>, GatewayError> {
        let index = index_of(body, "index");
        match kind {
            "content_block_start" => {
                if at(body, "/content_block/type") == Some(&json!("tool_use"))
                    && let Some(name) = at(body, "/content_block/name").and_then(Value::as_str)
                {
                    let name = name.to_string();
                    // The tool's name leaves with the block's start: the hooks see it first.
                    if let Some(text) = self.stopped_at_start(index, &name).await? {
                        let start = json!({"type": "content_block_start", "index": index,
                            "content_block": {"type": "text", "text": text}});
                        return Ok(Some(Filtered::Stop(serialize(&start))));
                    }
                }
                Ok(None)
            }
            "content_block_delta" => match at(body, "/delta/type").and_then(Value::as_str) {
                Some("text_delta") if self.text_filters => {
                    let text = at(body, "/delta/text")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    self.text_delta(index, text.to_string(), body, "/delta/text")
                        .await
                }
                Some("input_json_delta") if self.tool_call_filters => {
                    let piece = at(body, "/delta/partial_json")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    self.tool_piece(
                        TypedApi::Anthropic,
                        index,
                        piece,
                        body,
                        "/delta/partial_json",
                    )
                    .await
                }
                _ => Ok(None),
            },
            "content_block_stop" => {
                let Some(held) = self.flush(index).await? else {
                    return Ok(None);
                };
                let delta = json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": held}});
                Ok(Some(Filtered::Then(
                    serialize(&delta),
                    serialize(&Value::Object(std::mem::take(body))),
                )))
            }
            _ => Ok(None),
        }
    }

    async fn responses_event(
        &mut self,
        kind: &str,
        body: &mut Map<String, Value>,
    ) -> Result<Option<Filtered>, GatewayError> {
        let index = index_of(body, "output_index");
        match kind {
            "response.output_item.added" => {
                if at(body, "/item/type") == Some(&json!("function_call"))
                    && let Some(name) = at(body, "/item/name").and_then(Value::as_str)
                {
                    let name = name.to_string();
                    if let Some(text) = self.stopped_at_start(index, &name).await? {
                        let mut delta = json!({"content_index": 0, "delta": text,
                            "item_id": at(body, "/item/id"), "logprobs": [], "output_index": index,
                            "sequence_number": body.get("sequence_number"),
                            "type": "response.output_text.delta"});
                        if let Value::Object(map) = &mut delta {
                            self.number(map);
                        }
                        return Ok(Some(Filtered::Stop(serialize(&delta))));
                    }
                }
                Ok(None)
            }
            "response.output_text.delta" if self.text_filters => {
                let text = body
                    .get("delta")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.text_delta(index, text, body, "/delta").await
            }
            "response.function_call_arguments.delta" if self.tool_call_filters => {
                let piece = body
                    .get("delta")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.tool_piece(TypedApi::Responses, index, piece, body, "/delta")
                    .await
            }
            "response.output_text.done" => {
                let held = self.flush(index).await?;
                let added = held.as_ref().map(|held| {
                    let mut delta = body.clone();
                    delta.insert("type".into(), json!("response.output_text.delta"));
                    delta.insert("delta".into(), json!(held));
                    delta.remove("text");
                    delta.insert("logprobs".into(), json!([]));
                    delta
                });
                if let Some(mut delta) = added {
                    self.number(&mut delta);
                    self.typed.added += 1;
                    self.number(body);
                    self.set_text(index, body, "/text");
                    return Ok(Some(Filtered::Then(
                        serialize(&Value::Object(delta)),
                        serialize(&Value::Object(std::mem::take(body))),
                    )));
                }
                Ok(self.rewritten(index, body, &["/text"]))
            }
            "response.content_part.done" => Ok(self.rewritten(index, body, &["/part/text"])),
            "response.output_item.done" => {
                Ok(self.rewritten(index, body, &["/item/content/0/text"]))
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                let indices: Vec<u32> = self.typed.texts.keys().copied().collect();
                let mut changed = false;
                for i in indices {
                    let pointer = format!("/response/output/{i}/content/0/text");
                    changed |= self.set_text(i, body, &pointer);
                }
                Ok((changed || self.typed.added > 0).then(|| {
                    self.number(body);
                    Filtered::Chunk(serialize(&Value::Object(std::mem::take(body))))
                }))
            }
            _ => Ok(None),
        }
    }

    /// A text delta through the filters; the event rewritten when they changed it.
    async fn text_delta(
        &mut self,
        index: u32,
        text: String,
        body: &mut Map<String, Value>,
        pointer: &str,
    ) -> Result<Option<Filtered>, GatewayError> {
        if !self.seen.contains(&index) {
            self.seen.push(index);
        }
        let (filtered, stop) = self.run(index, &text, false).await?;
        self.typed
            .texts
            .entry(index)
            .or_default()
            .push_str(&filtered);
        if stop {
            self.finished.push(index);
        }
        if filtered == text && !stop {
            return Ok(None);
        }
        if filtered.is_empty() && !stop {
            return Ok(Some(Filtered::Skip));
        }
        let mut value = Value::Object(std::mem::take(body));
        if let Some(slot) = value.pointer_mut(pointer) {
            *slot = Value::String(filtered);
        }
        if let Value::Object(map) = &mut value {
            self.number(map);
        }
        let chunk = serialize(&value);
        Ok(Some(match stop {
            true => Filtered::Stop(chunk),
            false => Filtered::Chunk(chunk),
        }))
    }

    /// A piece of a tool call's arguments through the filters that read them.
    async fn tool_piece(
        &mut self,
        api: TypedApi,
        index: u32,
        piece: String,
        body: &mut Map<String, Value>,
        pointer: &str,
    ) -> Result<Option<Filtered>, GatewayError> {
        // As on chat, the name comes with the call's first piece (its start).
        let arguments = match self.tool_action(index, None, &piece).await? {
            ToolCallAction::Pass => return Ok(None),
            ToolCallAction::Replace(arguments) => arguments,
            ToolCallAction::Stop(text) => {
                // The response ends with the stop text, as a text delta.
                let (text, _) = self.run(index, &text, true).await?;
                self.finished.push(index);
                let mut event = match api {
                    TypedApi::Anthropic => json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": text}}),
                    TypedApi::Responses => {
                        let mut event = Value::Object(std::mem::take(body));
                        event["type"] = json!("response.output_text.delta");
                        event["delta"] = json!(text);
                        event
                    }
                };
                if let Value::Object(map) = &mut event {
                    self.number(map);
                }
                return Ok(Some(Filtered::Stop(serialize(&event))));
            }
        };
        let mut value = Value::Object(std::mem::take(body));
        if let Some(slot) = value.pointer_mut(pointer) {
            *slot = Value::String(arguments);
        }
        if let Value::Object(map) = &mut value {
            self.number(map);
        }
        Ok(Some(Filtered::Chunk(serialize(&value))))
    }

    /// A tool call as it starts (its name, no arguments yet) through the
    /// tool-call filters: the stop text (after the text filters) if one
    /// stops the answer there.
    async fn stopped_at_start(
        &mut self,
        index: u32,
        name: &str,
    ) -> Result<Option<String>, GatewayError> {
        if !self.tool_call_filters {
            return Ok(None);
        }
        match self.tool_action(index, Some(name), "").await? {
            ToolCallAction::Stop(text) => {
                let (text, _) = self.run(index, &text, true).await?;
                self.finished.push(index);
                Ok(Some(text))
            }
            _ => Ok(None),
        }
    }

    /// A tool call's arguments (a piece, or all of them) through the filters
    /// that read tool calls: `Pass` when none changed them.
    async fn tool_action(
        &mut self,
        index: u32,
        name: Option<&str>,
        piece: &str,
    ) -> Result<ToolCallAction, GatewayError> {
        let mut arguments = std::borrow::Cow::Borrowed(piece);
        for filter in self.filters.iter_mut().filter(|f| f.filters_tool_calls()) {
            let call = ToolCallPiece {
                call_index: index,
                name,
                arguments: &arguments,
            };
            match filter.on_tool_call(index, call).await? {
                ToolCallAction::Pass => {}
                ToolCallAction::Replace(text) => arguments = std::borrow::Cow::Owned(text),
                stop @ ToolCallAction::Stop(_) => return Ok(stop),
            }
        }
        Ok(match arguments {
            std::borrow::Cow::Borrowed(_) => ToolCallAction::Pass,
            std::borrow::Cow::Owned(arguments) => ToolCallAction::Replace(arguments),
        })
    }

    /// A whole answer's tool call (a `tool_use` block, a `function_call`
    /// item) through the tool-call filters, its arguments as one piece; on a
    /// stop, the item becomes the stop text. Whether it stopped the answer.
    async fn whole_tool_call(
        &mut self,
        api: TypedApi,
        index: u32,
        item: &mut Value,
    ) -> Result<(bool, bool), GatewayError> {
        let name = item["name"].as_str().map(str::to_owned);
        let arguments = match api {
            TypedApi::Anthropic => item["input"].to_string(),
            TypedApi::Responses => item["arguments"].as_str().unwrap_or("").to_string(),
        };
        match self.tool_action(index, name.as_deref(), &arguments).await? {
            ToolCallAction::Pass => Ok((false, false)),
            ToolCallAction::Replace(arguments) => {
                match api {
                    TypedApi::Anthropic => {
                        item["input"] = serde_json::from_str(&arguments).unwrap_or(Value::Null)
                    }
                    TypedApi::Responses => item["arguments"] = json!(arguments),
                }
                Ok((true, false))
            }
            ToolCallAction::Stop(text) => {
                let (text, _) = self.run(index, &text, true).await?;
                self.finished.push(index);
                *item = match api {
                    TypedApi::Anthropic => json!({"type": "text", "text": text}),
                    TypedApi::Responses => json!({"id": item["id"], "type": "message",
                        "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}),
                };
                Ok((true, true))
            }
        }
    }

    /// The text the filters still hold for a block or item that ends here.
    async fn flush(&mut self, index: u32) -> Result<Option<String>, GatewayError> {
        if !self.seen.contains(&index) || self.finished.contains(&index) {
            return Ok(None);
        }
        let (held, _) = self.run(index, "", true).await?;
        self.finished.push(index);
        if held.is_empty() {
            return Ok(None);
        }
        self.typed.texts.entry(index).or_default().push_str(&held);
        Ok(Some(held))
    }

    /// Puts the filtered text of `index` at `pointer`; whether it changed anything.
    fn set_text(&self, index: u32, body: &mut Map<String, Value>, pointer: &str) -> bool {
        let Some(text) = self.typed.texts.get(&index) else {
            return false;
        };
        let mut value = Value::Object(std::mem::take(body));
        let changed = match value.pointer_mut(pointer) {
            Some(slot) if slot.as_str() != Some(text) && slot.is_string() => {
                *slot = Value::String(text.clone());
                true
            }
            _ => false,
        };
        if let Value::Object(map) = value {
            *body = map;
        }
        changed
    }

    /// A `done` event with the filtered text in place, if it differs (or
    /// renumbered, if events were added before it).
    fn rewritten(
        &mut self,
        index: u32,
        body: &mut Map<String, Value>,
        pointers: &[&str],
    ) -> Option<Filtered> {
        let mut changed = false;
        for pointer in pointers {
            changed |= self.set_text(index, body, pointer);
        }
        (changed || self.typed.added > 0).then(|| {
            self.number(body);
            Filtered::Chunk(serialize(&Value::Object(std::mem::take(body))))
        })
    }
}
