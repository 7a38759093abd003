//! OpenAI's Responses API as vLLM serves it: `POST /v1/responses` (one
//! response object, or with `stream: true` its typed events, `event: <type>`
//! before each, ending with `response.completed`), and the stored
//! responses it names by id: `GET /v1/responses/{id}` and
//! `POST /v1/responses/{id}/cancel`.
//!
//! vLLM keeps a stored response (the default, `store: true`; a background
//! one always) in the memory of the replica that made it, under the
//! `request_id` of the request. Sluice sets that id itself (`resp_` and a
//! fresh UUID) so that it knows the id before the answer, and records which
//! replica holds it (see `backends::affinity`); a follow-up naming
//! `previous_response_id`, a retrieve or a cancel go to that replica.
//! Requests that depend on stored state are never cached.

use bytes::Bytes;
use serde_json::Value;

use super::Route;
use super::conversation::Api;
use super::forwarded::{ForwardedJson, invalid as bad};
use crate::error::GatewayError;

/// The events after which a Responses stream is over (vLLM sends no `[DONE]`).
const TERMINAL_EVENTS: [&[u8]; 4] = [
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"error",
];

/// A `POST /v1/responses` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsesRequest {
    json: ForwardedJson,
    stream: bool,
    store: bool,
    background: bool,
    previous_response_id: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f64>,
    /// The bytes of text in `input` and `instructions`.
    text_bytes: usize,
}

/// The bytes of text in an `input`: a string, or its items' `content` (a
/// string or parts with `text`) and function-call `output`s and `arguments`.
fn input_bytes(value: &Value) -> usize {
    match value {
        Value::String(text) => text.len(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.len(),
                Value::Object(fields) => ["content", "text", "output", "arguments"]
                    .iter()
                    .filter_map(|key| fields.get(*key))
                    .map(input_bytes)
                    .sum(),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

fn optional_bool(
    body: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<bool>, GatewayError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(bad(field, "must be a boolean")),
    }
}

impl ResponsesRequest {
    pub fn parse(raw: &[u8]) -> Result<Self, GatewayError> {
        let json = ForwardedJson::parse(raw)?;
        let body = json.body();
        let input = match body.get("input") {
            Some(input @ (Value::String(_) | Value::Array(_))) => input,
            Some(_) => return Err(bad("input", "must be a string or a list of input items")),
            None => return Err(GatewayError::BadRequest("`input` is required".into())),
        };
        let instructions = match body.get("instructions") {
            None | Some(Value::Null) => 0,
            Some(Value::String(text)) => text.len(),
            Some(_) => return Err(bad("instructions", "must be a string")),
        };
        let stream = optional_bool(body, "stream")?.unwrap_or(false);
        let store = optional_bool(body, "store")?.unwrap_or(true);
        let background = optional_bool(body, "background")?.unwrap_or(false);
        if background && !store {
            return Err(bad(
                "background",
                "background can only be used when `store` is true",
            ));
        }
        let previous_response_id = match body.get("previous_response_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
            Some(_) => return Err(bad("previous_response_id", "must be a response id")),
        };
        let max_output_tokens = match body.get("max_output_tokens") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n > 0 => Some(n),
                _ => return Err(bad("max_output_tokens", "must be a positive integer")),
            },
        };
        let temperature = match body.get("temperature") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value
                    .as_f64()
                    .ok_or_else(|| bad("temperature", "must be a number"))?,
            ),
        };
        let text_bytes = input_bytes(input) + instructions;
        Ok(Self {
            json,
            stream,
            store,
            background,
            previous_response_id,
            max_output_tokens,
            temperature,
            text_bytes,
        })
    }

    pub fn model(&self) -> &str {
        self.json.model()
    }

    pub fn is_stream(&self) -> bool {
        self.stream
    }

    pub fn is_background(&self) -> bool {
        self.background
    }

    /// The stored response this one continues, if any.
    pub fn previous_response_id(&self) -> Option<&str> {
        self.previous_response_id.as_deref()
    }

    /// Whether a replica will keep this response (vLLM stores it when its
    /// store is enabled): its id must be recorded with the replica.
    pub fn is_stored(&self) -> bool {
        self.store
    }

    /// Whether the answer depends on or leaves state on a replica: such a
    /// request is never answered from the cache.
    pub fn is_stateful(&self) -> bool {
        self.store || self.background || self.previous_response_id.is_some()
    }

    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_output_tokens
    }

    pub fn is_sampled(&self) -> bool {
        self.temperature.is_none_or(|t| t > 0.0)
    }

    pub fn temperature(&self) -> Option<f64> {
        self.temperature
    }

    pub fn text_bytes(&self) -> usize {
        self.text_bytes
    }

    /// The start of the conversation, for prefix routing: the instructions,
    /// or the first input's text.
    pub fn prefix_text(&self) -> String {
        let body = self.json.body();
        if let Some(Value::String(instructions)) = body.get("instructions") {
            return instructions.clone();
        }
        match body.get("input") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(items)) => match items.first().and_then(|i| i.get("content")) {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => parts
                    .first()
                    .and_then(|p| p.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            },
            _ => String::new(),
        }
    }

    pub fn set_model(&mut self, model: String) {
        self.json.set_model(model);
    }

    /// Names the response `id` upstream (vLLM's `request_id`, which becomes
    /// the response's id), replacing any the client set.
    pub fn set_response_id(&mut self, id: &str) {
        self.json
            .body_mut()
            .insert("request_id".into(), Value::String(id.to_string()));
    }

    pub fn upstream_body(&self) -> Bytes {
        self.json.upstream_body()
    }

    pub fn default_cache_key(&self) -> String {
        self.json.cache_key("openai-responses-v1")
    }

    pub fn to_json(&self) -> String {
        self.json.to_json()
    }
}

/// A request about a stored response: `GET /v1/responses/{id}` (with
/// vLLM's `stream` and `starting_after` query, for a background response's
/// events) or `POST /v1/responses/{id}/cancel`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponseRequest {
    route: Route,
    id: String,
    /// The model that made it (from the record of where it is held).
    model: String,
    stream: bool,
    starting_after: Option<u64>,
}

impl StoredResponseRequest {
    /// `route` is [`Route::ResponsesRetrieve`] or [`Route::ResponsesCancel`];
    /// `query` the retrieve's query string.
    pub fn new(route: Route, id: &str, query: Option<&str>) -> Result<Self, GatewayError> {
        if id.is_empty()
            || id.len() > 256
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(GatewayError::NotFound(format!(
                "Response with id '{}' not found.",
                id.chars().take(64).collect::<String>()
            )));
        }
        let mut stream = false;
        let mut starting_after = None;
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "stream" => stream = value == "true" || value == "1",
                "starting_after" => {
                    starting_after = Some(
                        value
                            .parse()
                            .map_err(|_| bad("starting_after", "must be a sequence number"))?,
                    )
                }
                _ => {}
            }
        }
        Ok(Self {
            route,
            id: id.to_string(),
            model: String::new(),
            stream: stream && route == Route::ResponsesRetrieve,
            starting_after,
        })
    }

    pub fn route(&self) -> Route {
        self.route
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn set_model(&mut self, model: String) {
        self.model = model;
    }

    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// What goes upstream: the retrieve's query (a GET has no body), or
    /// nothing for a cancel.
    pub fn upstream_body(&self) -> Bytes {
        let mut query = String::new();
        if self.stream {
            query.push_str("stream=true");
            if let Some(after) = self.starting_after {
                query.push_str(&format!("&starting_after={after}"));
            }
        }
        Bytes::from(query)
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({"response_id": self.id}).to_string()
    }
}

/// The `type` of a Responses event payload: vLLM writes OpenAI's event
/// models, whose `type` is their last field, so it is read from the end
/// (falling back to a parse when it is not there).
pub fn event_type(payload: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"type\":\"";
    if let Some(body) = payload.strip_suffix(b"\"}")
        && let Some(at) = memchr::memmem::rfind(body, KEY)
    {
        let value = &body[at + KEY.len()..];
        if !value.contains(&b'"') {
            return std::str::from_utf8(value).ok();
        }
    }
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(borrow, rename = "type")]
        kind: &'a str,
    }
    serde_json::from_slice::<Typed>(payload)
        .ok()
        .map(|t| t.kind)
}

/// Whether a Responses event ends its stream.
pub fn is_terminal_event(payload: &[u8]) -> bool {
    event_type(payload).is_some_and(|kind| TERMINAL_EVENTS.contains(&kind.as_bytes()))
}

super::conversation::impl_conversation!(ResponsesRequest, Api::Responses);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ResponsesRequest, String> {
        ResponsesRequest::parse(body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_what_it_routes_limits_and_stores_by() {
        let request = parse(
            r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"hello"}]}],"instructions":"be brief","max_output_tokens":32,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(request.model(), "m");
        assert!(request.is_stream() && request.is_stored() && request.is_stateful());
        assert_eq!(request.max_output_tokens(), Some(32));
        assert_eq!(request.text_bytes(), 13);
        assert_eq!(request.prefix_text(), "be brief");
        let stateless =
            parse(r#"{"model":"m","input":"hi","store":false,"temperature":0}"#).unwrap();
        assert!(!stateless.is_stateful() && !stateless.is_sampled());
        let follow_up =
            parse(r#"{"model":"m","input":"and?","store":false,"previous_response_id":"resp_1"}"#)
                .unwrap();
        assert!(follow_up.is_stateful());
        assert_eq!(follow_up.previous_response_id(), Some("resp_1"));
    }

    #[test]
    fn malformed_bodies_are_refused_naming_the_field() {
        for (body, field) in [
            (r#"{"input":"x"}"#, "`model`"),
            (r#"{"model":"m"}"#, "`input`"),
            (r#"{"model":"m","input":3}"#, "`input`"),
            (
                r#"{"model":"m","input":"x","background":true,"store":false}"#,
                "`background`",
            ),
            (
                r#"{"model":"m","input":"x","max_output_tokens":0}"#,
                "`max_output_tokens`",
            ),
            (r#"{"model":"m","input":"x","stream":"yes"}"#, "`stream`"),
        ] {
            let err = parse(body).unwrap_err();
            assert!(err.contains(field), "{body}: {err}");
        }
    }

    #[test]
    fn the_response_id_is_set_upstream() {
        let body = r#"{"model":"m","input":"x","request_id":"client-chosen"}"#;
        let mut request = parse(body).unwrap();
        assert_eq!(request.upstream_body(), body.as_bytes());
        request.set_response_id("resp_abc");
        let sent: Value = serde_json::from_slice(&request.upstream_body()).unwrap();
        assert_eq!(sent["request_id"], "resp_abc");
    }

    #[test]
    fn event_types_are_read_from_either_end() {
        let delta = br#"{"content_index":0,"delta":"Hi","item_id":"m","logprobs":[],"output_index":0,"sequence_number":3,"type":"response.output_text.delta"}"#;
        assert_eq!(event_type(delta), Some("response.output_text.delta"));
        assert!(!is_terminal_event(delta));
        let first = br#"{"type":"response.completed","response":{"id":"r","type":"x"}}"#;
        assert_eq!(event_type(first), Some("response.completed"));
        assert!(is_terminal_event(first));
        let error =
            br#"{"code":"500","message":"boom","param":null,"sequence_number":4,"type":"error"}"#;
        assert!(is_terminal_event(error));
    }

    #[test]
    fn stored_response_ids_and_queries_are_checked() {
        let get = StoredResponseRequest::new(
            Route::ResponsesRetrieve,
            "resp_1",
            Some("stream=true&starting_after=3"),
        )
        .unwrap();
        assert!(get.is_stream());
        assert_eq!(get.upstream_body(), "stream=true&starting_after=3");
        assert!(StoredResponseRequest::new(Route::ResponsesRetrieve, "../admin", None).is_err());
        let cancel = StoredResponseRequest::new(Route::ResponsesCancel, "resp_1", None).unwrap();
        assert!(!cancel.is_stream());
        assert!(cancel.upstream_body().is_empty());
    }
}
