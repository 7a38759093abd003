//! A plugin built against `sluice:plugin@0.2.0`, for the host's tests that
//! such components keep working: `on-request` refuses completions and chats
//! containing "forbidden" with 403; it has no record for the embedding,
//! rerank and other routes 0.3.0 added.

wit_bindgen::generate!({ path: "../../../wit/legacy/plugin-0.2.0.wit", world: "guard-plugin" });

use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
use exports::sluice::plugin::request_hook::{
    Guest as RequestHook, InferenceRequest, Rejection, RequestContext, RequestDecision,
};
use exports::sluice::plugin::tool_call_hook::{
    Guest as ToolCallHook, ToolCallAction, ToolCallPiece,
};

struct Plugin;

impl Lifecycle for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

impl RequestHook for Plugin {
    fn on_request(_ctx: RequestContext, request: InferenceRequest) -> RequestDecision {
        let forbidden = match &request {
            InferenceRequest::Completion(c) => c.prompts.iter().any(|p| p.contains("forbidden")),
            InferenceRequest::Chat(c) => c
                .messages
                .iter()
                .filter_map(|m| m.content.as_deref())
                .any(|t| t.contains("forbidden")),
        };
        match forbidden {
            true => RequestDecision::Reject(Rejection {
                status: 403,
                message: "forbidden by the 0.2.0 guard".into(),
            }),
            false => RequestDecision::Proceed,
        }
    }
}

impl ToolCallHook for Plugin {
    fn on_tool_call(_index: u32, _piece: ToolCallPiece) -> ToolCallAction {
        ToolCallAction::Pass
    }
}

export!(Plugin);
