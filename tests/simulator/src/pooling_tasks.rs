//! vLLM's other pooling routes: `/classify` (a label and class
//! probabilities per input), `/pooling` (the pooled vector per input, as
//! `/v1/embeddings` pools it) and Cohere's embed API `/v2/embed` (vectors by
//! type: `float`, `base64`, `binary`, `ubinary`). Inputs, vectors and token
//! counts are those of `pooling`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use serde_json::{Value, json};

use crate::SimState;
use crate::pooling::{Input, bad_request, embedding, inputs, list_answer};
use crate::routes::admit;

/// The labels of the simulated classifier, as its `id2label` would name them.
const LABELS: [&str; 2] = ["negative", "positive"];

fn tokens(inputs: &[Input]) -> usize {
    inputs.iter().map(Input::tokens).sum()
}

#[derive(Serialize)]
struct ClassificationData {
    index: usize,
    label: Option<&'static str>,
    probs: Vec<f64>,
    num_classes: usize,
}

#[derive(Serialize)]
struct PoolingData {
    index: usize,
    object: &'static str,
    data: Vec<f64>,
}

/// The admitted request's id, body and inputs, or the response that refused it.
fn admitted(
    state: &SimState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, Value, Vec<Input>), Box<Response>> {
    let (request_id, body) = admit(state, headers, body, false)?;
    let inputs = inputs(&body)?;
    Ok((request_id, body, inputs))
}

pub(crate) async fn classify(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, _, inputs) = match admitted(&state, &headers, &body) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let model = state.config.model.as_str();
    let data: Vec<ClassificationData> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let logit = f64::from(embedding(model, &input.key(), 8)[0]) * 8.0;
            let positive = 1.0 / (1.0 + (-logit).exp());
            let probs = vec![1.0 - positive, positive];
            ClassificationData {
                index,
                label: Some(LABELS[usize::from(positive > 0.5)]),
                probs,
                num_classes: LABELS.len(),
            }
        })
        .collect();
    list_answer(&state, "classify", &request_id, data, tokens(&inputs))
}

pub(crate) async fn pooling(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, _, inputs) = match admitted(&state, &headers, &body) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let model = state.config.model.as_str();
    let dimensions = state.config.embedding_dimensions;
    let data: Vec<PoolingData> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| PoolingData {
            index,
            object: "pooling",
            data: embedding(model, &input.key(), dimensions)
                .into_iter()
                .map(f64::from)
                .collect(),
        })
        .collect();
    list_answer(&state, "pool", &request_id, data, tokens(&inputs))
}

/// Bits of a vector, positive as 1, packed eight to a byte, most significant
/// first (numpy's `packbits`); signed bytes have 128 taken off.
fn packed(vector: &[f32], signed: bool) -> Vec<i64> {
    vector
        .chunks(8)
        .map(|bits| {
            let byte = bits
                .iter()
                .enumerate()
                .fold(0u8, |acc, (i, &x)| acc | (u8::from(x >= 0.0) << (7 - i)));
            i64::from(byte) - if signed { 128 } else { 0 }
        })
        .collect()
}

/// Cohere's embed API as vLLM serves it: `texts`, `images` or `inputs`; the
/// vectors under each of `embedding_types` (default `float`).
pub(crate) async fn cohere_embed(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, false) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let given: Vec<&str> = ["texts", "images", "inputs"]
        .into_iter()
        .filter(|f| {
            body.get(*f)
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
        })
        .collect();
    let [field] = given[..] else {
        return bad_request(
            "Exactly one of texts, images, or inputs must be provided, and it must be non-empty",
            None,
        );
    };
    let items = body[field].as_array().map_or(&[][..], Vec::as_slice);
    // A text, an image's URI, or an input's text parts.
    let keys: Vec<String> = items
        .iter()
        .map(|item| match item {
            Value::String(text) => text.clone(),
            other => other
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect();
    let dimensions = body
        .get("output_dimension")
        .and_then(Value::as_u64)
        .map_or(state.config.embedding_dimensions, |d| d as usize)
        .clamp(1, state.config.embedding_dimensions);
    let model = state.config.model.as_str();
    let vectors: Vec<Vec<f32>> = keys
        .iter()
        .map(|k| embedding(model, k, dimensions))
        .collect();
    let types: Vec<String> = body
        .get("embedding_types")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_else(|| vec!["float".into()]);
    let mut embeddings = ByType::default();
    for kind in &types {
        let value = match kind.as_str() {
            "float" => json!(
                vectors
                    .iter()
                    .map(|v| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            ),
            "base64" => json!(
                vectors
                    .iter()
                    .map(|v| {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        base64::engine::general_purpose::STANDARD.encode(bytes)
                    })
                    .collect::<Vec<_>>()
            ),
            "binary" | "ubinary" if dimensions % 8 == 0 => {
                json!(
                    vectors
                        .iter()
                        .map(|v| packed(v, kind == "binary"))
                        .collect::<Vec<_>>()
                )
            }
            "binary" | "ubinary" => {
                return bad_request(
                    &format!(
                        "Embedding dimension must be a multiple of 8 for binary embedding types, but got {dimensions}."
                    ),
                    Some("embedding_types"),
                );
            }
            other => {
                return bad_request(
                    &format!("unknown embedding type {other:?}"),
                    Some("embedding_types"),
                );
            }
        };
        match kind.as_str() {
            "float" => embeddings.float = Some(value),
            "binary" => embeddings.binary = Some(value),
            "ubinary" => embeddings.ubinary = Some(value),
            _ => embeddings.base64 = Some(value),
        }
    }
    let tokens: usize = keys.iter().map(String::len).sum();
    let texts = (field == "texts").then(|| body["texts"].clone());
    state.record(|r| r.completed.push(request_id.clone()));
    axum::Json(CohereEmbedResponse {
        id: format!("embd-{request_id}"),
        embeddings,
        texts,
        meta: Meta {
            api_version: json!({"version": "2"}),
            billed_units: BilledUnits {
                input_tokens: tokens,
                image_tokens: None,
            },
        },
        response_type: "embeddings_by_type",
    })
    .into_response()
}

/// vLLM's `CohereEmbedResponse`, fields in its order.
#[derive(Serialize)]
struct CohereEmbedResponse {
    id: String,
    embeddings: ByType,
    texts: Option<Value>,
    meta: Meta,
    response_type: &'static str,
}

#[derive(Serialize, Default)]
struct ByType {
    float: Option<Value>,
    binary: Option<Value>,
    ubinary: Option<Value>,
    base64: Option<Value>,
}

#[derive(Serialize)]
struct Meta {
    api_version: Value,
    billed_units: BilledUnits,
}

#[derive(Serialize)]
struct BilledUnits {
    input_tokens: usize,
    image_tokens: Option<usize>,
}
