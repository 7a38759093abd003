//! A token plugin built against the first `on-tokens` signature
//! (`texts: list<string>`, kept in `wit/` here), for the host's test that
//! such a plugin still loads and filters cache hits through `on-token`.
//! `on-token` upper-cases; the old `on-tokens` answers `BATCH` for every
//! text, so a host that called it would show.

wit_bindgen::generate!({ path: "wit", world: "batched-token-plugin" });

use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
use exports::sluice::plugin::token_batch_hook::Guest as TokenBatchHook;
use exports::sluice::plugin::token_hook::{Guest as TokenHook, TokenAction};

struct Plugin;

impl Lifecycle for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
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

impl TokenBatchHook for Plugin {
    fn on_tokens(_index: u32, texts: Vec<String>) -> Vec<TokenAction> {
        texts
            .iter()
            .map(|_| TokenAction::Replace("BATCH".into()))
            .collect()
    }
}

export!(Plugin);
