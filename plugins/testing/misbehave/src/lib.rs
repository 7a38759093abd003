//! A plugin that misbehaves on purpose, for the host's isolation tests.
//!
//! Config: `mode` = `loop` | `alloc` | `trap` | `bad-utf8` | `huge` |
//! `short` (`on-tokens` only: answers no text) | `one-text` (`on-request`
//! only: rewrites to one text, "replaced", however many there were) | `init-fail` | `recall`
//! (`on-request` only: keeps the last request's text in a global and refuses
//! with 409 naming it, to show which requests share an instance) | `none`,
//! and `hook` = `on-request` | `cache-key` | `on-token` | `on-tokens` |
//! `on-tool-call` (where to misbehave; the other hooks behave).

use std::cell::RefCell;

wit_bindgen::generate!({ path: "../../../wit", world: "full-plugin" });

use exports::sluice::plugin::cache_key_hook::{CacheKeyDecision, Guest as CacheKeyHook};
use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
use exports::sluice::plugin::request_hook::{
    Guest as RequestHook, InferenceRequest, RequestContext, RequestDecision,
};
use exports::sluice::plugin::token_batch_hook::Guest as TokenBatchHook;
use exports::sluice::plugin::token_hook::{Guest as TokenHook, TokenAction};
use exports::sluice::plugin::tool_call_hook::{
    Guest as ToolCallHook, ToolCallAction, ToolCallPiece,
};
use sluice::plugin::types::CompletionRequest;

#[derive(serde::Deserialize, Default, Clone)]
struct Config {
    #[serde(default)]
    mode: String,
    #[serde(default)]
    hook: String,
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
    /// `recall`: the text of the last request this instance saw.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// `recall`: the previous request's text, if this instance saw one; remembers this one's.
fn recall(request: &InferenceRequest) -> Option<String> {
    let text = match request {
        InferenceRequest::Completion(c) => c.prompts.join(" "),
        InferenceRequest::Chat(c) => c
            .messages
            .iter()
            .filter_map(|m| m.content.clone())
            .collect::<Vec<_>>()
            .join(" "),
        InferenceRequest::Pooling(p) => p.texts.join(" "),
    };
    LAST.with(|last| last.borrow_mut().replace(text))
}

/// Misbehaves if configured for `hook`; otherwise returns `None`.
fn misbehave(hook: &str) -> Option<String> {
    let config = CONFIG.with(|c| c.borrow().clone());
    if config.hook != hook {
        return None;
    }
    match config.mode.as_str() {
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "trap" => std::process::abort(),
        // SAFETY: deliberately not UTF-8; the host must refuse it.
        "bad-utf8" => Some(unsafe { String::from_utf8_unchecked(vec![0xff, 0xfe, 0xfd]) }),
        "huge" => Some("x".repeat(8 << 20)),
        "one-text" => Some("replaced".into()),
        _ => None,
    }
}

struct Plugin;

impl Lifecycle for Plugin {
    fn init(config: String) -> Result<(), String> {
        let config: Config = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        if config.mode == "init-fail" {
            return Err("configured to fail".into());
        }
        CONFIG.with(|c| *c.borrow_mut() = config);
        Ok(())
    }
}

impl RequestHook for Plugin {
    fn on_request(_ctx: RequestContext, request: InferenceRequest) -> RequestDecision {
        if CONFIG.with(|c| c.borrow().mode == "recall")
            && let Some(previous) = recall(&request)
        {
            return RequestDecision::Reject(exports::sluice::plugin::request_hook::Rejection {
                status: 409,
                message: format!("recalled: {previous}"),
            });
        }
        match (misbehave("on-request"), request) {
            (Some(text), InferenceRequest::Completion(request)) => {
                RequestDecision::Modify(InferenceRequest::Completion(CompletionRequest {
                    prompts: vec![text],
                    ..request
                }))
            }
            (Some(text), InferenceRequest::Chat(mut request)) => {
                for message in &mut request.messages {
                    message.content = Some(text.clone());
                }
                RequestDecision::Modify(InferenceRequest::Chat(request))
            }
            // One text, whatever the request had: a batch of two comes back short.
            (Some(text), InferenceRequest::Pooling(mut request)) => {
                request.texts = vec![text];
                RequestDecision::Modify(InferenceRequest::Pooling(request))
            }
            (None, _) => RequestDecision::Proceed,
        }
    }
}

impl CacheKeyHook for Plugin {
    fn cache_key(
        _ctx: RequestContext,
        _request: InferenceRequest,
        _default_key: String,
    ) -> CacheKeyDecision {
        match misbehave("cache-key") {
            Some(text) => CacheKeyDecision::Custom(text),
            None => CacheKeyDecision::UseDefault,
        }
    }
}

impl TokenHook for Plugin {
    fn on_token(_index: u32, _text: String) -> TokenAction {
        match misbehave("on-token") {
            Some(text) => TokenAction::Replace(text),
            None => TokenAction::Pass,
        }
    }

    fn on_end(_index: u32) -> String {
        String::new()
    }
}

impl TokenBatchHook for Plugin {
    fn on_tokens(_index: u32, _text: String, ends: Vec<u32>) -> Vec<TokenAction> {
        let short = CONFIG.with(|c| {
            let c = c.borrow();
            c.hook == "on-tokens" && c.mode == "short"
        });
        if short {
            return Vec::new();
        }
        let first = match misbehave("on-tokens") {
            Some(text) => TokenAction::Replace(text),
            None => TokenAction::Pass,
        };
        std::iter::once(first)
            .chain(ends.iter().skip(1).map(|_| TokenAction::Pass))
            .collect()
    }
}

impl ToolCallHook for Plugin {
    fn on_tool_call(_index: u32, _piece: ToolCallPiece) -> ToolCallAction {
        match misbehave("on-tool-call") {
            Some(text) => ToolCallAction::Replace(text),
            None => ToolCallAction::Pass,
        }
    }
}

export!(Plugin);
