//! Resuming a stream: `GET /v1/streams/{id}` (with `Last-Event-ID`, as an
//! `EventSource` sends it when it reconnects, or `?after=N`), and the same
//! on the route the stream came from, `POST` with `Last-Event-ID:
//! <id>.<n>` (the body is not read). The client gets the events after the
//! one it names, then the rest as it is generated, with no second
//! generation. Only the key that made the stream may resume it; any other
//! gets the 404 an unknown id gets.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::Edge;
use super::completions::{sse_body, sse_events};
use crate::backends::replay::ReplayError;
use crate::error::GatewayError;
use crate::pipeline::resumable::Events;
use crate::protocol::Route;
use crate::tenancy::Identity;
use crate::tenancy::auth::presented_secret;

/// The header an SSE client sends when it reconnects.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// `GET /v1/streams/{id}`.
pub async fn stream(
    State(state): State<Arc<Edge>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let request_id = super::new_request_id();
    let response = match after_named(&id, &headers, query.as_deref()) {
        Ok(after) => resume(&state, &headers, &id, after, None).await,
        Err(err) => err.into_response(),
    };
    super::with_request_id(response, &request_id)
}

/// The stream and event a `Last-Event-ID: <id>.<n>` names, if it does.
pub fn named_in(headers: &HeaderMap) -> Option<(String, u64)> {
    let value = headers.get(LAST_EVENT_ID)?.to_str().ok()?;
    let (id, n) = value.trim().rsplit_once('.')?;
    let n = n.parse().ok()?;
    (!id.is_empty()).then(|| (id.to_string(), n))
}

/// The last event the client saw of stream `id`: `Last-Event-ID` (`<id>.<n>`
/// or `<n>`), else `?after=N`, else none (from the start).
fn after_named(id: &str, headers: &HeaderMap, query: Option<&str>) -> Result<u64, GatewayError> {
    let bad = |what: &str| GatewayError::BadRequest(format!("invalid {what} to resume after"));
    if let Some(value) = headers.get(LAST_EVENT_ID) {
        let value = value.to_str().map_err(|_| bad("Last-Event-ID"))?.trim();
        let n = match value.rsplit_once('.') {
            Some((named, _)) if named != id => {
                return Err(GatewayError::BadRequest(format!(
                    "Last-Event-ID names stream '{named}', not '{id}'"
                )));
            }
            Some((_, n)) => n,
            None => value,
        };
        return n.parse().map_err(|_| bad("Last-Event-ID"));
    }
    let after = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "after")
        .map(|(_, value)| value.parse().map_err(|_| bad("`after`")));
    after.unwrap_or(Ok(0))
}

/// Answers with the events of stream `id` after the `after`-th, for the
/// key `headers` present. `route`: the route the client resumes on (its
/// errors' shape), when it names one.
pub async fn resume(
    state: &Edge,
    headers: &HeaderMap,
    id: &str,
    after: u64,
    route: Option<Route>,
) -> Response {
    let refuse = |err: GatewayError| match route.is_some_and(Route::is_anthropic) {
        true => err.into_anthropic_response(),
        false => err.into_response(),
    };
    let identity = match state
        .stages
        .auth
        .authenticate(presented_secret(headers, None))
        .await
    {
        Ok(identity) => identity,
        Err(err) => return refuse(err),
    };
    match reopen(state, &identity, id, after, route).await {
        Ok((route, events)) => sse_body(Body::from_stream(sse_events(route, events, after))),
        Err(err) => refuse(err),
    }
}

/// The events of `identity`'s stream `id` after the `after`-th, and the
/// route the stream answers; on `route` when given (another route's
/// stream is not found there).
pub async fn reopen(
    state: &Edge,
    identity: &Identity,
    id: &str,
    after: u64,
    route: Option<Route>,
) -> Result<(Route, Events), GatewayError> {
    let Some(resumption) = &state.stages.resumption else {
        return Err(GatewayError::NotFound(
            "streams are not resumable on this gateway (resume.enabled is false)".into(),
        ));
    };
    let outcome = |outcome: &str| {
        resumption
            .metrics
            .resumes
            .with_label_values(&[outcome])
            .inc();
    };
    let recording = resumption.log.find(id).await?;
    let recording = match recording {
        Some(recording)
            if recording.owner == identity.key_id
                && route.is_none_or(|route| route == recording.route) =>
        {
            recording
        }
        _ => {
            outcome("not_found");
            return Err(GatewayError::NotFound(format!(
                "no stream '{id}' to resume"
            )));
        }
    };
    if recording.outgrown {
        outcome("outgrown");
        return Err(ReplayError::Outgrown.into());
    }
    // Followed from now: the generation is not abandoned while this client reads.
    let following = resumption.log.attach(id);
    let mut replay = resumption.log.follow(id, after).peekable();
    if let Some(Err(err @ (ReplayError::Outgrown | ReplayError::Expired))) =
        std::pin::Pin::new(&mut replay).peek().await
    {
        outcome(match err {
            ReplayError::Outgrown => "outgrown",
            _ => "expired",
        });
        return Err(err.clone().into());
    }
    outcome("resumed");
    let events = Events::Resumed {
        id: id.to_string(),
        replay: replay.boxed(),
        _following: following,
    };
    Ok((recording.route, events))
}
