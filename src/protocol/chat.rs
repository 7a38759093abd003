//! The vLLM/OpenAI chat wire format (`POST /v1/chat/completions`): the
//! request body sluice accepts (checked only as far as routing, caching and
//! plugins need; every other field passes through as sent).

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{RequestBody, StreamOptions, parse_body};
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
}
