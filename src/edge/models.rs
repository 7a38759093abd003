//! `GET /v1/models`: the models the caller may use, in OpenAI's list shape.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use super::Edge;
use crate::tenancy::auth::presented_secret;

pub async fn list(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    let state = &edge.stages;
    let request_id = super::new_request_id();
    let answer = async {
        let identity = state
            .auth
            .authenticate(presented_secret(&headers, None))
            .await?;
        state.models.list_for(&identity).await
    };
    let response = match answer.await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => err.into_response(),
    };
    super::with_request_id(response, &request_id)
}
