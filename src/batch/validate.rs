//! A batch's input file checked line by line before any line runs: each
//! line is OpenAI's batch request (`custom_id`, `method`, `url`, `body`),
//! its `url` the batch's endpoint, its body a request that route accepts,
//! its model one the key may use. Valid lines are stored as the batch's
//! items as they are read; one bad line fails the batch with an `errors`
//! list naming the lines, and nothing is sent upstream.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::BatchError;
use super::files::Lines;
use crate::backends::store::Store;
use crate::backends::store::batches::{BatchRecord, NewItem};
use crate::pipeline::state::Stages;
use crate::protocol::{InferenceRequest, Route};
use crate::tenancy::Identity;

/// Lines inserted at once.
const INSERT_EVERY: usize = 500;
/// Errors listed for one batch (OpenAI's lists are short too).
const MAX_ERRORS: usize = 100;

#[derive(Deserialize)]
struct Line<'a> {
    custom_id: Option<String>,
    method: Option<String>,
    url: Option<String>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
}

/// What checking a batch's input found.
pub enum Checked {
    /// Every line is valid and stored; this many.
    Valid(i64),
    /// OpenAI's `BatchError`s.
    Invalid(Vec<Value>),
}

fn error(code: &str, line: Option<i32>, param: Option<&str>, message: impl Into<String>) -> Value {
    json!({"code": code, "line": line, "param": param, "message": message.into()})
}

pub async fn check(
    store: &std::sync::Arc<dyn Store>,
    stages: &Stages,
    batch: &BatchRecord,
    route: Route,
    identity: &Identity,
    max_requests: u32,
) -> Result<Checked, BatchError> {
    // A runner that died half-way through left some lines behind.
    store.delete_items(&batch.id).await?;
    if store.find_file(&batch.input_file_id).await?.is_none() {
        return Ok(Checked::Invalid(vec![error(
            "file_not_found",
            None,
            Some("input_file_id"),
            format!("The input file {} no longer exists.", batch.input_file_id),
        )]));
    }
    let mut lines = Lines::new(store.clone(), batch.input_file_id.clone());
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut pending = Vec::with_capacity(INSERT_EVERY);
    let mut total: i64 = 0;
    while let Some((number, text)) = lines.next().await? {
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        total += 1;
        if total > i64::from(max_requests) {
            errors.push(error(
                "too_many_requests",
                Some(number),
                None,
                format!("The batch has more than batch.max_requests ({max_requests}) requests."),
            ));
            break;
        }
        match check_line(stages, route, identity, number, &text, &mut seen) {
            Ok(item) if errors.is_empty() => {
                pending.push(item);
                if pending.len() == INSERT_EVERY {
                    store.insert_items(&batch.id, &pending).await?;
                    pending.clear();
                }
            }
            Ok(_) => {}
            Err(err) => {
                errors.push(err);
                if errors.len() == MAX_ERRORS {
                    break;
                }
            }
        }
    }
    if total == 0 && errors.is_empty() {
        errors.push(error(
            "empty_file",
            None,
            Some("input_file_id"),
            "The input file has no requests.",
        ));
    }
    if !errors.is_empty() {
        store.delete_items(&batch.id).await?;
        return Ok(Checked::Invalid(errors));
    }
    store.insert_items(&batch.id, &pending).await?;
    Ok(Checked::Valid(total))
}

fn check_line(
    stages: &Stages,
    route: Route,
    identity: &Identity,
    number: i32,
    text: &[u8],
    seen: &mut HashSet<String>,
) -> Result<NewItem, Value> {
    let fail = |code: &str, param: Option<&str>, message: String| {
        error(code, Some(number), param, message)
    };
    let line: Line = serde_json::from_slice(text).map_err(|err| {
        fail(
            "invalid_json_line",
            None,
            format!("This line is not parseable as valid JSON: {err}."),
        )
    })?;
    let missing = |param: &str| {
        fail(
            "missing_required_parameter",
            Some(param),
            format!("Missing required parameter: '{param}'."),
        )
    };
    let custom_id = line.custom_id.ok_or_else(|| missing("custom_id"))?;
    let method = line.method.ok_or_else(|| missing("method"))?;
    let url = line.url.ok_or_else(|| missing("url"))?;
    let body = line.body.ok_or_else(|| missing("body"))?;
    if !method.eq_ignore_ascii_case("POST") {
        return Err(fail(
            "invalid_method",
            Some("method"),
            format!("The method '{method}' is not supported; batch requests are POST."),
        ));
    }
    if url != route.path() {
        return Err(fail(
            "invalid_url",
            Some("url"),
            format!(
                "The URL '{url}' does not match the batch's endpoint '{}'.",
                route.path()
            ),
        ));
    }
    if !seen.insert(custom_id.clone()) {
        return Err(fail(
            "duplicate_custom_id",
            Some("custom_id"),
            format!("The custom_id '{custom_id}' is used by an earlier line; each must be unique."),
        ));
    }
    let request = InferenceRequest::parse(route, body.get().as_bytes())
        .map_err(|err| fail("invalid_request", Some("body"), err.to_string()))?;
    if request.is_stream() {
        return Err(fail(
            "invalid_request",
            Some("body.stream"),
            "Streaming is not available in a batch; leave `stream` out or false.".into(),
        ));
    }
    let model = request.model();
    let resolved = stages
        .models
        .resolve(model)
        .map_err(|err| fail("model_not_found", Some("body.model"), err.to_string()))?;
    let allowed = identity.allows_model(model)
        || (!resolved.pool.is_empty() && identity.allows_model(&resolved.pool));
    if !allowed {
        return Err(fail(
            "model_not_allowed",
            Some("body.model"),
            format!("This API key may not use the model '{model}'."),
        ));
    }
    Ok(NewItem {
        line: number,
        custom_id,
        body: body.get().as_bytes().to_vec(),
    })
}
