//! OpenAI's Files and Batch APIs over HTTP: `/v1/files` (multipart upload,
//! list, retrieve, content, delete) and `/v1/batches` (create, list,
//! retrieve, cancel). Each handler authenticates and hands the operation
//! to [`crate::batch::Batches`]; an upload is written to the store as it
//! arrives and a file's content is streamed from it.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::Edge;
use crate::batch::{Batches, NewBatch, Page, content_stream};
use crate::error::GatewayError;
use crate::tenancy::Identity;
use crate::tenancy::auth::presented_secret;

/// The purposes a file may be uploaded for.
const PURPOSES: [&str; 1] = ["batch"];

async fn caller(state: &Edge, headers: &HeaderMap) -> Result<(Identity, Arc<Batches>), Response> {
    let Some(batches) = state.batches.clone() else {
        return Err(
            GatewayError::NotFound("batches are not enabled on this gateway".into())
                .into_response(),
        );
    };
    match state
        .stages
        .auth
        .authenticate(presented_secret(headers, None))
        .await
    {
        Ok(identity) => Ok((identity, batches)),
        Err(err) => Err(err.into_response()),
    }
}

fn answer(result: Result<Value, crate::batch::BatchError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(err) => GatewayError::from(err).into_response(),
    }
}

macro_rules! authenticated {
    ($state:expr, $headers:expr) => {
        match caller(&$state, &$headers).await {
            Ok(found) => found,
            Err(response) => return response,
        }
    };
}

/// `POST /v1/files`: a multipart form with `file` and `purpose`.
pub async fn upload(State(state): State<Arc<Edge>>, headers: HeaderMap, body: Body) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    match receive(&state, &batches, &identity, &headers, body).await {
        Ok(value) => Json(value).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn receive(
    state: &Edge,
    batches: &Batches,
    identity: &Identity,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, GatewayError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        GatewayError::BadRequest("a file upload is a multipart/form-data body".into())
    })?;
    let mut form = multer::Multipart::new(body.into_data_stream(), boundary);
    let idle = state.server.body_timeout;
    let bad =
        |err: multer::Error| GatewayError::BadRequest(format!("invalid multipart body: {err}"));
    let mut purpose = None;
    let mut written = None;
    loop {
        let field = tokio::time::timeout(idle, form.next_field())
            .await
            .map_err(|_| GatewayError::RequestTimeout(idle))?
            .map_err(bad)?;
        let Some(mut field) = field else { break };
        match field.name() {
            Some("purpose") => {
                let text = tokio::time::timeout(idle, field.text())
                    .await
                    .map_err(|_| GatewayError::RequestTimeout(idle))?
                    .map_err(bad)?;
                purpose = Some(text.trim().to_string());
            }
            Some("file") if written.is_none() => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let mut writer = batches.begin_upload(identity, &filename).await?;
                loop {
                    let chunk = match tokio::time::timeout(idle, field.chunk()).await {
                        Ok(Ok(Some(chunk))) => chunk,
                        Ok(Ok(None)) => break,
                        Ok(Err(err)) => {
                            writer.abort().await;
                            return Err(bad(err));
                        }
                        Err(_) => {
                            writer.abort().await;
                            return Err(GatewayError::RequestTimeout(idle));
                        }
                    };
                    if let Err(err) = writer.write(&chunk).await {
                        writer.abort().await;
                        return Err(err.into());
                    }
                }
                written = Some(writer);
            }
            // Other fields (`expires_after[...]`) are accepted and ignored.
            _ => {}
        }
    }
    let Some(writer) = written else {
        return Err(GatewayError::BadRequest(
            "missing required parameter: 'file'".into(),
        ));
    };
    let purpose = match purpose {
        Some(purpose) if PURPOSES.contains(&purpose.as_str()) => purpose,
        other => {
            writer.abort().await;
            return Err(GatewayError::BadRequest(format!(
                "invalid value for `purpose`: {}; sluice keeps files for batches ('batch')",
                other.map_or("none given".to_string(), |p| format!("'{p}'"))
            )));
        }
    };
    let record = writer.finish(&purpose).await?;
    batches
        .file_json(identity, &record.id)
        .await
        .map_err(Into::into)
}

pub async fn list_files(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    answer(batches.list_files(&identity, &page).await)
}

pub async fn file(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    answer(batches.file_json(&identity, &id).await)
}

pub async fn delete_file(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    answer(batches.delete_file(&identity, &id).await)
}

/// `GET /v1/files/{id}/content`: streamed from the store a part at a time.
pub async fn file_content(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    let file = match batches.file(&identity, &id).await {
        Ok(file) => file,
        Err(err) => return GatewayError::from(err).into_response(),
    };
    let mut response =
        Body::from_stream(content_stream(batches.store().clone(), file.id)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(length) = HeaderValue::from_str(&file.bytes.to_string()) {
        headers.insert(header::CONTENT_LENGTH, length);
    }
    response
}

pub async fn create_batch(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    let new: NewBatch = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(err) => {
            return GatewayError::BadRequest(format!("invalid batch request: {err}"))
                .into_response();
        }
    };
    answer(batches.create(&identity, new).await)
}

pub async fn list_batches(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    answer(batches.list_batches(&identity, &page).await)
}

pub async fn batch(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    answer(batches.batch_json(&identity, &id).await)
}

pub async fn cancel_batch(
    State(state): State<Arc<Edge>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (identity, batches) = authenticated!(state, headers);
    answer(batches.cancel(&identity, &id).await)
}
