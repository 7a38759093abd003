//! Errors in vLLM's shape inside an upstream body or stream.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ErrorInfo;

/// Recognises an upstream error event (`{"error": {...}}`, or the older
/// flat `{"object": "error", ...}`) among stream payloads.
pub fn parse_error_event(payload: &[u8]) -> Option<ErrorInfo> {
    #[derive(Deserialize)]
    struct Nested {
        error: Value,
    }
    #[derive(Deserialize)]
    struct Flat {
        object: String,
        #[serde(default)]
        message: String,
        #[serde(default, rename = "type")]
        kind: String,
        #[serde(default)]
        code: Option<u16>,
    }
    // The Responses API's error event: flat, its `type` last.
    if payload.ends_with(br#""type":"error"}"#) {
        return responses_error(payload);
    }
    // Cheap pre-check: chunks start with {"id"; only errors mention "error" early.
    let head = &payload[..payload.len().min(64)];
    if !head.windows(5).any(|w| w == b"error") {
        return None;
    }
    if let Ok(Nested { error }) = serde_json::from_slice::<Nested>(payload) {
        return Some(error_info_from_value(&error));
    }
    match serde_json::from_slice::<Flat>(payload) {
        Ok(flat) if flat.object == "error" => Some(ErrorInfo {
            status: flat.code.unwrap_or(500),
            kind: if flat.kind.is_empty() {
                "InternalServerError".into()
            } else {
                flat.kind
            },
            message: flat.message,
            param: None,
            code: None,
        }),
        _ => None,
    }
}

/// A Responses `error` event (`{"code", "message", "param", "sequence_number", "type": "error"}`).
fn responses_error(payload: &[u8]) -> Option<ErrorInfo> {
    #[derive(Deserialize)]
    struct Event {
        #[serde(default)]
        code: Option<Value>,
        #[serde(default)]
        message: String,
        #[serde(default)]
        param: Option<String>,
    }
    let event: Event = serde_json::from_slice(payload).ok()?;
    let status = event
        .code
        .as_ref()
        .and_then(|c| c.as_u64().or_else(|| c.as_str()?.parse().ok()))
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(500);
    Some(ErrorInfo {
        status,
        kind: "InternalServerError".into(),
        message: event.message,
        param: event.param,
        code: None,
    })
}

/// Builds an [`ErrorInfo`] from the `error` object of an upstream body.
pub fn error_info_from_value(error: &Value) -> ErrorInfo {
    match error {
        Value::Object(fields) => ErrorInfo {
            status: fields
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..600).contains(c))
                .unwrap_or(500),
            kind: fields
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("InternalServerError")
                .to_string(),
            message: fields
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error")
                .to_string(),
            param: fields
                .get("param")
                .and_then(Value::as_str)
                .map(String::from),
            code: None,
        },
        Value::String(message) => ErrorInfo {
            status: 500,
            kind: "InternalServerError".into(),
            message: message.clone(),
            param: None,
            code: None,
        },
        other => ErrorInfo {
            status: 500,
            kind: "InternalServerError".into(),
            message: other.to_string(),
            param: None,
            code: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_error_events() {
        let nested =
            br#"{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}"#;
        assert_eq!(parse_error_event(nested).unwrap().message, "boom");
        let chunk = br#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" error"}]}"#;
        assert!(parse_error_event(chunk).is_none());
    }
}
