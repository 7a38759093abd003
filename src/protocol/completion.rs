//! The completion request (`POST /v1/completions`): the body sluice accepts,
//! checked only as far as routing, limits, caching and plugins need.

use serde::de;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::{RequestBody, parse_body};
use crate::error::GatewayError;

/// A `POST /v1/completions` body. Fields sluice does not know are kept in
/// `extra` and passed through to the upstream unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous_usage_stats: Option<bool>,
}

/// `prompt`: a string, a batch of strings, token ids, or a batch of token ids.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

const PROMPT_SHAPE: &str = "prompt must be a string, an array of strings, an array of token ids or an array of token-id arrays";

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let prompt = match value {
            Value::String(text) => Prompt::Text(text),
            Value::Array(items) if items.iter().all(Value::is_string) => Prompt::Texts(
                items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
            ),
            Value::Array(items) if items.iter().all(Value::is_u64) => {
                Prompt::Tokens(token_ids(&items).ok_or_else(|| de::Error::custom(PROMPT_SHAPE))?)
            }
            Value::Array(items) if items.iter().all(Value::is_array) => Prompt::TokenBatches(
                items
                    .iter()
                    .map(|batch| batch.as_array().and_then(|b| token_ids(b)))
                    .collect::<Option<_>>()
                    .ok_or_else(|| de::Error::custom(PROMPT_SHAPE))?,
            ),
            _ => return Err(de::Error::custom(PROMPT_SHAPE)),
        };
        Ok(prompt)
    }
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) => Ok(Stop::One(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(de::Error::custom(
                        "stop must be a string or an array of strings",
                    )),
                })
                .collect::<Result<_, _>>()
                .map(Stop::Many),
            _ => Err(de::Error::custom(
                "stop must be a string or an array of strings",
            )),
        }
    }
}

impl Prompt {
    fn is_empty(&self) -> bool {
        match self {
            Prompt::Text(s) => s.is_empty(),
            Prompt::Texts(v) => v.is_empty() || v.iter().any(String::is_empty),
            Prompt::Tokens(v) => v.is_empty(),
            Prompt::TokenBatches(v) => v.is_empty() || v.iter().any(Vec::is_empty),
        }
    }

    /// How many prompts the request holds.
    pub fn count(&self) -> usize {
        match self {
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
            Prompt::Texts(v) => v.len(),
            Prompt::TokenBatches(v) => v.len(),
        }
    }

    /// The prompt texts, for plugins; token-id prompts have none.
    pub fn texts(&self) -> Vec<String> {
        match self {
            Prompt::Text(s) => vec![s.clone()],
            Prompt::Texts(v) => v.clone(),
            Prompt::Tokens(_) | Prompt::TokenBatches(_) => Vec::new(),
        }
    }
}

impl CompletionRequest {
    /// Parses and validates a request body; every failure is a 400 that says what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let request: CompletionRequest = parse_body(body)?;
        if request.prompt.is_empty() {
            return Err(GatewayError::BadRequest("prompt must not be empty".into()));
        }
        request.check_common()?;
        Ok(request)
    }
}

impl RequestBody for CompletionRequest {
    const CACHE_NAMESPACE: &'static str = "v1";

    fn model(&self) -> &str {
        &self.model
    }

    fn sampling(&self) -> (Option<u32>, Option<f64>, Option<f64>) {
        (self.n, self.temperature, self.top_p)
    }

    fn transport(&self) -> (Option<bool>, Option<&StreamOptions>) {
        (self.stream, self.stream_options.as_ref())
    }

    fn transport_mut(&mut self) -> (&mut Option<bool>, &mut Option<StreamOptions>) {
        (&mut self.stream, &mut self.stream_options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CompletionRequest, String> {
        CompletionRequest::parse(body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_every_documented_field_and_keeps_unknown_ones() {
        let req = parse(
            r#"{"model":"m","prompt":["a","b"],"max_tokens":5,"temperature":0.5,"top_p":0.9,"n":2,
                "stop":["x"],"seed":7,"stream":true,"stream_options":{"include_usage":true},
                "logprobs":2,"echo":false,"user":"u","top_k":40}"#,
        )
        .unwrap();
        assert_eq!(req.prompt, Prompt::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(req.extra.get("top_k"), Some(&serde_json::json!(40)));
        let upstream: Value = serde_json::from_slice(&req.upstream_body()).unwrap();
        assert_eq!(upstream["top_k"], 40);
        assert_eq!(upstream["stream"], true);
        assert_eq!(upstream["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rejects_bad_bodies_with_a_message_naming_the_problem() {
        assert!(parse("{not json").unwrap_err().contains("not valid JSON"));
        assert!(parse(r#"{"prompt":"x"}"#).unwrap_err().contains("model"));
        assert!(parse(r#"{"model":"m"}"#).unwrap_err().contains("prompt"));
        assert!(
            parse(r#"{"model":"m","prompt":"x","max_tokens":"ten"}"#)
                .unwrap_err()
                .contains("max_tokens")
        );
        assert!(
            parse(r#"{"model":"m","prompt":{"a":1}}"#)
                .unwrap_err()
                .contains("prompt must be")
        );
        assert!(parse(r#"[1,2]"#).is_err());
        assert!(
            parse(r#"{"model":"m","prompt":""}"#)
                .unwrap_err()
                .contains("empty")
        );
    }

    #[test]
    fn cache_key_ignores_transport_but_not_sampling() {
        let a = parse(
            r#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        let b = parse(r#"{"model":"m","prompt":"x"}"#).unwrap();
        let c = parse(r#"{"model":"m","prompt":"x","temperature":0.1}"#).unwrap();
        let d = parse(r#"{"model":"m","prompt":"x","top_k":3}"#).unwrap();
        assert_eq!(a.default_cache_key(), b.default_cache_key());
        assert_ne!(b.default_cache_key(), c.default_cache_key());
        assert_ne!(b.default_cache_key(), d.default_cache_key());
    }
}
