//! The policy phases the pipeline calls at its three hook points, in the
//! pingora style: one trait whose methods default to "do nothing", so the
//! pipeline never special-cases the absence of plugins. The WebAssembly
//! plugin host implements it.
//!
//! Token filtering is per stream: [`Policy::token_filters`] hands out fresh
//! filters for each response, so a filter may keep state across chunks.

use async_trait::async_trait;
use serde_json::Value;

use crate::auth::Identity;
use crate::error::GatewayError;
use crate::protocol::{Chunk, CompletionRequest};

/// What a hook knows about the request it runs for.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub identity: Identity,
    /// `/v1/completions` over `rest` or `websocket`.
    pub route: &'static str,
    pub transport: &'static str,
}

/// The `cache-key` hook's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheKeyDecision {
    /// Use this key (the default key, or a plugin's own).
    Key(String),
    /// Do not read or write the cache for this request.
    Bypass,
}

/// A token filter's answer for one piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenAction {
    /// Send the text unchanged.
    Pass,
    /// Send this text instead.
    Replace(String),
    /// Send nothing now; the filter keeps the text and emits it later
    /// (with a later `Replace`, or from `finish`).
    Hold,
    /// Send this text, then end the response with `finish_reason: "stop"`.
    Stop(String),
}

/// One stateful filter over the text of one response.
#[async_trait]
pub trait TokenFilter: Send {
    /// Called with each chunk's text for choice `index`.
    async fn on_text(&mut self, index: u32, text: &str) -> Result<TokenAction, GatewayError>;
    /// Called when choice `index` ends; returns held text to send.
    async fn finish(&mut self, index: u32) -> Result<String, GatewayError>;
}

#[async_trait]
pub trait Policy: Send + Sync + 'static {
    /// `on-request`: may rewrite the request in place, or reject it.
    async fn on_request(
        &self,
        _ctx: &RequestContext,
        _request: &mut CompletionRequest,
    ) -> Result<(), GatewayError> {
        Ok(())
    }

    /// `cache-key`: may replace the default key or bypass the cache.
    async fn cache_key(
        &self,
        _ctx: &RequestContext,
        _request: &CompletionRequest,
        default_key: String,
    ) -> Result<CacheKeyDecision, GatewayError> {
        Ok(CacheKeyDecision::Key(default_key))
    }

    /// `on-token`: the filters for one response, in chain order.
    fn token_filters(&self, _ctx: &RequestContext) -> Vec<Box<dyn TokenFilter>> {
        Vec::new()
    }
}

/// The policy of a gateway without plugins.
pub struct NoPolicy;

impl Policy for NoPolicy {}

/// What applying the filters to one chunk produced.
pub enum Filtered {
    Chunk(Chunk),
    /// Everything in the chunk was held back.
    Skip,
    /// The chunk to send last: a filter stopped the response.
    Stop(Chunk),
}

/// The token filters of one response, applied to each chunk in order.
pub struct FilterChain {
    filters: Vec<Box<dyn TokenFilter>>,
    /// Choices that have already been finished (flushed).
    finished: Vec<u32>,
}

impl FilterChain {
    pub fn new(filters: Vec<Box<dyn TokenFilter>>) -> Self {
        Self {
            filters,
            finished: Vec::new(),
        }
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
            if !current.is_empty() {
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
        if self.filters.is_empty() {
            return Ok(Filtered::Chunk(chunk));
        }
        #[derive(serde::Deserialize)]
        struct Peek<'a> {
            #[serde(borrow, default)]
            choices: Vec<PeekChoice<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct PeekChoice<'a> {
            #[serde(default)]
            index: u32,
            #[serde(borrow, default)]
            text: std::borrow::Cow<'a, str>,
            #[serde(default)]
            finish_reason: Option<serde::de::IgnoredAny>,
        }
        let Ok(peek) = serde_json::from_slice::<Peek>(chunk.payload_slice()) else {
            return Ok(Filtered::Chunk(chunk));
        };
        if peek.choices.is_empty() {
            return Ok(Filtered::Chunk(chunk));
        }
        let mut outputs = Vec::with_capacity(peek.choices.len());
        let mut changed = false;
        let mut stopped = false;
        for choice in &peek.choices {
            let finishing = choice.finish_reason.is_some();
            let (filtered, stop) = self.run(choice.index, &choice.text, finishing).await?;
            if finishing || stop {
                self.finished.push(choice.index);
            }
            changed |= stop || filtered != choice.text;
            stopped |= stop;
            outputs.push((filtered, finishing, stop));
        }
        if !changed {
            return Ok(Filtered::Chunk(chunk));
        }
        if outputs
            .iter()
            .all(|(text, finishing, stop)| text.is_empty() && !finishing && !stop)
        {
            return Ok(Filtered::Skip);
        }
        // Rare path: rebuild the chunk with the filtered texts.
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(chunk.payload_slice())
        else {
            return Ok(Filtered::Chunk(chunk));
        };
        if let Some(Value::Array(choices)) = body.get_mut("choices") {
            for (choice, (text, _, stop)) in choices.iter_mut().zip(outputs) {
                if let Value::Object(choice) = choice {
                    choice.insert("text".into(), Value::String(text));
                    if stop {
                        choice.insert("finish_reason".into(), Value::from("stop"));
                    }
                }
            }
        }
        let rebuilt = Chunk::from_payload(&serde_json::to_vec(&body).unwrap_or_default());
        Ok(if stopped {
            Filtered::Stop(rebuilt)
        } else {
            Filtered::Chunk(rebuilt)
        })
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
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(template.payload_slice())
        else {
            return Ok(None);
        };
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
            if !text.is_empty() {
                out.push(serde_json::json!({"index": index, "text": text, "logprobs": null, "finish_reason": null, "stop_reason": null}));
            }
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
}
