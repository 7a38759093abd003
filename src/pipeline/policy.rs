//! The policy phases the pipeline calls at its three hook points, in the
//! pingora style: one trait whose methods default to "do nothing", so the
//! pipeline never special-cases the absence of plugins. The WebAssembly
//! plugin host implements it.
//!
//! Token filtering is per stream: [`Policy::token_filters`] hands out fresh
//! filters for each response, so a filter may keep state across chunks.

use async_trait::async_trait;

use crate::error::GatewayError;
use crate::protocol::InferenceRequest;
use crate::tenancy::Identity;

/// What a hook knows about the request it runs for.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub identity: Identity,
    /// The route's path: `/v1/completions` or `/v1/chat/completions`.
    pub route: &'static str,
    pub transport: &'static str,
    /// The request's trace context: hooks' spans are children of its span.
    pub trace: opentelemetry::Context,
    /// A batch line, or a client waiting.
    pub lane: crate::backends::queue::Lane,
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

/// One streamed piece of a tool call of a chat answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolCallPiece<'a> {
    /// The call's `index` among the message's tool calls.
    pub call_index: u32,
    /// `function.name`, on the piece that starts the call.
    pub name: Option<&'a str>,
    /// This piece of `function.arguments`.
    pub arguments: &'a str,
}

/// A filter's answer for one tool-call piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCallAction {
    /// Send the piece unchanged.
    Pass,
    /// Send these arguments instead.
    Replace(String),
    /// Drop the chunk's tool calls, send this text as its content and end
    /// the response with `finish_reason: "stop"`.
    Stop(String),
}

/// One stateful filter over the text of one response.
#[async_trait]
pub trait TokenFilter: Send {
    /// Called with each chunk's text for choice `index`.
    async fn on_text(&mut self, index: u32, text: &str) -> Result<TokenAction, GatewayError>;

    /// The texts of several consecutive chunks of choice `index` at once (a
    /// cached answer): the same as `on_text` on each in order, returning one
    /// action per text, or fewer ending with the `Stop` that ended them.
    async fn on_texts(
        &mut self,
        index: u32,
        texts: &[&str],
    ) -> Result<Vec<TokenAction>, GatewayError> {
        on_each_text(self, index, texts).await
    }

    /// Called when choice `index` ends; returns held text to send.
    async fn finish(&mut self, index: u32) -> Result<String, GatewayError>;

    /// Whether the filter reads chunk text at all (a filter of tool calls
    /// only does not: its `on_text` is never called).
    fn filters_text(&self) -> bool {
        true
    }

    /// Whether the filter sees tool calls: without it they pass untouched.
    fn filters_tool_calls(&self) -> bool {
        false
    }

    /// Called with each piece of a tool call of choice `index`.
    async fn on_tool_call(
        &mut self,
        _index: u32,
        _piece: ToolCallPiece<'_>,
    ) -> Result<ToolCallAction, GatewayError> {
        Ok(ToolCallAction::Pass)
    }
}

/// `on_texts` done one `on_text` call at a time, stopping after a `Stop`.
pub async fn on_each_text<F: TokenFilter + ?Sized>(
    filter: &mut F,
    index: u32,
    texts: &[&str],
) -> Result<Vec<TokenAction>, GatewayError> {
    let mut actions = Vec::with_capacity(texts.len());
    for text in texts {
        let action = filter.on_text(index, text).await?;
        let stop = matches!(action, TokenAction::Stop(_));
        actions.push(action);
        if stop {
            break;
        }
    }
    Ok(actions)
}

#[async_trait]
pub trait Policy: Send + Sync + 'static {
    /// The request phase: `on-request` (may rewrite the request in place, or
    /// reject it), then, when the gateway has a cache (`cached`), `cache-key`
    /// on the rewritten request. Returns the cache key to use, or `None` to
    /// leave the cache alone. One method, so an implementation can share work
    /// between the two hooks.
    async fn admit(
        &self,
        _ctx: &RequestContext,
        request: &mut InferenceRequest,
        cached: bool,
    ) -> Result<Option<String>, GatewayError> {
        Ok(cached.then(|| request.default_cache_key()))
    }

    /// `on-token`: the filters for one response, in chain order.
    fn token_filters(&self, _ctx: &RequestContext) -> Vec<Box<dyn TokenFilter>> {
        Vec::new()
    }
}

/// The policy of a gateway without plugins.
pub struct NoPolicy;

impl Policy for NoPolicy {}
