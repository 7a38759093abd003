//! token-censor: masks configured words in generated text, even when a word
//! is split across chunks (" da" + "rn it"). Matching is case-insensitive and
//! by substring.
//!
//! Config: `words = ["darn", "heck"]`, `mask = "[censored]"` (default: one `*`
//! per character of the word).

use std::collections::HashMap;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub words: Vec<String>,
    #[serde(default)]
    pub mask: Option<String>,
}

/// The censor of one response: the words, and per choice the text held back
/// because it might be the start of a word.
#[derive(Default)]
pub struct Censor {
    words: Vec<String>,
    mask: Option<String>,
    held: HashMap<u32, String>,
}

/// What to do with one chunk's text.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Replace(String),
    Hold,
}

impl Censor {
    pub fn new(config: Config) -> Self {
        Self {
            words: config
                .words
                .into_iter()
                .filter(|w| !w.is_empty())
                .map(|w| w.to_lowercase())
                .collect(),
            mask: config.mask,
            held: HashMap::new(),
        }
    }

    fn mask_for(&self, word: &str) -> String {
        self.mask
            .clone()
            .unwrap_or_else(|| "*".repeat(word.chars().count()))
    }

    /// Masks every whole occurrence of a word in `text`.
    fn censor(&self, text: &str) -> String {
        let lower = text.to_lowercase();
        // Lower-casing can change byte lengths outside ASCII; then match case-sensitively.
        let haystack = if lower.len() == text.len() {
            lower.as_str()
        } else {
            text
        };
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        'scan: while i < text.len() {
            if haystack.is_char_boundary(i) {
                for word in &self.words {
                    if haystack[i..].starts_with(word.as_str())
                        && text.is_char_boundary(i + word.len())
                    {
                        out.push_str(&self.mask_for(word));
                        i += word.len();
                        continue 'scan;
                    }
                }
            }
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
        out
    }

    /// Length of the longest suffix of `text` that could start a word.
    fn partial_suffix(&self, text: &str) -> usize {
        let lower = text.to_lowercase();
        if lower.len() != text.len() {
            return 0;
        }
        let mut best = 0;
        for word in &self.words {
            for len in (1..word.len().min(lower.len() + 1)).rev() {
                if len <= best {
                    break;
                }
                if lower.is_char_boundary(lower.len() - len)
                    && word.is_char_boundary(len)
                    && lower.ends_with(&word[..len])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    pub fn on_text(&mut self, index: u32, text: &str) -> Action {
        let held = self.held.remove(&index).unwrap_or_default();
        let combined = format!("{held}{text}");
        let censored = self.censor(&combined);
        let keep = self.partial_suffix(&censored);
        let (emit, hold) = censored.split_at(censored.len() - keep);
        if !hold.is_empty() {
            self.held.insert(index, hold.to_string());
        }
        if emit.is_empty() {
            Action::Hold
        } else if held.is_empty() && hold.is_empty() && emit == text {
            Action::Pass
        } else {
            Action::Replace(emit.to_string())
        }
    }

    pub fn on_end(&mut self, index: u32) -> String {
        self.held.remove(&index).unwrap_or_default()
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use super::{Action, Censor, Config};

    wit_bindgen::generate!({ path: "../../wit", world: "batched-token-plugin" });

    use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
    use exports::sluice::plugin::token_batch_hook::Guest as TokenBatchHook;
    use exports::sluice::plugin::token_hook::{Guest as TokenHook, TokenAction};

    thread_local! {
        static CENSOR: RefCell<Censor> = RefCell::new(Censor::default());
    }

    struct Plugin;

    impl Lifecycle for Plugin {
        fn init(config: String) -> Result<(), String> {
            let config: Config =
                serde_json::from_str(&config).map_err(|e| format!("invalid config: {e}"))?;
            CENSOR.with(|c| *c.borrow_mut() = Censor::new(config));
            Ok(())
        }
    }

    fn to_wit(action: Action) -> TokenAction {
        match action {
            Action::Pass => TokenAction::Pass,
            Action::Replace(text) => TokenAction::Replace(text),
            Action::Hold => TokenAction::Hold,
        }
    }

    impl TokenHook for Plugin {
        fn on_token(index: u32, text: String) -> TokenAction {
            to_wit(CENSOR.with(|c| c.borrow_mut().on_text(index, &text)))
        }

        fn on_end(index: u32) -> String {
            CENSOR.with(|c| c.borrow_mut().on_end(index))
        }
    }

    impl TokenBatchHook for Plugin {
        // The censor never stops a response, so every text gets an action.
        fn on_tokens(index: u32, texts: Vec<String>) -> Vec<TokenAction> {
            CENSOR.with(|c| {
                let mut censor = c.borrow_mut();
                texts
                    .iter()
                    .map(|text| to_wit(censor.on_text(index, text)))
                    .collect()
            })
        }
    }

    export!(Plugin);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn censor(words: &[&str], mask: Option<&str>) -> Censor {
        Censor::new(Config {
            words: words.iter().map(|w| w.to_string()).collect(),
            mask: mask.map(String::from),
        })
    }

    fn run(c: &mut Censor, chunks: &[&str]) -> String {
        let mut out = String::new();
        for chunk in chunks {
            match c.on_text(0, chunk) {
                Action::Pass => out.push_str(chunk),
                Action::Replace(text) => out.push_str(&text),
                Action::Hold => {}
            }
        }
        out + &c.on_end(0)
    }

    #[test]
    fn masks_words_within_a_chunk_and_passes_clean_text() {
        let mut c = censor(&["darn"], None);
        assert_eq!(c.on_text(0, "all clear"), Action::Pass);
        assert_eq!(run(&mut c, &["oh Darn it"]), "oh **** it");
    }

    #[test]
    fn masks_a_word_split_across_chunks() {
        let mut c = censor(&["darn", "heck"], Some("[x]"));
        assert_eq!(
            run(&mut c, &["what the ", "he", "ck, da", "r", "n"]),
            "what the [x], [x]"
        );
    }

    #[test]
    fn releases_held_text_that_turned_out_innocent() {
        let mut c = censor(&["darn"], None);
        assert_eq!(c.on_text(0, "I da"), Action::Replace("I ".into()));
        // The final "d" could still start "darn": it is held until the next chunk or the end.
        assert_eq!(c.on_text(0, "nced"), Action::Replace("dance".into()));
        assert_eq!(c.on_end(0), "d");
        let mut c = censor(&["darn"], None);
        assert_eq!(run(&mut c, &["ends with da"]), "ends with da");
    }

    #[test]
    fn choices_are_independent() {
        let mut c = censor(&["darn"], None);
        assert_eq!(c.on_text(0, "da"), Action::Hold);
        assert_eq!(c.on_text(1, "rn"), Action::Pass);
        assert_eq!(c.on_text(0, "rn"), Action::Replace("****".into()));
    }
}
