//! The one error type a client can see, and its mapping to HTTP and to the
//! OpenAI/vLLM error shape `{"error": {"message", "type", "param", "code"}}`.
//!
//! Every layer has its own `thiserror` enum (store, cache, queue, upstream,
//! plugins); each converts into [`GatewayError`] here, so status codes and
//! error types are decided in exactly one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error as it travels between processes (worker to edge over the queue)
/// and as it is rendered to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub status: u16,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    /// The request field at fault, when the upstream named one (vLLM does
    /// for context-length errors); `null` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// A named `code` (OpenAI's `rate_limit_exceeded`) instead of the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ErrorInfo {
    pub fn new(status: StatusCode, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: status.as_u16(),
            kind: kind.into(),
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY)
    }

    /// The OpenAI-shaped JSON body: `{"error": {"message", "type", "param": null, "code"}}`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: Code<'a>,
        }
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Code<'a> {
            Status(u16),
            Named(&'a str),
        }
        serde_json::to_string(&Body {
            error: Inner {
                message: &self.message,
                kind: &self.kind,
                param: self.param.as_deref(),
                code: match &self.code {
                    Some(name) => Code::Named(name),
                    None => Code::Status(self.status),
                },
            },
        })
        .unwrap_or_else(|_| String::from(r#"{"error":{"message":"internal error","type":"InternalServerError","param":null,"code":500}}"#))
    }
}

/// The error body of Anthropic's API, `{"type": "error", "error": {"type", "message"}}`.
pub fn anthropic_json(kind: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
}

/// Anthropic's error `type` for a status the gateway answers with.
pub fn anthropic_kind_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// A request refused by a limit of its key or team: a 429 in OpenAI's
/// rate-limit shape, with the `x-ratelimit-*` headers and `retry-after`.
#[derive(Debug)]
pub struct RateLimited {
    /// Which limit refused it (`requests`, `tokens`, `concurrency`): the error's `type`.
    pub limit: &'static str,
    pub message: String,
    pub retry_after: std::time::Duration,
    pub headers: axum::http::HeaderMap,
}

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("request body is larger than the {limit}-byte limit")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// A limit of the key or its team refused the request.
    #[error("{}", .0.message)]
    RateLimited(Box<RateLimited>),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    /// What was asked for existed but is no longer available (a stream that
    /// outgrew its replay buffer).
    #[error("{0}")]
    Gone(String),
    /// A plugin's `on-request` hook rejected the request.
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    /// The upstream (vLLM) answered with an error, or failed mid-stream.
    #[error("{}", .0.message)]
    Upstream(ErrorInfo),
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    #[error("upstream timed out: {0}")]
    UpstreamTimeout(String),
    #[error("{0}")]
    Overloaded(String),
    /// A fail-closed plugin trapped, timed out or misbehaved. The client is
    /// told only that and the request id; the plugin and the failure are logged.
    #[error("a policy plugin failed on this request (request id {request_id})")]
    Plugin { request_id: String },
    #[error("{0}")]
    Backend(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::TooManyRequests(_) | Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::Rejected { status, .. } => *status,
            Self::Upstream(info) => info.status_code(),
            Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded(_) | Self::Backend(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Plugin { .. } | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error `type`, named like the OpenAI SDK's exception classes (as vLLM does).
    fn kind(&self) -> &str {
        match self {
            Self::Upstream(info) => &info.kind,
            Self::Rejected { status, .. } => kind_for_status(*status),
            other => kind_for_status(other.status()),
        }
    }

    pub fn info(&self) -> ErrorInfo {
        match self {
            Self::Upstream(info) => info.clone(),
            // OpenAI's rate-limit errors: `type` says which limit, `code` is named.
            Self::RateLimited(limited) => ErrorInfo {
                status: 429,
                kind: limited.limit.to_string(),
                message: limited.message.clone(),
                param: None,
                code: Some("rate_limit_exceeded".into()),
            },
            other => ErrorInfo::new(other.status(), other.kind(), other.to_string()),
        }
    }

    /// A short, low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RequestTimeout(_) => "request_timeout",
            Self::Forbidden(_) => "forbidden",
            Self::TooManyRequests(_) => "too_many_requests",
            Self::RateLimited(_) => "rate_limited",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict(_) => "conflict",
            Self::Gone(_) => "gone",
            Self::Rejected { .. } => "plugin_rejected",
            Self::Upstream(_) => "upstream_error",
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::Overloaded(_) => "overloaded",
            Self::Plugin { .. } => "plugin_failed",
            Self::Backend(_) => "backend_unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// The `type` string for a status code, following the OpenAI SDK's names.
pub fn kind_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        405 => "MethodNotAllowedError",
        408 => "RequestTimeoutError",
        409 => "ConflictError",
        410 => "GoneError",
        413 => "PayloadTooLargeError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        s if s >= 500 => "InternalServerError",
        _ => "BadRequestError",
    }
}

impl From<ErrorInfo> for GatewayError {
    fn from(info: ErrorInfo) -> Self {
        Self::Upstream(info)
    }
}

impl GatewayError {
    /// The error's body in Anthropic's shape: the upstream's own `type`
    /// when vLLM answered with the error, Anthropic's name for the status
    /// when the gateway did.
    pub fn anthropic_json(&self) -> String {
        let info = self.info();
        let kind = match self {
            Self::Upstream(info) => info.kind.as_str(),
            other => anthropic_kind_for_status(other.status()),
        };
        anthropic_json(kind, &info.message)
    }

    /// The response for a client of Anthropic's API (`/v1/messages`): its
    /// error shape, the same status and headers as [`IntoResponse`].
    pub fn into_anthropic_response(self) -> Response {
        let body = self.anthropic_json();
        let mut response = self.into_response();
        *response.body_mut() = axum::body::Body::from(body);
        response.headers_mut().remove(header::CONTENT_LENGTH);
        response
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let info = self.info();
        let mut response = (info.status_code(), info.to_json()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, Self::Unauthorized(_)) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::RateLimited(limited) = self {
            let headers = response.headers_mut();
            headers.extend(limited.headers);
            let seconds = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_openai_shape() {
        let err = GatewayError::BadRequest("prompt is required".into());
        let body: serde_json::Value = serde_json::from_str(&err.info().to_json()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "prompt is required", "type": "BadRequestError", "param": null, "code": 400}})
        );
    }

    #[test]
    fn upstream_errors_keep_their_status_and_type() {
        let err = GatewayError::from(ErrorInfo::new(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            "model x not found",
        ));
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        assert_eq!(err.info().kind, "NotFoundError");
    }
}
