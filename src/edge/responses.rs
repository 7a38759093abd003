//! The Responses API's stored responses: `GET /v1/responses/{id}` (the
//! response, or with `?stream=true` a background response's events) and
//! `POST /v1/responses/{id}/cancel`, through the same pipeline as every
//! request (auth, limits, the owner check, the queue) to the replica that
//! holds the response; and the watch over a background response, which
//! counts and logs it when it ends.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::Edge;
use super::completions::{Incoming, serve};
use crate::backends::queue::{QueuedRequest, ResponseEvent};
use crate::pipeline::Completion;
use crate::pipeline::state::Stages;
use crate::protocol::{FORM_CONTENT_TYPE, InferenceRequest, Route, StoredResponseRequest, Usage};

pub async fn retrieve(
    State(state): State<Arc<Edge>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let route = Route::ResponsesRetrieve;
    let request = StoredResponseRequest::new(route, &id, query.as_deref())
        .map(InferenceRequest::StoredResponse);
    serve(state, route, headers, Incoming::Named(request)).await
}

pub async fn cancel(
    State(state): State<Arc<Edge>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let route = Route::ResponsesCancel;
    let request =
        StoredResponseRequest::new(route, &id, None).map(InferenceRequest::StoredResponse);
    serve(state, route, headers, Incoming::Named(request)).await
}

/// What the watch reads of a response object.
#[derive(Deserialize)]
struct Progress {
    id: String,
    status: String,
    #[serde(default)]
    usage: Option<Usage>,
}

fn finished(status: &str) -> bool {
    !matches!(status, "queued" | "in_progress")
}

/// Holds a background response's record until the response ends, asking
/// its replica (through the queue, as a retrieve) every
/// `responses.background_poll_ms`; then records its usage and status, and
/// drops the record, which settles the key's limits and writes the
/// inference log. Gives up (recording what it knows) when the replica can
/// no longer be asked, or after `responses.ttl_secs`.
pub(super) fn watch_background(stages: &Arc<Stages>, mut completion: Completion, answer: &Bytes) {
    let Ok(progress) = serde_json::from_slice::<Progress>(answer) else {
        return;
    };
    if finished(&progress.status) {
        completion.record.usage = progress.usage;
        return;
    }
    let stages = stages.clone();
    let record = &completion.record;
    let asking = (
        format!("{}-poll", record.request_id),
        record.model.clone(),
        record.trace.headers(),
    );
    tokio::spawn(async move {
        let poll = stages.settings.background_poll;
        let deadline = tokio::time::Instant::now() + stages.settings.background_ttl;
        let mut outcome = Err(504);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(poll).await;
            match ask(&stages, &asking, &progress.id).await {
                Ok(Some(now)) if finished(&now.status) => {
                    outcome = Ok(now);
                    break;
                }
                Ok(_) => {}
                Err(status) => {
                    outcome = Err(status);
                    break;
                }
            }
        }
        conclude(completion, &progress.id, outcome);
    });
}

/// Records how a background response ended; dropping the record reports it.
fn conclude(mut completion: Completion, id: &str, outcome: Result<Progress, u16>) {
    match outcome {
        Ok(progress) => {
            completion.record.usage = progress.usage;
            completion.record.status = if progress.status == "failed" {
                500
            } else {
                200
            };
        }
        Err(status) => {
            completion.record.status = status;
            tracing::warn!(response_id = %id, status, "lost track of a background response; its tokens are not counted");
        }
    }
    drop(completion);
}

/// The response as its replica has it now (`None`: not readable yet), or
/// the status of the error that ends the watch.
async fn ask(
    stages: &Stages,
    (request_id, model, trace): &(String, String, Vec<(String, String)>),
    id: &str,
) -> Result<Option<Progress>, u16> {
    let mut request = QueuedRequest::new(
        request_id.clone(),
        model.clone(),
        Route::ResponsesRetrieve,
        Bytes::new(),
        trace.clone(),
    );
    request.buffered = true;
    request.content_type = Some(FORM_CONTENT_TYPE.to_string());
    request.pinned_to = Some(id.to_string());
    let mut responses = match stages.queue.submit(request).await {
        Ok(responses) => responses,
        // The queue is full or down for now: ask again later.
        Err(_) => return Ok(None),
    };
    let mut body = None;
    loop {
        match responses.next().await {
            ResponseEvent::Chunk(chunk) => body = Some(chunk.payload()),
            ResponseEvent::Done(_) => break,
            ResponseEvent::Error(info) if info.status == 404 || info.status == 503 => {
                return Err(info.status);
            }
            ResponseEvent::Error(_) => return Ok(None),
        }
    }
    Ok(body.and_then(|body| serde_json::from_slice(&body).ok()))
}
