//! vLLM's embedding and tokenizer routes: `/v1/embeddings` (OpenAI's shape,
//! `float` or `base64`), `/tokenize` and `/detokenize` (rerank and score,
//! which compare embeddings, are in `scoring`).
//!
//! Tokens here are UTF-8 bytes (id = byte + 3, as byte-level tokenizers
//! number them after their special tokens), so `/detokenize` inverts
//! `/tokenize` exactly and any text has a known count. Embeddings are unit
//! vectors drawn from a hash of the model and the input: the same input
//! always gets the same vector, different inputs different ones.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use serde_json::{Value, json};

use crate::SimState;
use crate::generation::chat_template;
use crate::routes::{admit, error_with_param};
use crate::stream::AbortGuard;

/// Token ids below this are the tokenizer's special tokens.
const FIRST_BYTE_ID: u64 = 3;

/// `text` as this simulator's tokenizer splits it.
pub(crate) fn tokenize(text: &str) -> Vec<u64> {
    text.bytes().map(|b| u64::from(b) + FIRST_BYTE_ID).collect()
}

fn detokenize(tokens: &[u64]) -> Result<String, u64> {
    let bytes = tokens
        .iter()
        .map(|&id| {
            id.checked_sub(FIRST_BYTE_ID)
                .and_then(|b| u8::try_from(b).ok())
                .ok_or(id)
        })
        .collect::<Result<Vec<u8>, u64>>()?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub(crate) fn bad_request(message: &str, param: Option<&str>) -> Response {
    error_with_param(StatusCode::BAD_REQUEST, "BadRequestError", message, param)
}

/// One embedding input: text, or token ids (embedded as the text they stand for).
pub(crate) enum Input {
    Text(String),
    Tokens(Vec<u64>),
}

impl Input {
    pub(crate) fn tokens(&self) -> usize {
        match self {
            Input::Text(text) => text.len(),
            Input::Tokens(tokens) => tokens.len(),
        }
    }

    pub(crate) fn key(&self) -> String {
        match self {
            Input::Text(text) => text.clone(),
            Input::Tokens(tokens) => detokenize(tokens).unwrap_or_default(),
        }
    }
}

fn token_list(value: &Value) -> Option<Vec<u64>> {
    value.as_array()?.iter().map(Value::as_u64).collect()
}

/// The inputs of an embeddings request, as vLLM accepts them: `input` as a
/// string, a list of strings, a list of token ids or a list of such lists;
/// or a chat conversation (`messages`, or `input` holding messages), one
/// input of its messages' text.
pub(crate) fn inputs(body: &Value) -> Result<Vec<Input>, Box<Response>> {
    let messages = body
        .get("messages")
        .or_else(|| body.get("input").filter(|input| is_chat(input)));
    if let Some(messages) = messages {
        let messages = messages.as_array().map_or(&[][..], Vec::as_slice);
        return Ok(vec![Input::Text(chat_template(messages))]);
    }
    let invalid = || {
        Box::new(bad_request(
            "`input` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            Some("input"),
        ))
    };
    match body.get("input") {
        None => Err(Box::new(bad_request(
            "Field required: input",
            Some("input"),
        ))),
        Some(Value::String(text)) => Ok(vec![Input::Text(text.clone())]),
        Some(Value::Array(items)) if items.is_empty() => Err(Box::new(bad_request(
            "`input` must not be empty",
            Some("input"),
        ))),
        Some(Value::Array(items)) => {
            if let Some(tokens) = token_list(&Value::Array(items.clone())) {
                return Ok(vec![Input::Tokens(tokens)]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(Input::Text(text.clone())),
                    other => token_list(other).map(Input::Tokens).ok_or_else(invalid),
                })
                .collect()
        }
        Some(_) => Err(invalid()),
    }
}

fn is_chat(value: &Value) -> bool {
    value.as_array().is_some_and(|items| {
        !items.is_empty()
            && items
                .iter()
                .all(|m| m.get("role").is_some_and(Value::is_string))
    })
}

/// A unit vector of `dimensions` drawn from a hash of the model and `key`.
pub(crate) fn embedding(model: &str, key: &str, dimensions: usize) -> Vec<f32> {
    let mut hasher = std::hash::DefaultHasher::new();
    (model, key).hash(&mut hasher);
    let mut state = hasher.finish() | 1;
    let mut vector: Vec<f32> = (0..dimensions)
        .map(|_| {
            // xorshift64: cheap, deterministic, good enough to tell inputs apart.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

pub(crate) async fn embeddings(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, false) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let inputs = match inputs(&body) {
        Ok(inputs) => inputs,
        Err(response) => return *response,
    };
    // A slow model: the answer waits; a client gone meanwhile is recorded as an abort.
    if let Some(ms) = body.get("sim_first_token_delay_ms").and_then(Value::as_u64) {
        let mut guard = AbortGuard::new(state.clone(), request_id.clone());
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        guard.finished = true;
    }
    let format = body
        .get("encoding_format")
        .and_then(Value::as_str)
        .unwrap_or("float");
    if !matches!(format, "float" | "base64") {
        return bad_request(
            &format!("encoding_format {format:?} is not supported by this simulator"),
            Some("encoding_format"),
        );
    }
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => state.config.embedding_dimensions,
        Some(value) => match value.as_u64().and_then(|d| usize::try_from(d).ok()) {
            Some(d) if (1..=state.config.embedding_dimensions).contains(&d) => d,
            _ => {
                return bad_request(
                    &format!(
                        "dimensions must be between 1 and {}",
                        state.config.embedding_dimensions
                    ),
                    Some("dimensions"),
                );
            }
        },
    };
    let limit = u64::from(state.config.max_model_len);
    if let Some(long) = inputs.iter().find(|i| i.tokens() as u64 > limit) {
        return bad_request(
            &format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens in the input for embedding generation. Please reduce the length of the input.",
                long.tokens()
            ),
            Some("input"),
        );
    }
    let model = &state.config.model;
    let prompt_tokens: usize = inputs.iter().map(Input::tokens).sum();
    let data: Vec<EmbeddingData> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding(model, &input.key(), dimensions);
            let embedding = match format {
                "base64" => {
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
                // Python floats: the f32 values widened, as vLLM's tolist() gives them.
                _ => Value::Array(vector.iter().map(|&x| json!(f64::from(x))).collect()),
            };
            EmbeddingData {
                index,
                object: "embedding",
                embedding,
            }
        })
        .collect();
    list_answer(&state, "embd", &request_id, data, prompt_tokens)
}

/// vLLM's list answers (`EmbeddingResponse`, `ScoreResponse`,
/// `ClassificationResponse`, `PoolingResponse`), fields in its order (`id` first).
#[derive(Serialize)]
struct ListResponse<'a, T> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    data: Vec<T>,
    usage: PoolingUsage,
}

/// A list answer named `<prefix>-<request id>`, as vLLM names it, with the
/// request counted as completed.
pub(crate) fn list_answer<T: Serialize>(
    state: &SimState,
    prefix: &str,
    request_id: &str,
    data: Vec<T>,
    prompt_tokens: usize,
) -> Response {
    state.record(|r| r.completed.push(request_id.to_string()));
    axum::Json(ListResponse {
        id: format!("{prefix}-{request_id}"),
        object: "list",
        created: crate::unix_now(),
        model: &state.config.model,
        data,
        usage: PoolingUsage::of(prompt_tokens),
    })
    .into_response()
}

#[derive(Serialize)]
pub(crate) struct EmbeddingData {
    index: usize,
    object: &'static str,
    embedding: Value,
}

/// vLLM's `UsageInfo` as a pooling answer fills it.
#[derive(Serialize)]
pub(crate) struct PoolingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    prompt_tokens_details: Option<Value>,
}

impl PoolingUsage {
    pub(crate) fn of(prompt_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens,
            completion_tokens: 0,
            prompt_tokens_details: None,
        }
    }
}

/// vLLM's `TokenizeResponse`.
#[derive(Serialize)]
struct TokenizeResponse {
    count: usize,
    max_model_len: u32,
    tokens: Vec<u64>,
    token_strs: Option<Vec<String>>,
}

pub(crate) async fn tokenize_route(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, false) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let text = match (body.get("prompt"), body.get("messages")) {
        (Some(Value::String(prompt)), _) => prompt.clone(),
        (_, Some(Value::Array(messages))) if is_chat(&body["messages"]) => chat_template(messages),
        _ => return bad_request("Field required: prompt or messages", Some("prompt")),
    };
    let tokens = tokenize(&text);
    let token_strs = body
        .get("return_token_strs")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        .then(|| {
            text.bytes()
                .map(|b| String::from_utf8_lossy(&[b]).into_owned())
                .collect::<Vec<_>>()
        });
    state.record(|r| r.completed.push(request_id.clone()));
    axum::Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.config.max_model_len,
        tokens,
        token_strs,
    })
    .into_response()
}

pub(crate) async fn detokenize_route(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, false) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let Some(tokens) = body.get("tokens").and_then(token_list) else {
        return bad_request(
            "Field required: tokens (a list of token ids)",
            Some("tokens"),
        );
    };
    let prompt = match detokenize(&tokens) {
        Ok(prompt) => prompt,
        Err(id) => {
            return bad_request(
                &format!("token id {id} is out of vocabulary"),
                Some("tokens"),
            );
        }
    };
    state.record(|r| r.completed.push(request_id.clone()));
    axum::Json(json!({"prompt": prompt})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detokenize_inverts_tokenize() {
        let text = "héllo, wörld";
        assert_eq!(detokenize(&tokenize(text)).unwrap(), text);
        assert_eq!(detokenize(&[2]), Err(2));
    }

    #[test]
    fn embeddings_are_unit_vectors_that_tell_inputs_apart() {
        let a = embedding("m", "a", 64);
        let b = embedding("m", "b", 64);
        assert_eq!(a, embedding("m", "a", 64));
        assert_ne!(a, b);
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
}
