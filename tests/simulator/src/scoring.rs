//! vLLM's scoring routes: rerank (`/rerank`, `/v1/rerank`, `/v2/rerank`:
//! the documents by relevance to a query) and score (`/score`, `/v1/score`:
//! a score for each pair of two sides). Relevance is the cosine of the
//! simulator's embeddings, squashed into (0, 1); token counts are UTF-8
//! bytes, as in `pooling`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::SimState;
use crate::pooling::{bad_request, embedding, list_answer};
use crate::routes::admit;

/// The texts of one side of a score: a string, multimodal content (its text
/// parts), or a list of those.
fn side(value: &Value) -> Option<Vec<String>> {
    let one = |item: &Value| match item {
        Value::String(text) => Some(text.clone()),
        Value::Object(object) => object
            .get("content")
            .and_then(Value::as_array)
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
        _ => None,
    };
    match value {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Array(_) => None,
        item => one(item).map(|text| vec![text]),
    }
}

/// How relevant `document` is to `query`, in (0, 1): the cosine of their
/// embeddings, squashed, as a cross-encoder's sigmoid output would be.
fn relevance(model: &str, query: &str, document: &str) -> f64 {
    let (q, d) = (embedding(model, query, 64), embedding(model, document, 64));
    let cosine: f32 = q.iter().zip(&d).map(|(a, b)| a * b).sum();
    1.0 / (1.0 + (-4.0 * f64::from(cosine)).exp())
}

/// The pairs a score or rerank request asks for: one query against every
/// document, or the two sides pairwise.
fn pairs(queries: &[String], documents: &[String]) -> Result<Vec<(usize, usize)>, String> {
    match (queries.len(), documents.len()) {
        (1, n) => Ok((0..n).map(|i| (0, i)).collect()),
        (m, n) if m == n => Ok((0..n).map(|i| (i, i)).collect()),
        (m, n) => Err(format!(
            "Input lengths must be either 1:1, 1:N or N:N, got {m}:{n}"
        )),
    }
}

/// vLLM's `RerankResponse`, fields in its order.
#[derive(Serialize)]
struct RerankResponse<'a> {
    id: String,
    model: &'a str,
    usage: RerankUsage,
    results: Vec<RerankResult>,
}

#[derive(Serialize)]
struct RerankUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct RerankResult {
    index: usize,
    document: RerankDocument,
    relevance_score: f64,
}

#[derive(Serialize)]
struct RerankDocument {
    text: Option<String>,
    multi_modal: Option<Value>,
}

#[derive(Serialize)]
struct ScoreData {
    index: usize,
    object: &'static str,
    score: f64,
}

/// `/rerank`, `/v1/rerank` and `/v2/rerank`: the documents by relevance to
/// the query, most relevant first, `top_n` of them when set.
pub(crate) async fn rerank(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, false) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let Some(query) = body.get("query").and_then(side).filter(|q| q.len() == 1) else {
        return bad_request("Field required: query (a string)", Some("query"));
    };
    let Some(documents) = body.get("documents").and_then(side) else {
        return bad_request("Field required: documents", Some("documents"));
    };
    let top_n = body.get("top_n").and_then(Value::as_u64).unwrap_or(0) as usize;
    let model = state.config.model.as_str();
    let mut results: Vec<RerankResult> = documents
        .iter()
        .enumerate()
        .map(|(index, document)| {
            let original = &body["documents"];
            let item = original.as_array().map_or(original, |items| &items[index]);
            RerankResult {
                index,
                document: match item {
                    Value::String(text) => RerankDocument {
                        text: Some(text.clone()),
                        multi_modal: None,
                    },
                    other => RerankDocument {
                        text: None,
                        multi_modal: Some(other.get("content").cloned().unwrap_or(json!([]))),
                    },
                },
                relevance_score: relevance(model, &query[0], document),
            }
        })
        .collect();
    results.sort_by(|a, b| b.relevance_score.total_cmp(&a.relevance_score));
    if top_n > 0 && top_n < results.len() {
        results.truncate(top_n);
    }
    let prompt_tokens = documents.iter().map(|d| query[0].len() + d.len()).sum();
    state.record(|r| r.completed.push(request_id.clone()));
    axum::Json(RerankResponse {
        id: format!("score-{request_id}"),
        model,
        usage: RerankUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
        results,
    })
    .into_response()
}

/// `/score` and `/v1/score`: a score for each pair of the two sides.
pub(crate) async fn score(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request_id, body) = match admit(&state, &headers, &body, false) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let spellings = [
        ("queries", "documents"),
        ("queries", "items"),
        ("data_1", "data_2"),
        ("text_1", "text_2"),
    ];
    let Some((first, second)) = spellings
        .into_iter()
        .find(|(a, b)| body.get(*a).is_some() && body.get(*b).is_some())
    else {
        return bad_request("Field required: text_1 and text_2", Some("text_1"));
    };
    let (Some(queries), Some(documents)) = (side(&body[first]), side(&body[second])) else {
        return bad_request(
            "both sides must be strings or lists of strings",
            Some(first),
        );
    };
    let pairs = match pairs(&queries, &documents) {
        Ok(pairs) => pairs,
        Err(message) => return bad_request(&message, Some(second)),
    };
    let model = state.config.model.as_str();
    let data: Vec<ScoreData> = pairs
        .iter()
        .enumerate()
        .map(|(index, &(q, d))| ScoreData {
            index,
            object: "score",
            score: relevance(model, &queries[q], &documents[d]),
        })
        .collect();
    let prompt_tokens = pairs
        .iter()
        .map(|&(q, d)| queries[q].len() + documents[d].len())
        .sum();
    list_answer(&state, "score", &request_id, data, prompt_tokens)
}
