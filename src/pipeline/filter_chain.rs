//! The token-filter chain of one response: runs each chunk's text through
//! the response's [`TokenFilter`]s in order and rebuilds the chunk from what
//! they answer (the chunk itself when nothing changed, nothing when all of
//! its text is held, a rebuilt chunk otherwise). A cached answer goes through
//! all at once, one filter call per filter rather than per chunk. Tool calls
//! of a chat answer go to the filters that ask for them, piece by piece.

use std::borrow::Cow;

use serde_json::Value;

use crate::backends::cache::CachedChunks;
use crate::error::GatewayError;
use crate::pipeline::policy::{TokenAction, TokenFilter, ToolCallAction, ToolCallPiece};
use crate::protocol::{Chunk, ChunkView};

/// What applying the filters to one chunk produced.
pub enum Filtered {
    Chunk(Chunk),
    /// Everything in the chunk was held back.
    Skip,
    /// The chunk to send last: a filter stopped the response.
    Stop(Chunk),
}

/// One choice of a chunk after the filters.
struct ChoiceOutput<'t> {
    text: Cow<'t, str>,
    finishing: bool,
    stop: bool,
}

/// The chunk to send for `chunk` after filtering: the chunk itself when no
/// filter changed it (not re-serialised), nothing when all its text is held,
/// else a rebuilt chunk.
fn assemble(chunk: &Chunk, view: &ChunkView<'_>, outputs: &[ChoiceOutput<'_>]) -> Filtered {
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
fn has_tool_calls(payload: &[u8]) -> bool {
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
}

impl FilterChain {
    pub fn new(filters: Vec<Box<dyn TokenFilter>>) -> Self {
        Self {
            text_filters: filters.iter().any(|f| f.filters_text()),
            tool_call_filters: filters.iter().any(|f| f.filters_tool_calls()),
            filters,
            seen: Vec::new(),
            finished: Vec::new(),
        }
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
    pub async fn apply_all(
        &mut self,
        chunks: &CachedChunks,
    ) -> Result<Vec<Filtered>, GatewayError> {
        // The chunks with choices.
        let choice_views: Vec<Option<&ChunkView<'_>>> = chunks
            .views()
            .iter()
            .map(|v| v.as_ref().filter(|v| !v.choices.is_empty()))
            .collect();
        // One choice throughout (`n` = 1, the usual case): batch. Otherwise chunk by chunk.
        let mut indices = choice_views
            .iter()
            .flatten()
            .flat_map(|p| &p.choices)
            .map(|c| c.index);
        let single_choice = choice_views.iter().flatten().all(|p| p.choices.len() == 1)
            && indices
                .next()
                .is_some_and(|first| indices.all(|i| i == first));
        let tool_calls =
            self.tool_call_filters && chunks.iter().any(|c| has_tool_calls(c.payload_slice()));
        if !self.text_filters || !single_choice || tool_calls {
            let mut results = Vec::with_capacity(chunks.len());
            for chunk in chunks.iter() {
                let filtered = self.apply(chunk.clone()).await?;
                let stop = matches!(filtered, Filtered::Stop(_));
                results.push(filtered);
                if stop {
                    break;
                }
            }
            return Ok(results);
        }
        let index = choice_views
            .iter()
            .flatten()
            .map(|p| p.choices[0].index)
            .next()
            .unwrap_or(0);
        if !self.seen.contains(&index) {
            self.seen.push(index);
        }
        // The text of each chunk as it passes from filter to filter.
        let mut texts: Vec<Cow<'_, str>> = choice_views
            .iter()
            .map(|p| p.map_or(Cow::Borrowed(""), |p| Cow::Borrowed(p.choices[0].text())))
            .collect();
        let finishing: Vec<bool> = choice_views
            .iter()
            .map(|p| {
                p.as_ref()
                    .is_some_and(|p| p.choices[0].finish_reason.is_some())
            })
            .collect();
        // Chunks after a `Stop` are never delivered.
        let mut end = chunks.len();
        let mut stopped_at = None;
        for filter in self.filters.iter_mut().filter(|f| f.filters_text()) {
            let mut start = 0;
            while start < end {
                // Up to and including the next chunk that ends the choice.
                let segment_end = (start..end).find(|&i| finishing[i]).map_or(end, |i| i + 1);
                let positions: Vec<usize> = (start..segment_end)
                    .filter(|&i| choice_views[i].is_some() && !texts[i].is_empty())
                    .collect();
                let inputs: Vec<&str> = positions.iter().map(|&i| &*texts[i]).collect();
                let actions = if inputs.is_empty() {
                    Vec::new()
                } else {
                    filter.on_texts(index, &inputs).await?
                };
                let valid = actions.len() == inputs.len()
                    || matches!(actions.last(), Some(TokenAction::Stop(_)));
                if !valid || actions.len() > inputs.len() {
                    return Err(GatewayError::Internal(format!(
                        "a token filter answered {} texts with {} actions",
                        inputs.len(),
                        actions.len()
                    )));
                }
                drop(inputs);
                let mut stop_here = None;
                for (&i, action) in positions.iter().zip(actions) {
                    match action {
                        TokenAction::Pass => {}
                        TokenAction::Replace(text) => texts[i] = Cow::Owned(text),
                        TokenAction::Hold => texts[i] = Cow::Borrowed(""),
                        TokenAction::Stop(text) => {
                            texts[i] = Cow::Owned(text);
                            stop_here = Some(i);
                        }
                    }
                }
                // A stop from an earlier filter ends this one too.
                let last = segment_end - 1;
                let stop_here = stop_here.or(stopped_at.filter(|&s| s == last));
                if let Some(i) = stop_here {
                    end = i + 1;
                    stopped_at = Some(i);
                    let held = filter.finish(index).await?;
                    if !held.is_empty() {
                        texts[i].to_mut().push_str(&held);
                    }
                    break;
                }
                if finishing[last] {
                    let held = filter.finish(index).await?;
                    if !held.is_empty() {
                        texts[last].to_mut().push_str(&held);
                    }
                }
                start = segment_end;
            }
        }
        let mut results = Vec::with_capacity(end);
        for (i, (chunk, text)) in chunks.iter().zip(texts).take(end).enumerate() {
            let Some(view) = choice_views[i] else {
                results.push(Filtered::Chunk(chunk.clone()));
                continue;
            };
            let stop = stopped_at == Some(i);
            if finishing[i] || stop {
                self.finished.push(index);
            }
            let output = ChoiceOutput {
                text,
                finishing: finishing[i],
                stop,
            };
            results.push(assemble(chunk, view, std::slice::from_ref(&output)));
        }
        Ok(results)
    }

    /// Flushes choices that never saw a `finish_reason` (a stream that ended
    /// early); returns their held text as one last chunk modelled on `template`.
    pub async fn finish(
        &mut self,
        template: Option<&Chunk>,
    ) -> Result<Option<Chunk>, GatewayError> {
        if self.filters.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChunkSummary;
    use async_trait::async_trait;

    /// Upper-cases text, holding anything after a `#` until the end.
    struct Upper {
        held: String,
    }

    #[async_trait]
    impl TokenFilter for Upper {
        async fn on_text(&mut self, _index: u32, text: &str) -> Result<TokenAction, GatewayError> {
            if text.contains('#') || !self.held.is_empty() {
                self.held.push_str(text);
                return Ok(TokenAction::Hold);
            }
            Ok(TokenAction::Replace(text.to_uppercase()))
        }
        async fn finish(&mut self, _index: u32) -> Result<String, GatewayError> {
            Ok(std::mem::take(&mut self.held))
        }
    }

    fn chunk(text: &str, finish: Option<&str>) -> Chunk {
        let body = serde_json::json!({"id":"c","object":"text_completion","created":1,"model":"m",
            "choices":[{"index":0,"text":text,"logprobs":null,"finish_reason":finish,"stop_reason":null}],"usage":null});
        Chunk::from_payload(body.to_string().as_bytes())
    }

    fn text_of(filtered: Filtered) -> Option<String> {
        match filtered {
            Filtered::Chunk(c) | Filtered::Stop(c) => {
                let v: Value = serde_json::from_slice(c.payload_slice()).unwrap();
                Some(v["choices"][0]["text"].as_str().unwrap().to_string())
            }
            Filtered::Skip => None,
        }
    }

    #[tokio::test]
    async fn replaces_holds_and_flushes_at_the_finishing_chunk() {
        let mut chain = FilterChain::new(vec![Box::new(Upper {
            held: String::new(),
        })]);
        assert_eq!(
            text_of(chain.apply(chunk("ab", None)).await.unwrap()).as_deref(),
            Some("AB")
        );
        assert_eq!(text_of(chain.apply(chunk("#x", None)).await.unwrap()), None);
        assert_eq!(
            text_of(chain.apply(chunk("y", Some("length"))).await.unwrap()).as_deref(),
            Some("#xy")
        );
        assert!(
            chain
                .finish(Some(&chunk("", None)))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn flushes_held_text_when_the_stream_ends_without_finish_reason() {
        let mut chain = FilterChain::new(vec![Box::new(Upper {
            held: String::new(),
        })]);
        let template = chunk("#held", None);
        assert!(matches!(
            chain.apply(template.clone()).await.unwrap(),
            Filtered::Skip
        ));
        let last = chain.finish(Some(&template)).await.unwrap().unwrap();
        assert_eq!(text_of(Filtered::Chunk(last)).as_deref(), Some("#held"));
    }

    /// Upper-cases text, holds text from a `#` until a `!`, and stops the
    /// response at a `$` (appending `+` for each call to `finish`).
    struct Scripted {
        held: String,
    }

    #[async_trait]
    impl TokenFilter for Scripted {
        async fn on_text(&mut self, _index: u32, text: &str) -> Result<TokenAction, GatewayError> {
            if text.contains('$') {
                return Ok(TokenAction::Stop(format!(
                    "{}{}",
                    self.held,
                    text.to_uppercase()
                )));
            }
            if text.contains('#') || !self.held.is_empty() {
                self.held.push_str(text);
                if text.contains('!') {
                    return Ok(TokenAction::Replace(std::mem::take(&mut self.held)));
                }
                return Ok(TokenAction::Hold);
            }
            Ok(TokenAction::Replace(text.to_uppercase()))
        }
        async fn finish(&mut self, _index: u32) -> Result<String, GatewayError> {
            Ok(format!("{}+", std::mem::take(&mut self.held)))
        }
    }

    fn scripted_chain(filters: usize) -> FilterChain {
        FilterChain::new(
            (0..filters)
                .map(|_| {
                    Box::new(Scripted {
                        held: String::new(),
                    }) as Box<dyn TokenFilter>
                })
                .collect(),
        )
    }

    fn payloads(results: Vec<Filtered>) -> Vec<Option<(bool, String)>> {
        results
            .into_iter()
            .map(|f| match f {
                Filtered::Chunk(c) => {
                    Some((false, String::from_utf8_lossy(c.payload_slice()).into()))
                }
                Filtered::Stop(c) => {
                    Some((true, String::from_utf8_lossy(c.payload_slice()).into()))
                }
                Filtered::Skip => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn filtering_all_chunks_at_once_gives_what_chunk_by_chunk_gives() {
        let usage = Chunk::from_payload(br#"{"id":"c","choices":[],"usage":{"prompt_tokens":1}}"#);
        let scripts: Vec<Vec<Chunk>> = vec![
            vec![
                chunk("ab", None),
                chunk(" cd", None),
                chunk("e", Some("length")),
                usage.clone(),
            ],
            vec![
                chunk("a", None),
                chunk("#b", None),
                chunk("c", None),
                chunk("d!", None),
                chunk("e", Some("stop")),
            ],
            vec![
                chunk("a", None),
                chunk("#held", None),
                chunk("", None),
                chunk("x", Some("length")),
            ],
            vec![
                chunk("a", None),
                chunk("b$", None),
                chunk("never", None),
                chunk("sent", Some("length")),
            ],
            vec![
                chunk("#a", None),
                chunk("b$", None),
                chunk("c", Some("length")),
            ],
            vec![chunk("a", None), chunk("b", None)],
        ];
        for chunks in scripts {
            for filters in [1, 2, 3] {
                let mut one_by_one = scripted_chain(filters);
                let mut expected = Vec::new();
                for c in &chunks {
                    let filtered = one_by_one.apply(c.clone()).await.unwrap();
                    let stop = matches!(filtered, Filtered::Stop(_));
                    expected.push(filtered);
                    if stop {
                        break;
                    }
                }
                let payloads_expected = payloads(expected);
                let cached = CachedChunks::new(chunks.clone());
                // The second hit on an entry reads the views the first one parsed.
                let first_hit = scripted_chain(filters).apply_all(&cached).await.unwrap();
                let mut at_once = scripted_chain(filters);
                let all = at_once.apply_all(&cached).await.unwrap();
                assert_eq!(
                    payloads(first_hit),
                    payloads_expected,
                    "{filters} filters, first hit"
                );
                for (view, chunk) in cached.views().iter().zip(&chunks) {
                    let summary = view
                        .as_ref()
                        .map_or_else(ChunkSummary::default, ChunkView::summary);
                    let expected = chunk.summary();
                    assert_eq!(
                        (summary.choices, summary.usage),
                        (expected.choices, expected.usage)
                    );
                }
                assert_eq!(payloads(all), payloads_expected, "{filters} filters");
                let template = chunks.last().cloned();
                let flushed = |c: Option<Chunk>| c.map(|c| c.payload_slice().to_vec());
                assert_eq!(
                    flushed(at_once.finish(template.as_ref()).await.unwrap()),
                    flushed(one_by_one.finish(template.as_ref()).await.unwrap()),
                    "{filters} filters, end of stream"
                );
            }
        }
    }

    fn chat_chunk(delta: Value, finish: Option<&str>) -> Chunk {
        let body = serde_json::json!({"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",
            "choices":[{"index":0,"delta":delta,"logprobs":null,"finish_reason":finish}]});
        Chunk::from_payload(body.to_string().as_bytes())
    }

    fn delta_of(filtered: Filtered) -> Option<Value> {
        match filtered {
            Filtered::Chunk(c) | Filtered::Stop(c) => {
                let v: Value = serde_json::from_slice(c.payload_slice()).unwrap();
                Some(v["choices"][0]["delta"].clone())
            }
            Filtered::Skip => None,
        }
    }

    #[tokio::test]
    async fn chat_deltas_are_filtered_and_tool_calls_pass_untouched() {
        let mut chain = FilterChain::new(vec![Box::new(Upper {
            held: String::new(),
        })]);
        let role = chat_chunk(serde_json::json!({"role":"assistant","content":""}), None);
        assert_eq!(
            delta_of(chain.apply(role.clone()).await.unwrap()),
            Some(serde_json::json!({"role":"assistant","content":""}))
        );
        assert_eq!(
            delta_of(
                chain
                    .apply(chat_chunk(serde_json::json!({"content":"hi"}), None))
                    .await
                    .unwrap()
            ),
            Some(serde_json::json!({"content":"HI"}))
        );
        let tool = chat_chunk(
            serde_json::json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"q\": \"x\"}"}}]}),
            None,
        );
        match chain.apply(tool.clone()).await.unwrap() {
            Filtered::Chunk(c) => assert_eq!(c, tool),
            _ => panic!("a tool-call delta must pass as it came"),
        }
        assert!(
            delta_of(
                chain
                    .apply(chat_chunk(serde_json::json!({"content":"#a"}), None))
                    .await
                    .unwrap()
            )
            .is_none()
        );
        // The held text comes out with the finishing chunk, whose delta had no content.
        assert_eq!(
            delta_of(
                chain
                    .apply(chat_chunk(serde_json::json!({}), Some("stop")))
                    .await
                    .unwrap()
            ),
            Some(serde_json::json!({"content":"#a"}))
        );
    }

    /// Reads tool calls only: upper-cases arguments, stops a call of `rm`.
    struct ToolGuard;

    #[async_trait]
    impl TokenFilter for ToolGuard {
        async fn on_text(&mut self, _index: u32, _text: &str) -> Result<TokenAction, GatewayError> {
            panic!("a filter of tool calls never sees text");
        }
        async fn finish(&mut self, _index: u32) -> Result<String, GatewayError> {
            Ok(String::new())
        }
        fn filters_text(&self) -> bool {
            false
        }
        fn filters_tool_calls(&self) -> bool {
            true
        }
        async fn on_tool_call(
            &mut self,
            _index: u32,
            piece: ToolCallPiece<'_>,
        ) -> Result<ToolCallAction, GatewayError> {
            Ok(match piece.name {
                Some("rm") => ToolCallAction::Stop("no".into()),
                _ => ToolCallAction::Replace(piece.arguments.to_uppercase()),
            })
        }
    }

    fn tool_chunks(name: &str) -> Vec<Chunk> {
        let call = |v: Value| chat_chunk(serde_json::json!({"tool_calls": [v]}), None);
        vec![
            chat_chunk(serde_json::json!({"role":"assistant","content":""}), None),
            call(
                serde_json::json!({"index":0,"id":"c1","type":"function","function":{"name":name,"arguments":""}}),
            ),
            call(serde_json::json!({"index":0,"function":{"arguments":"{\"q\": "}})),
            chat_chunk(
                serde_json::json!({"tool_calls":[{"index":0,"function":{"arguments":"\"x\"}"}}]}),
                Some("tool_calls"),
            ),
        ]
    }

    #[tokio::test]
    async fn tool_calls_reach_only_the_filters_that_ask_for_them() {
        let cached = CachedChunks::new(tool_chunks("search"));
        let all = FilterChain::new(vec![Box::new(ToolGuard)])
            .apply_all(&cached)
            .await
            .unwrap();
        let deltas: Vec<Value> = all.into_iter().map(|f| delta_of(f).unwrap()).collect();
        assert_eq!(
            deltas[0],
            serde_json::json!({"role":"assistant","content":""})
        );
        assert_eq!(
            deltas[1]["tool_calls"][0]["id"], "c1",
            "the rest of a piece is kept"
        );
        assert_eq!(
            deltas[2]["tool_calls"][0]["function"]["arguments"],
            "{\"Q\": "
        );
        assert_eq!(
            deltas[3]["tool_calls"][0]["function"]["arguments"],
            "\"X\"}"
        );

        let mut chain = FilterChain::new(vec![Box::new(ToolGuard)]);
        let chunks = tool_chunks("rm");
        assert!(
            matches!(chain.apply(chunks[0].clone()).await.unwrap(), Filtered::Chunk(c) if c == chunks[0])
        );
        let Filtered::Stop(stopped) = chain.apply(chunks[1].clone()).await.unwrap() else {
            panic!("a call of rm must stop the response");
        };
        let stopped: Value = serde_json::from_slice(stopped.payload_slice()).unwrap();
        assert_eq!(
            stopped["choices"][0]["delta"],
            serde_json::json!({"content":"no"})
        );
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

        // Without such a filter, tool calls pass as they came.
        let mut upper = FilterChain::new(vec![Box::new(Upper {
            held: String::new(),
        })]);
        for chunk in tool_chunks("rm") {
            assert!(
                matches!(upper.apply(chunk.clone()).await.unwrap(), Filtered::Chunk(c) if c == chunk)
            );
        }
    }

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
