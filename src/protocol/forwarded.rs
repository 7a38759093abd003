//! A JSON request body sluice forwards as the client sent it: parsed once
//! for what sluice reads (`model`, which these routes require, and whatever
//! the route's own type looks at), re-serialised only after sluice changed
//! it (the model of an alias, a plugin's rewrite).

use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::GatewayError;

/// A 400 naming the field at fault.
pub(crate) fn invalid(field: &str, message: &str) -> GatewayError {
    GatewayError::BadRequest(format!("invalid value for `{field}`: {message}"))
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ForwardedJson {
    model: String,
    /// The body as the client sent it.
    raw: Bytes,
    /// The body parsed; authoritative once edited.
    body: Map<String, Value>,
    edited: bool,
}

impl ForwardedJson {
    /// Parses `raw`, which must be an object with a non-empty string `model`.
    pub(crate) fn parse(raw: &[u8]) -> Result<Self, GatewayError> {
        let body: Map<String, Value> = super::parse_body(raw)?;
        let model = match body.get("model") {
            Some(Value::String(model)) if !model.trim().is_empty() => model.clone(),
            Some(Value::String(_)) => return Err(invalid("model", "must not be empty")),
            Some(_) => return Err(invalid("model", "must be a string")),
            None => {
                return Err(GatewayError::BadRequest(
                    "`model` is required: the gateway routes by it".into(),
                ));
            }
        };
        Ok(Self {
            model,
            raw: Bytes::copy_from_slice(raw),
            body,
            edited: false,
        })
    }

    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    pub(crate) fn body(&self) -> &Map<String, Value> {
        &self.body
    }

    /// The body to change; it is re-serialised for the upstream from then on.
    pub(crate) fn body_mut(&mut self) -> &mut Map<String, Value> {
        self.edited = true;
        &mut self.body
    }

    /// Runs `read` on the body through a walker that could also write (one
    /// walk both reads texts and writes them back); `read` must not change
    /// it, so the client's bytes are still what goes upstream.
    pub(crate) fn read_mut<R>(&mut self, read: impl FnOnce(&mut Map<String, Value>) -> R) -> R {
        #[cfg(debug_assertions)]
        let before = self.body.clone();
        let result = read(&mut self.body);
        #[cfg(debug_assertions)]
        debug_assert!(before == self.body, "a read changed the body");
        result
    }

    /// Sends the request for `model` instead (an alias resolved).
    pub(crate) fn set_model(&mut self, model: String) {
        self.body_mut()
            .insert("model".into(), Value::String(model.clone()));
        self.model = model;
    }

    /// The client's own bytes, unless sluice changed the body.
    pub(crate) fn upstream_body(&self) -> Bytes {
        match self.edited {
            false => self.raw.clone(),
            true => Bytes::from(serde_json::to_vec(&self.body).unwrap_or_default()),
        }
    }

    /// `<namespace>:<digest of the body as sent upstream>`.
    pub(crate) fn cache_key(&self, namespace: &str) -> String {
        let json = serde_json::to_vec(&self.body).unwrap_or_default();
        format!("{namespace}:{}", hex::encode(Sha256::digest(&json)))
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(&self.body).unwrap_or_default()
    }
}
