//! A plugin built against `sluice:plugin@0.3.0`, for the host's tests that
//! such components keep working: `on-request` refuses completions, chats
//! and pooling requests containing "forbidden" with 403, and uppercases
//! the texts of a pooling request otherwise; it has no record for the
//! Messages and Responses APIs 0.4.0 added.

wit_bindgen::generate!({ path: "../../../wit/legacy/plugin-0.3.0.wit", world: "request-plugin" });

use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
use exports::sluice::plugin::request_hook::{
    Guest as RequestHook, InferenceRequest, Rejection, RequestContext, RequestDecision,
};

struct Plugin;

impl Lifecycle for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

impl RequestHook for Plugin {
    fn on_request(_ctx: RequestContext, request: InferenceRequest) -> RequestDecision {
        let texts: Vec<&str> = match &request {
            InferenceRequest::Completion(c) => c.prompts.iter().map(String::as_str).collect(),
            InferenceRequest::Chat(c) => c
                .messages
                .iter()
                .filter_map(|m| m.content.as_deref())
                .collect(),
            InferenceRequest::Pooling(p) => p.texts.iter().map(String::as_str).collect(),
        };
        if texts.iter().any(|t| t.contains("forbidden")) {
            return RequestDecision::Reject(Rejection {
                status: 403,
                message: "forbidden by the 0.3.0 guard".into(),
            });
        }
        match request {
            InferenceRequest::Pooling(mut p) => {
                p.texts = p.texts.iter().map(|t| t.to_uppercase()).collect();
                RequestDecision::Modify(InferenceRequest::Pooling(p))
            }
            _ => RequestDecision::Proceed,
        }
    }
}

export!(Plugin);
