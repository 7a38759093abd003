//! A plugin built against `sluice:plugin@0.1.0` (the WIT in `wit/` here is
//! that version's, frozen), for the host's tests that such components keep
//! working: `on-request` refuses prompts containing "forbidden" with 403,
//! `on-token` upper-cases the generated text.

wit_bindgen::generate!({ path: "wit", world: "guard-plugin" });

use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
use exports::sluice::plugin::request_hook::{
    CompletionRequest, Guest as RequestHook, Rejection, RequestContext, RequestDecision,
};
use exports::sluice::plugin::token_hook::{Guest as TokenHook, TokenAction};

struct Plugin;

impl Lifecycle for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

impl RequestHook for Plugin {
    fn on_request(_ctx: RequestContext, request: CompletionRequest) -> RequestDecision {
        if request.prompts.iter().any(|p| p.contains("forbidden")) {
            return RequestDecision::Reject(Rejection {
                status: 403,
                message: "forbidden by the 0.1.0 guard".into(),
            });
        }
        RequestDecision::Proceed
    }
}

impl TokenHook for Plugin {
    fn on_token(_index: u32, text: String) -> TokenAction {
        TokenAction::Replace(text.to_uppercase())
    }

    fn on_end(_index: u32) -> String {
        String::new()
    }
}

export!(Plugin);
