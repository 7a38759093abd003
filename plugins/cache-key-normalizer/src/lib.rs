//! cache-key-normalizer: makes requests that differ only in letter case,
//! whitespace or the `user` field share one cache entry.
//!
//! The key is built from the request body with `user` (and the transport
//! fields `stream`, `stream_options`) removed and every prompt (on the chat
//! route: the text of every message; on the embedding, rerank, score,
//! classify, pooling and tokenize routes: every input text, query and
//! document) lower-cased with runs of whitespace folded to one space. Use it
//! on those routes only for models that do not tell case apart (uncased
//! embedding models). Config: `ignore = ["user"]` (body fields left out of
//! the key; default `["user"]`).

use std::collections::BTreeMap;

use serde_json::Value;
use serde_json::value::RawValue;

#[derive(serde::Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_ignore")]
    pub ignore: Vec<String>,
}

fn default_ignore() -> Vec<String> {
    vec!["user".into()]
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ignore: default_ignore(),
        }
    }
}

/// `text` lower-cased with runs of whitespace folded to one space and none
/// at either end, in one pass.
pub fn normalize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            let start = out.len();
            out.push_str(word);
            if let Some(pushed) = out.get_mut(start..) {
                pushed.make_ascii_lowercase();
            }
        } else {
            // Per word, as the whole text would be: a space follows each word
            // either way, so context-dependent rules (final sigma) agree.
            out.push_str(&word.to_lowercase());
        }
    }
    out
}

/// The normalized key for a request body; `None` (the gateway's default key)
/// when the body is not a JSON object or a field name holds an escape.
///
/// Fields other than the prompt are copied as written: the gateway hands
/// plugins its own compact serialisation, so equal values are equal text.
pub fn key(config: &Config, body_json: &str) -> Option<String> {
    build_key(config, body_json, &[])
}

/// The fields of the embedding, rerank, score, classify, pooling and
/// tokenize routes that carry text, besides `prompt` and `messages`.
const POOLING_TEXT_FIELDS: &[&str] = &[
    "input",
    "texts",
    "inputs",
    "query",
    "documents",
    "queries",
    "items",
    "text_1",
    "text_2",
    "data_1",
    "data_2",
];

/// The normalized key for a request on one of the routes answered with one
/// JSON body: its route (equal bodies on `/v1/embeddings` and `/classify`
/// get different answers) and the body with every input text normalized.
pub fn pooling_key(config: &Config, route: &str, body_json: &str) -> Option<String> {
    let key = build_key(config, body_json, POOLING_TEXT_FIELDS)?;
    Some(format!("{route} {key}"))
}

fn build_key(config: &Config, body_json: &str, text_fields: &[&str]) -> Option<String> {
    let mut body: BTreeMap<&str, &RawValue> = serde_json::from_str(body_json).ok()?;
    for field in config
        .ignore
        .iter()
        .map(String::as_str)
        .chain(["stream", "stream_options"])
    {
        body.remove(field);
    }
    let mut out = String::with_capacity(body_json.len() + 16);
    out.push_str("normalized:{");
    // Ordered by name, so bodies that differ only in field order share a key.
    for (i, (name, value)) in body.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Borrowed names hold no escapes, so they are written as they came.
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        if name == "prompt" {
            // Borrowed when the prompt holds no escapes (the usual case): no copy.
            if let Ok(text) = serde_json::from_str::<&str>(value.get()) {
                push_normalized(&mut out, text);
                continue;
            }
            match serde_json::from_str::<Value>(value.get()).ok()? {
                Value::String(text) => push_normalized(&mut out, &text),
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        match item {
                            Value::String(text) => push_normalized(&mut out, text),
                            other => out.push_str(&other.to_string()),
                        }
                    }
                    out.push(']');
                }
                _ => out.push_str(value.get()),
            }
        } else if text_fields.contains(&name) {
            let mut value: Value = serde_json::from_str(value.get()).ok()?;
            normalize_inputs(&mut value);
            out.push_str(&value.to_string());
        } else if name == "messages" {
            let mut messages: Value = serde_json::from_str(value.get()).ok()?;
            for message in messages.as_array_mut().into_iter().flatten() {
                normalize_content(message);
            }
            out.push_str(&messages.to_string());
        } else {
            out.push_str(value.get());
        }
    }
    out.push('}');
    Some(out)
}

/// Normalizes the texts of a pooling input: strings, lists of them,
/// messages, and the text parts of multimodal content. Token ids and
/// images (data URIs are case-sensitive) are left alone.
fn normalize_inputs(value: &mut Value) {
    match value {
        Value::String(text) => *text = normalize_text(text),
        Value::Array(items) => items.iter_mut().for_each(normalize_inputs),
        Value::Object(_) => normalize_content(value),
        _ => {}
    }
}

/// Normalizes a chat message's text: string content, or its text parts.
fn normalize_content(message: &mut Value) {
    match message.get_mut("content") {
        Some(Value::String(text)) => *text = normalize_text(text),
        Some(Value::Array(parts)) => {
            for part in parts {
                if part.get("type").and_then(Value::as_str) == Some("text")
                    && let Some(Value::String(text)) = part.get_mut("text")
                {
                    *text = normalize_text(text);
                }
            }
        }
        _ => {}
    }
}

/// Appends `text`, normalized, as a JSON string.
fn push_normalized(out: &mut String, text: &str) {
    let normalized = normalize_text(text);
    // Only quotes, backslashes and control characters need escaping.
    if normalized
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b < 0x20)
    {
        out.push_str(&Value::String(normalized).to_string());
    } else {
        out.push('"');
        out.push_str(&normalized);
        out.push('"');
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use super::{Config, key, pooling_key};

    wit_bindgen::generate!({ path: "../../wit", world: "cache-key-plugin" });

    use exports::sluice::plugin::cache_key_hook::{
        CacheKeyDecision, Guest as CacheKeyHook, InferenceRequest, RequestContext,
    };
    use exports::sluice::plugin::lifecycle::Guest as Lifecycle;

    thread_local! {
        static CONFIG: RefCell<Config> = RefCell::new(Config::default());
    }

    struct Plugin;

    impl Lifecycle for Plugin {
        fn init(config: String) -> Result<(), String> {
            let config: Config =
                serde_json::from_str(&config).map_err(|e| format!("invalid config: {e}"))?;
            CONFIG.with(|c| *c.borrow_mut() = config);
            Ok(())
        }
    }

    impl CacheKeyHook for Plugin {
        fn cache_key(
            ctx: RequestContext,
            request: InferenceRequest,
            _default_key: String,
        ) -> CacheKeyDecision {
            let key = CONFIG.with(|c| match &request {
                InferenceRequest::Completion(request) => key(&c.borrow(), &request.body_json),
                InferenceRequest::Chat(request) => key(&c.borrow(), &request.body_json),
                InferenceRequest::Pooling(request) => {
                    pooling_key(&c.borrow(), &ctx.route, &request.body_json)
                }
            });
            match key {
                Some(key) => CacheKeyDecision::Custom(key),
                None => CacheKeyDecision::UseDefault,
            }
        }
    }

    export!(Plugin);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_inputs_queries_and_documents_are_normalized_but_not_images_or_ids() {
        let c = Config::default();
        let a = pooling_key(
            &c,
            "/v1/embeddings",
            r#"{"model":"m","input":["Hello  World",[1,2]],"user":"a"}"#,
        );
        let b = pooling_key(
            &c,
            "/v1/embeddings",
            r#"{"model":"m","input":[" hello world",[1,2]],"user":"b"}"#,
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            pooling_key(
                &c,
                "/classify",
                r#"{"model":"m","input":["hello world",[1,2]]}"#
            )
        );
        let rerank = |query: &str, image: &str| {
            pooling_key(
                &c,
                "/v1/rerank",
                &format!(
                    r#"{{"model":"m","query":"{query}","documents":["A b",{{"content":[{{"type":"text","text":"C"}},{{"type":"image_url","image_url":{{"url":"{image}"}}}}]}}]}}"#
                ),
            )
        };
        assert_eq!(rerank("What?", "data:x/AbC"), rerank("what?", "data:x/AbC"));
        assert_ne!(rerank("what?", "data:x/AbC"), rerank("what?", "data:x/abc"));
    }

    #[test]
    fn case_whitespace_and_user_do_not_change_the_key() {
        let c = Config::default();
        let a = key(
            &c,
            r#"{"model":"m","prompt":"Hello   World","max_tokens":5,"user":"alice"}"#,
        );
        let b = key(
            &c,
            r#"{"model":"m","prompt":" hello world ","max_tokens":5,"user":"bob","stream":true}"#,
        );
        assert_eq!(a, b);
        assert!(a.is_some());
    }

    #[test]
    fn chat_messages_are_normalized_too() {
        let c = Config::default();
        let a = key(
            &c,
            r#"{"model":"m","messages":[{"role":"user","content":"Hello   World"}],"user":"a"}"#,
        );
        let b = key(
            &c,
            r#"{"model":"m","messages":[{"role":"user","content":" hello world"}],"user":"b"}"#,
        );
        let parts = key(
            &c,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"HELLO world"}]}]}"#,
        );
        let other = key(
            &c,
            r#"{"model":"m","messages":[{"role":"system","content":"hello world"}]}"#,
        );
        assert_eq!(a, b);
        assert!(a.is_some());
        assert_ne!(a, parts, "a list of parts is another request");
        assert_ne!(a, other, "the role is part of the key");
    }

    #[test]
    fn normalize_text_folds_case_and_whitespace() {
        assert_eq!(normalize_text("  Hello \t\n WORLD  "), "hello world");
        assert_eq!(normalize_text("ΟΔΟΣ Straße"), "οδος straße");
        assert_eq!(normalize_text(""), "");
    }

    #[test]
    fn sampling_parameters_still_do() {
        let c = Config::default();
        let a = key(&c, r#"{"model":"m","prompt":"x","max_tokens":5}"#);
        let b = key(&c, r#"{"model":"m","prompt":"x","max_tokens":6}"#);
        assert_ne!(a, b);
    }

    #[test]
    fn the_key_is_the_sorted_body_with_the_prompt_normalized() {
        let c = Config::default();
        assert_eq!(
            key(
                &c,
                r#"{"prompt":["A  b","C"],"model":"m","stop":["\n"],"user":"u","stream":true}"#
            )
            .as_deref(),
            Some(r#"normalized:{"model":"m","prompt":["a b","c"],"stop":["\n"]}"#)
        );
        assert_eq!(
            key(&c, r#"{"prompt":"Say \"Hi\"\u0001 \\ OK","model":"m"}"#).as_deref(),
            Some(r#"normalized:{"model":"m","prompt":"say \"hi\"\u0001 \\ ok"}"#)
        );
        assert_eq!(key(&c, "[1]"), None);
        assert_eq!(key(&c, r#"{"mo\u0064el":"m"}"#), None);
    }
}
