//! Assembling the body vLLM returns for `stream: false` from the stream's
//! chunks (sluice always streams from vLLM, so one path serves both).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::Route;

/// Accumulates stream chunks into the body vLLM returns for `stream: false`.
pub enum ResponseAssembler {
    Completion(CompletionAssembler),
    Chat(ChatAssembler),
    /// A route answered with one JSON body: that body, as it came.
    Whole(Option<bytes::Bytes>),
}

impl ResponseAssembler {
    pub fn new(route: Route) -> Self {
        match route {
            Route::Completions => Self::Completion(CompletionAssembler::default()),
            Route::ChatCompletions => Self::Chat(ChatAssembler::default()),
            _ => Self::Whole(None),
        }
    }

    pub fn push(&mut self, payload: &[u8]) {
        match self {
            Self::Completion(asm) => asm.push(payload),
            Self::Chat(asm) => asm.push(payload),
            Self::Whole(body) => *body = Some(bytes::Bytes::copy_from_slice(payload)),
        }
    }

    /// Adds a chunk; a whole answer's body is kept without a copy.
    pub fn push_chunk(&mut self, chunk: &super::Chunk) {
        match self {
            Self::Whole(body) => *body = Some(chunk.payload()),
            _ => self.push(chunk.payload_slice()),
        }
    }

    /// The body, as bytes (a whole answer's without a copy).
    pub fn finish_bytes(self) -> bytes::Bytes {
        match self {
            Self::Whole(body) => body.unwrap_or_default(),
            other => bytes::Bytes::from(other.finish()),
        }
    }

    pub fn finish(self) -> String {
        match self {
            Self::Completion(asm) => asm.finish(),
            Self::Chat(asm) => asm.finish(),
            Self::Whole(body) => String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
        }
    }
}

/// Accumulates completion stream chunks into the body vLLM returns for `stream: false`.
#[derive(Default)]
pub struct CompletionAssembler {
    head: ResponseHead,
    choices: BTreeMap<u64, ChoiceAcc>,
}

/// What every chunk of a response repeats (kept from the first) and the usage.
#[derive(Default)]
pub(crate) struct ResponseHead {
    pub id: String,
    pub created: i64,
    pub model: String,
    usage: Option<Value>,
}

impl ResponseHead {
    /// Reads a chunk's envelope; returns its choices, as objects.
    pub fn read(&mut self, payload: &[u8]) -> Vec<Map<String, Value>> {
        let Ok(Value::Object(mut chunk)) = serde_json::from_slice::<Value>(payload) else {
            return Vec::new();
        };
        if self.id.is_empty() {
            if let Some(Value::String(id)) = chunk.remove("id") {
                self.id = id;
            }
            self.created = chunk.get("created").and_then(Value::as_i64).unwrap_or(0);
            if let Some(Value::String(model)) = chunk.remove("model") {
                self.model = model;
            }
        }
        if let Some(usage) = chunk.remove("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage);
        }
        match chunk.remove("choices") {
            Some(Value::Array(choices)) => choices
                .into_iter()
                .filter_map(|choice| match choice {
                    Value::Object(choice) => Some(choice),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The usage as vLLM's non-streaming body has it (zeros if none came).
    pub fn take_usage(&mut self) -> Value {
        let mut usage = self.usage.take().unwrap_or_else(
            || serde_json::json!({"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0}),
        );
        if let Value::Object(fields) = &mut usage {
            fields.entry("prompt_tokens_details").or_insert(Value::Null);
        }
        usage
    }
}

#[derive(Default)]
struct ChoiceAcc {
    text: String,
    logprobs: Option<LogprobsAcc>,
    finish_reason: Value,
    stop_reason: Value,
    token_ids: Option<Vec<Value>>,
    prompt_token_ids: Value,
}

#[derive(Default, Serialize)]
struct LogprobsAcc {
    text_offset: Vec<Value>,
    token_logprobs: Vec<Value>,
    tokens: Vec<Value>,
    top_logprobs: Vec<Value>,
}

impl CompletionAssembler {
    pub fn push(&mut self, payload: &[u8]) {
        for mut choice in self.head.read(payload) {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(index).or_default();
            if let Some(Value::String(text)) = choice.get("text") {
                acc.text.push_str(text);
            }
            if let Some(Value::Object(mut lp)) = choice.remove("logprobs") {
                let logprobs = acc.logprobs.get_or_insert_with(Default::default);
                let mut take = |name: &str, into: &mut Vec<Value>| {
                    if let Some(Value::Array(items)) = lp.remove(name) {
                        into.extend(items);
                    }
                };
                take("text_offset", &mut logprobs.text_offset);
                take("token_logprobs", &mut logprobs.token_logprobs);
                take("tokens", &mut logprobs.tokens);
                take("top_logprobs", &mut logprobs.top_logprobs);
            }
            if let Some(reason) = choice.remove("finish_reason").filter(|v| !v.is_null()) {
                acc.finish_reason = reason;
            }
            if let Some(reason) = choice.remove("stop_reason").filter(|v| !v.is_null()) {
                acc.stop_reason = reason;
            }
            if let Some(Value::Array(ids)) = choice.remove("token_ids") {
                acc.token_ids.get_or_insert_with(Vec::new).extend(ids);
            }
            if let Some(ids) = choice.remove("prompt_token_ids").filter(|v| !v.is_null()) {
                acc.prompt_token_ids = ids;
            }
        }
    }

    /// The JSON body vLLM returns for `stream: false`, fields in vLLM's order.
    pub fn finish(mut self) -> String {
        #[derive(Serialize)]
        struct Body {
            id: String,
            object: &'static str,
            created: i64,
            model: String,
            choices: Vec<ChoiceOut>,
            service_tier: Option<()>,
            system_fingerprint: Option<()>,
            usage: Value,
            kv_transfer_params: Option<()>,
        }
        #[derive(Serialize)]
        struct ChoiceOut {
            index: u64,
            text: String,
            logprobs: Option<LogprobsAcc>,
            finish_reason: Value,
            stop_reason: Value,
            token_ids: Option<Vec<Value>>,
            prompt_logprobs: Option<()>,
            prompt_token_ids: Value,
        }
        let choices = self
            .choices
            .into_iter()
            .map(|(index, acc)| ChoiceOut {
                index,
                text: acc.text,
                logprobs: acc.logprobs,
                finish_reason: acc.finish_reason,
                stop_reason: acc.stop_reason,
                token_ids: acc.token_ids,
                prompt_logprobs: None,
                prompt_token_ids: acc.prompt_token_ids,
            })
            .collect();
        let usage = self.head.take_usage();
        serde_json::to_string(&Body {
            id: self.head.id,
            object: "text_completion",
            created: self.head.created,
            model: self.head.model,
            choices,
            service_tier: None,
            system_fingerprint: None,
            usage,
            kv_transfer_params: None,
        })
        .unwrap_or_default()
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

    #[test]
    fn assembles_text_logprobs_and_usage() {
        let mut asm = CompletionAssembler::default();
        asm.push(br#"{"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"a","logprobs":{"text_offset":[0],"token_logprobs":[-1.0],"tokens":["a"],"top_logprobs":[{"a":-1.0}]},"finish_reason":null,"stop_reason":null}],"usage":null}"#);
        asm.push(br#"{"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"b","logprobs":{"text_offset":[1],"token_logprobs":[-2.0],"tokens":["b"],"top_logprobs":[{"b":-2.0}]},"finish_reason":"length","stop_reason":null}],"usage":null}"#);
        asm.push(br#"{"id":"c","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2}}"#);
        let body: Value = serde_json::from_str(&asm.finish()).unwrap();
        assert!(body.to_string().len() > 10);
        assert_eq!(body["choices"][0]["text"], "ab");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(
            body["choices"][0]["logprobs"]["tokens"],
            serde_json::json!(["a", "b"])
        );
        assert_eq!(body["usage"]["completion_tokens"], 2);
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
