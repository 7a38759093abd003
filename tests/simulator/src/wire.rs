//! vLLM's streamed chunk shapes, fields in vLLM's order.

use axum::body::Bytes;
use serde::Serialize;
use serde_json::Value;

/// A chat stream chunk, fields in vLLM's order (`id` first, as clients and
/// the gateway's renaming of cached chunks expect).
#[derive(Serialize)]
pub(crate) struct ChatChunk<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: [ChatStreamChoice; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(crate) struct ChatStreamChoice {
    pub(crate) index: u32,
    pub(crate) delta: Delta,
    pub(crate) logprobs: Value,
    pub(crate) finish_reason: Option<&'static str>,
    /// Present (as `null`) on the last chunk of a choice only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stop_reason: Option<Value>,
}

#[derive(Serialize)]
pub(crate) struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Serialize)]
pub(crate) struct ToolCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<&'static str>,
    pub(crate) index: u32,
    pub(crate) function: FunctionDelta,
}

#[derive(Serialize)]
pub(crate) struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    pub(crate) arguments: String,
}

#[derive(Serialize, Clone)]
pub(crate) struct Logprobs {
    pub(crate) text_offset: Vec<u64>,
    pub(crate) token_logprobs: Vec<f64>,
    pub(crate) tokens: Vec<String>,
    pub(crate) top_logprobs: Vec<std::collections::BTreeMap<String, f64>>,
}

#[derive(Serialize)]
pub(crate) struct StreamChoice {
    pub(crate) index: u32,
    pub(crate) text: String,
    pub(crate) logprobs: Option<Logprobs>,
    pub(crate) finish_reason: Option<&'static str>,
    pub(crate) stop_reason: Option<Value>,
    pub(crate) prompt_token_ids: Option<Vec<u32>>,
    pub(crate) token_ids: Option<Vec<u32>>,
}

#[derive(Serialize, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) total_tokens: u64,
    pub(crate) completion_tokens: u64,
}

#[derive(Serialize)]
pub(crate) struct StreamChunk<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: Vec<StreamChoice>,
    pub(crate) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(crate) struct UsageChunk<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: [(); 0],
    pub(crate) usage: Usage,
}

pub(crate) fn sse(payload: &impl Serialize) -> Bytes {
    let mut out = b"data: ".to_vec();
    let _ = serde_json::to_writer(&mut out, payload);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
