//! Anthropic's Messages API as vLLM serves it: `POST /v1/messages` (one
//! JSON message, or with `stream: true` Anthropic's typed events) and
//! `POST /v1/messages/count_tokens`. Sluice reads what it routes, limits,
//! caches and logs by (`model`, `max_tokens`, `stream`, `temperature`, the
//! text of `system` and `messages`) and forwards the client's bytes, changing
//! only `model` for an alias. vLLM checks the rest (tools, content blocks).

use bytes::Bytes;
use serde_json::Value;

use super::Route;
use super::conversation::Api;
use super::forwarded::{ForwardedJson, invalid as bad};
use crate::error::GatewayError;

/// A Messages or count-tokens request.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesRequest {
    route: Route,
    json: ForwardedJson,
    stream: bool,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    /// The bytes of text in `system` and the messages' text blocks.
    text_bytes: usize,
}

/// The bytes of text in a `content` or `system` value: a string, or the
/// `text` of its blocks (tool results' text too).
fn text_bytes(value: &Value) -> usize {
    match value {
        Value::String(text) => text.len(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|block| {
                block
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, str::len)
                    + block.get("content").map_or(0, text_bytes)
            })
            .sum(),
        _ => 0,
    }
}

impl MessagesRequest {
    /// Parses and checks a body sent to `route` (`/v1/messages` or its count_tokens).
    pub fn parse(route: Route, raw: &[u8]) -> Result<Self, GatewayError> {
        let json = ForwardedJson::parse(raw)?;
        let body = json.body();
        let messages = match body.get("messages") {
            Some(Value::Array(messages)) => messages,
            Some(_) => return Err(bad("messages", "must be a list of messages")),
            None => return Err(GatewayError::BadRequest("`messages` is required".into())),
        };
        let mut text = body.get("system").map_or(0, text_bytes);
        for (i, message) in messages.iter().enumerate() {
            let role = message.get("role").and_then(Value::as_str);
            let content = message.get("content");
            match (role, content) {
                (Some(_), Some(content @ (Value::String(_) | Value::Array(_)))) => {
                    text += text_bytes(content);
                }
                (None, _) => return Err(bad(&format!("messages[{i}].role"), "is required")),
                (Some(_), _) => {
                    return Err(bad(
                        &format!("messages[{i}].content"),
                        "must be a string or a list of content blocks",
                    ));
                }
            }
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(_) => return Err(bad("stream", "must be a boolean")),
        };
        let max_tokens = match (route, body.get("max_tokens")) {
            (Route::MessagesCountTokens, _) => None,
            (_, Some(value)) => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n > 0 => Some(n),
                _ => return Err(bad("max_tokens", "must be a positive integer")),
            },
            (_, None) => return Err(GatewayError::BadRequest("`max_tokens` is required".into())),
        };
        let temperature = match body.get("temperature") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value
                    .as_f64()
                    .ok_or_else(|| bad("temperature", "must be a number"))?,
            ),
        };
        Ok(Self {
            route,
            json,
            stream,
            max_tokens,
            temperature,
            text_bytes: text,
        })
    }

    pub fn route(&self) -> Route {
        self.route
    }

    pub fn model(&self) -> &str {
        self.json.model()
    }

    pub fn is_stream(&self) -> bool {
        self.stream
    }

    pub fn max_tokens(&self) -> Option<u32> {
        self.max_tokens
    }

    /// Whether the answer is a sample (no temperature 0): only a count of
    /// tokens is always the same.
    pub fn is_sampled(&self) -> bool {
        self.route == Route::Messages && self.temperature.is_none_or(|t| t > 0.0)
    }

    pub fn temperature(&self) -> Option<f64> {
        self.temperature
    }

    pub fn text_bytes(&self) -> usize {
        self.text_bytes
    }

    /// The text of the first `system` or message content, for prefix routing.
    pub fn prefix_text(&self) -> String {
        let body = self.json.body();
        let first = body
            .get("system")
            .or_else(|| body.get("messages")?.get(0)?.get("content"));
        match first {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(blocks)) => blocks
                .first()
                .and_then(|b| b.get("text"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        }
    }

    /// Sends the request for `model` instead (an alias resolved).
    pub fn set_model(&mut self, model: String) {
        self.json.set_model(model);
    }

    pub fn upstream_body(&self) -> Bytes {
        self.json.upstream_body()
    }

    /// A digest of the body (`stream` included: a stream of events and one
    /// message are different answers), in the Messages API's own namespace.
    pub fn default_cache_key(&self) -> String {
        self.json.cache_key(match self.route {
            Route::MessagesCountTokens => "anthropic-count-v1",
            _ => "anthropic-messages-v1",
        })
    }

    pub fn to_json(&self) -> String {
        self.json.to_json()
    }
}

super::conversation::impl_conversation!(MessagesRequest, Api::Messages);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(route: Route, body: &str) -> Result<MessagesRequest, String> {
        MessagesRequest::parse(route, body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_what_it_routes_and_limits_by() {
        let request = parse(
            Route::Messages,
            r#"{"model":"m","max_tokens":64,"stream":true,"system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hello"}]}]}"#,
        )
        .unwrap();
        assert_eq!(request.model(), "m");
        assert!(request.is_stream());
        assert_eq!(request.max_tokens(), Some(64));
        assert_eq!(request.text_bytes(), 13);
        assert!(request.is_sampled());
        assert_eq!(request.prefix_text(), "be brief");
        let count = parse(
            Route::MessagesCountTokens,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert!(!count.is_sampled());
    }

    #[test]
    fn malformed_bodies_are_refused_naming_the_field() {
        for (body, field) in [
            (r#"{"max_tokens":1,"messages":[]}"#, "`model`"),
            (r#"{"model":"m","max_tokens":1}"#, "`messages`"),
            (r#"{"model":"m","messages":[]}"#, "`max_tokens`"),
            (
                r#"{"model":"m","max_tokens":0,"messages":[]}"#,
                "`max_tokens`",
            ),
            (
                r#"{"model":"m","max_tokens":1,"messages":[{"content":"x"}]}"#,
                "`messages[0].role`",
            ),
            (
                r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":3}]}"#,
                "`messages[0].content`",
            ),
        ] {
            let err = parse(Route::Messages, body).unwrap_err();
            assert!(err.contains(field), "{body}: {err}");
        }
    }

    #[test]
    fn the_body_goes_upstream_unchanged_unless_the_model_is_set() {
        let body = r#"{"model":"alias", "max_tokens":8,"messages":[{"role":"user","content":"x"}],"temperature":0}"#;
        let mut request = parse(Route::Messages, body).unwrap();
        assert!(!request.is_sampled());
        assert_eq!(request.upstream_body(), body.as_bytes());
        request.set_model("real".into());
        let sent: Value = serde_json::from_slice(&request.upstream_body()).unwrap();
        assert_eq!(sent["model"], "real");
        assert!(
            request
                .default_cache_key()
                .starts_with("anthropic-messages-v1:")
        );
    }
}
