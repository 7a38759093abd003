//! cache-key-normalizer: makes requests that differ only in letter case,
//! whitespace or the `user` field share one cache entry.
//!
//! The key is built from the request body with `user` (and the transport
//! fields `stream`, `stream_options`) removed and every prompt lower-cased
//! with runs of whitespace folded to one space. Config: `ignore = ["user"]`
//! (body fields left out of the key; default `["user"]`).

use serde_json::Value;

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

pub fn normalize_text(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The normalized key for a request body; `None` when the body is not a JSON object.
pub fn key(config: &Config, body_json: &str) -> Option<String> {
    let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(body_json) else {
        return None;
    };
    for field in config
        .ignore
        .iter()
        .map(String::as_str)
        .chain(["stream", "stream_options"])
    {
        body.remove(field);
    }
    let normalize = |v: &mut Value| {
        if let Value::String(s) = v {
            *s = normalize_text(s);
        }
    };
    match body.get_mut("prompt") {
        Some(Value::Array(items)) => items.iter_mut().for_each(normalize),
        Some(prompt) => normalize(prompt),
        None => {}
    }
    // serde_json's map is ordered by key, so equal bodies serialize equally.
    Some(format!("normalized:{}", Value::Object(body)))
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use super::{Config, key};

    wit_bindgen::generate!({ path: "../../wit", world: "cache-key-plugin" });

    use exports::sluice::plugin::cache_key_hook::{
        CacheKeyDecision, CompletionRequest, Guest as CacheKeyHook, RequestContext,
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
            _ctx: RequestContext,
            request: CompletionRequest,
            _default_key: String,
        ) -> CacheKeyDecision {
            match CONFIG.with(|c| key(&c.borrow(), &request.body_json)) {
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
    fn sampling_parameters_still_do() {
        let c = Config::default();
        let a = key(&c, r#"{"model":"m","prompt":"x","max_tokens":5}"#);
        let b = key(&c, r#"{"model":"m","prompt":"x","max_tokens":6}"#);
        assert_ne!(a, b);
    }
}
