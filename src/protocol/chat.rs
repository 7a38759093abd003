//! The vLLM/OpenAI chat wire format (`POST /v1/chat/completions`): the
//! request body sluice accepts (checked only as far as routing, caching and
//! plugins need; every other field passes through as sent) and the assembly
//! of a non-streaming chat response from stream chunks.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{RequestBody, ResponseHead, StreamOptions, parse_body};
use crate::error::GatewayError;

/// The roles vLLM's chat templates know.
pub const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A `POST /v1/chat/completions` body. Fields sluice does not know are kept
/// in `extra` and passed through to the upstream unchanged (`tools`,
/// `tool_choice`, `response_format`, `logprobs`, `chat_template_kwargs`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    #[serde(deserialize_with = "non_empty_messages")]
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One message of a conversation: its role and content are checked, every
/// other field (`name`, `tool_calls`, `tool_call_id`, ...) is kept as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    #[serde(deserialize_with = "known_role")]
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A message's content: a string, or a list of content parts (`text`,
/// `image_url`, `input_audio`, ...), each an object with a `type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

const CONTENT_SHAPE: &str =
    "content must be a string or an array of content parts (objects with a `type`)";

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(text) => Ok(Content::Text(text)),
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::Object(part) if part.get("type").is_some_and(Value::is_string) => {
                        Ok(part)
                    }
                    _ => Err(de::Error::custom(CONTENT_SHAPE)),
                })
                .collect::<Result<_, _>>()
                .map(Content::Parts),
            _ => Err(de::Error::custom(CONTENT_SHAPE)),
        }
    }
}

fn known_role<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let role = String::deserialize(deserializer)?;
    if ROLES.contains(&role.as_str()) {
        return Ok(role);
    }
    Err(de::Error::custom(format!(
        "unknown role `{role}`; expected one of {}",
        ROLES.join(", ")
    )))
}

fn non_empty_messages<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<ChatMessage>, D::Error> {
    let messages = Vec::<ChatMessage>::deserialize(deserializer)?;
    if messages.is_empty() {
        return Err(de::Error::custom("the conversation must not be empty"));
    }
    Ok(messages)
}

impl ChatMessage {
    /// The message's text: the string content, or its text parts joined
    /// with newlines (as vLLM's chat templates join them). `None` when it has
    /// no text (no content, or only image and audio parts).
    pub fn text(&self) -> Option<String> {
        match &self.content {
            Some(Content::Text(text)) => Some(text.clone()),
            Some(Content::Parts(parts)) => {
                let texts: Vec<&str> = parts.iter().filter_map(text_part).collect();
                (!texts.is_empty()).then(|| texts.join("\n"))
            }
            None => None,
        }
    }

    /// Replaces the message's text: string content becomes `text`; in a list
    /// of parts, the text parts give way to one text part holding `text`, at
    /// the place of the first (image and audio parts stay).
    pub fn set_text(&mut self, text: String) {
        match &mut self.content {
            Some(Content::Parts(parts)) if parts.iter().any(|p| text_part(p).is_some()) => {
                let first = parts.iter().position(|p| text_part(p).is_some());
                let mut kept = Vec::with_capacity(parts.len());
                for (i, part) in std::mem::take(parts).into_iter().enumerate() {
                    if Some(i) == first {
                        let mut replaced = Map::new();
                        replaced.insert("type".into(), Value::from("text"));
                        replaced.insert("text".into(), Value::from(text.clone()));
                        kept.push(replaced);
                    } else if text_part(&part).is_none() {
                        kept.push(part);
                    }
                }
                *parts = kept;
            }
            Some(Content::Parts(parts)) => {
                let mut part = Map::new();
                part.insert("type".into(), Value::from("text"));
                part.insert("text".into(), Value::from(text));
                parts.insert(0, part);
            }
            content => *content = Some(Content::Text(text)),
        }
    }
}

fn text_part(part: &Map<String, Value>) -> Option<&str> {
    match (part.get("type"), part.get("text")) {
        (Some(Value::String(kind)), Some(Value::String(text))) if kind == "text" => Some(text),
        _ => None,
    }
}

impl ChatRequest {
    /// Parses and validates a request body; every failure is a 400 that says what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let request: ChatRequest = parse_body(body)?;
        request.check_common()?;
        Ok(request)
    }

    /// The output limit the client set (`max_completion_tokens`, or the older `max_tokens`).
    pub fn output_limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

impl RequestBody for ChatRequest {
    const CACHE_NAMESPACE: &'static str = "chat-v1";

    fn model(&self) -> &str {
        &self.model
    }

    fn sampling(&self) -> (Option<u32>, Option<f64>, Option<f64>) {
        (self.n, self.temperature, self.top_p)
    }

    fn transport(&self) -> (Option<bool>, Option<&StreamOptions>) {
        (self.stream, self.stream_options.as_ref())
    }

    fn transport_mut(&mut self) -> (&mut Option<bool>, &mut Option<StreamOptions>) {
        (&mut self.stream, &mut self.stream_options)
    }
}

/// Accumulates chat stream chunks into the body vLLM returns for `stream: false`.
#[derive(Default)]
pub struct ChatAssembler {
    head: ResponseHead,
    choices: BTreeMap<u64, ChatChoiceAcc>,
}

#[derive(Default)]
struct ChatChoiceAcc {
    role: Option<String>,
    content: Option<String>,
    reasoning_content: Option<String>,
    tool_calls: BTreeMap<u64, ToolCallAcc>,
    logprobs: Option<Vec<Value>>,
    finish_reason: Value,
    stop_reason: Value,
}

#[derive(Default)]
struct ToolCallAcc {
    id: Value,
    kind: Value,
    name: String,
    arguments: String,
}

impl ChatAssembler {
    pub fn push(&mut self, payload: &[u8]) {
        for mut choice in self.head.read(payload) {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(index).or_default();
            if let Some(Value::Object(mut delta)) = choice.remove("delta") {
                if let Some(Value::String(role)) = delta.remove("role") {
                    acc.role = Some(role);
                }
                if let Some(Value::String(text)) = delta.remove("content") {
                    acc.content.get_or_insert_with(String::new).push_str(&text);
                }
                if let Some(Value::String(text)) = delta.remove("reasoning_content") {
                    let reasoning = acc.reasoning_content.get_or_insert_with(String::new);
                    reasoning.push_str(&text);
                }
                if let Some(Value::Array(calls)) = delta.remove("tool_calls") {
                    for call in calls {
                        acc.push_tool_call(call);
                    }
                }
            }
            if let Some(Value::Object(mut logprobs)) = choice.remove("logprobs")
                && let Some(Value::Array(content)) = logprobs.remove("content")
            {
                acc.logprobs.get_or_insert_with(Vec::new).extend(content);
            }
            if let Some(reason) = choice.remove("finish_reason").filter(|v| !v.is_null()) {
                acc.finish_reason = reason;
            }
            if let Some(reason) = choice.remove("stop_reason").filter(|v| !v.is_null()) {
                acc.stop_reason = reason;
            }
        }
    }

    /// The JSON body vLLM returns for a non-streaming chat request.
    pub fn finish(mut self) -> String {
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, acc)| {
                let tool_calls: Vec<Value> = acc
                    .tool_calls
                    .into_values()
                    .map(|call| {
                        serde_json::json!({
                            "id": call.id,
                            "type": if call.kind.is_null() { Value::from("function") } else { call.kind },
                            "function": {"name": call.name, "arguments": call.arguments},
                        })
                    })
                    .collect();
                // The role chunk's `""` is no content when the answer is a tool call.
                let content = acc
                    .content
                    .filter(|text| !text.is_empty() || tool_calls.is_empty());
                serde_json::json!({
                    "index": index,
                    "message": {
                        "role": acc.role.unwrap_or_else(|| "assistant".into()),
                        "reasoning_content": acc.reasoning_content,
                        "content": content,
                        "tool_calls": tool_calls,
                    },
                    "logprobs": acc.logprobs.map(|content| serde_json::json!({"content": content})),
                    "finish_reason": acc.finish_reason,
                    "stop_reason": acc.stop_reason,
                })
            })
            .collect();
        serde_json::json!({
            "id": self.head.id,
            "object": "chat.completion",
            "created": self.head.created,
            "model": self.head.model,
            "choices": choices,
            "service_tier": null,
            "system_fingerprint": null,
            "usage": self.head.take_usage(),
            "prompt_logprobs": null,
            "kv_transfer_params": null,
        })
        .to_string()
    }
}

impl ChatChoiceAcc {
    /// Adds one streamed tool-call piece: the first piece of a call carries
    /// its id, type and name; later pieces add to its arguments.
    fn push_tool_call(&mut self, call: Value) {
        let Value::Object(mut call) = call else {
            return;
        };
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let acc = self.tool_calls.entry(index).or_default();
        if let Some(id) = call.remove("id").filter(|v| !v.is_null()) {
            acc.id = id;
        }
        if let Some(kind) = call.remove("type").filter(|v| !v.is_null()) {
            acc.kind = kind;
        }
        if let Some(Value::Object(mut function)) = call.remove("function") {
            if let Some(Value::String(name)) = function.remove("name") {
                acc.name.push_str(&name);
            }
            if let Some(Value::String(arguments)) = function.remove("arguments") {
                acc.arguments.push_str(&arguments);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ChatRequest, String> {
        ChatRequest::parse(body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn keeps_every_field_and_content_form() {
        let body = r#"{"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"what is"},{"type":"image_url","image_url":{"url":"data:x"}},{"type":"text","text":"this?"}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"t1","type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","content":"42","tool_call_id":"t1"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"tool_choice":"auto",
            "response_format":{"type":"json_object"},"logprobs":true,"top_logprobs":2,"seed":1,
            "chat_template_kwargs":{"enable_thinking":false},"stream":true,"stream_options":{"include_usage":false}}"#;
        let request = parse(body).unwrap();
        assert_eq!(
            request.messages[1].text().as_deref(),
            Some("what is\nthis?")
        );
        assert_eq!(request.messages[2].text(), None);
        let upstream: Value = serde_json::from_slice(&request.upstream_body()).unwrap();
        let sent: Value = serde_json::from_str(body).unwrap();
        for field in [
            "tools",
            "tool_choice",
            "response_format",
            "logprobs",
            "top_logprobs",
            "seed",
            "chat_template_kwargs",
        ] {
            assert_eq!(upstream[field], sent[field], "{field}");
        }
        assert_eq!(upstream["messages"][1], sent["messages"][1]);
        assert_eq!(upstream["messages"][3], sent["messages"][3]);
        assert_eq!(upstream["stream_options"]["include_usage"], true);
    }

    #[test]
    fn refuses_bad_conversations_naming_the_field() {
        let cases = [
            (r#"{"model":"m"}"#, "messages"),
            (r#"{"model":"m","messages":[]}"#, "`messages`"),
            (r#"{"model":"m","messages":"hi"}"#, "`messages`"),
            (r#"{"model":"m","messages":[{"content":"x"}]}"#, "role"),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                "`messages[0].role`",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                "`messages[0].content`",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"text":"no type"}]}]}"#,
                "`messages[0].content`",
            ),
        ];
        for (body, field) in cases {
            let err = parse(body).unwrap_err();
            assert!(err.contains(field), "{body}: {err}");
        }
    }

    #[test]
    fn replacing_text_keeps_image_parts() {
        let mut message: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        message.set_text("redacted".into());
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            serde_json::json!({"role":"user","content":[{"type":"text","text":"redacted"},{"type":"image_url","image_url":{"url":"u"}}]})
        );
        let mut plain: ChatMessage =
            serde_json::from_str(r#"{"role":"user","content":"a","name":"n"}"#).unwrap();
        plain.set_text("b".into());
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"role":"user","content":"b","name":"n"})
        );
    }

    #[test]
    fn assembles_content_tool_calls_and_usage() {
        let mut asm = ChatAssembler::default();
        for chunk in [
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"id":"call-1","type":"function","index":0,"function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": "}}]},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Oslo\"}"}}]},"logprobs":null,"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":5,"model":"m","choices":[],"usage":{"prompt_tokens":3,"total_tokens":7,"completion_tokens":4}}"#,
        ] {
            asm.push(chunk.as_bytes());
        }
        let body: Value = serde_json::from_str(&asm.finish()).unwrap();
        assert_eq!(body["object"], "chat.completion");
        let message = &body["choices"][0]["message"];
        assert_eq!(message["role"], "assistant");
        assert_eq!(message["content"], Value::Null);
        assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            r#"{"city": "Oslo"}"#
        );
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(body["usage"]["completion_tokens"], 4);
    }
}
