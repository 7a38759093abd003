//! token-censor: masks configured words in generated text, even when a word
//! is split across chunks (" da" + "rn it"). Matching is case-insensitive and
//! by substring.
//!
//! Config: `words = ["darn", "heck"]`, `mask = "[censored]"` (default: one `*`
//! per character of the word).

use std::borrow::Cow;

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
pub struct Censor {
    words: Vec<String>,
    mask: Option<String>,
    /// Whether some word starts with this byte (in either case, for ASCII):
    /// most texts and most positions are ruled out with one lookup per byte.
    starts_word: [bool; 256],
    /// Length of the longest word: only a shorter suffix can start one.
    longest: usize,
    /// Held text per choice (a list: a response has one choice or a few).
    held: Vec<(u32, String)>,
}

/// What to do with one chunk's text.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Replace(String),
    Hold,
}

impl Default for Censor {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl Censor {
    pub fn new(config: Config) -> Self {
        let words: Vec<String> = config
            .words
            .into_iter()
            .filter(|w| !w.is_empty())
            .map(|w| w.to_lowercase())
            .collect();
        let mut starts_word = [false; 256];
        for word in &words {
            let first = word.as_bytes()[0];
            starts_word[usize::from(first)] = true;
            starts_word[usize::from(first.to_ascii_uppercase())] = true;
        }
        Self {
            longest: words.iter().map(String::len).max().unwrap_or(0),
            words,
            mask: config.mask,
            starts_word,
            held: Vec::new(),
        }
    }

    fn take_held(&mut self, index: u32) -> String {
        if self.held.is_empty() {
            return String::new();
        }
        match self.held.iter().position(|(i, _)| *i == index) {
            Some(at) => self.held.swap_remove(at).1,
            None => String::new(),
        }
    }

    fn mask_for(&self, word: &str) -> String {
        self.mask
            .clone()
            .unwrap_or_else(|| "*".repeat(word.chars().count()))
    }

    /// Masks every whole occurrence of a word in `text`; borrows `text` when
    /// there is none (the usual case: no copy, no allocation).
    fn censor<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if text.is_ascii() {
            self.censor_ascii(text)
        } else {
            Cow::Owned(self.censor_unicode(text))
        }
    }

    /// The word at byte `i` of ASCII `text`, compared without allocating.
    #[inline]
    fn word_at(&self, text: &[u8], i: usize) -> Option<&str> {
        if !self.starts_word[usize::from(text[i])] {
            return None;
        }
        self.words
            .iter()
            .find(|w| {
                text.get(i..i + w.len())
                    .is_some_and(|t| t.eq_ignore_ascii_case(w.as_bytes()))
            })
            .map(String::as_str)
    }

    /// Where the first word in ASCII `text` at or after byte `from` starts:
    /// a tight scan for bytes that can start one, and a comparison only there.
    fn next_word_ascii(&self, text: &[u8], from: usize) -> Option<usize> {
        let mut i = from;
        while let Some(skip) = text
            .get(i..)?
            .iter()
            .position(|&b| self.starts_word[usize::from(b)])
        {
            i += skip;
            if self.word_at(text, i).is_some() {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    fn censor_ascii<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let bytes = text.as_bytes();
        let Some(first) = self.next_word_ascii(bytes, 0) else {
            return Cow::Borrowed(text);
        };
        let mut out = String::with_capacity(text.len() + 16);
        out.push_str(&text[..first]);
        let mut i = first;
        while i < bytes.len() {
            match self.word_at(bytes, i) {
                Some(word) => {
                    out.push_str(&self.mask_for(word));
                    i += word.len();
                }
                None => {
                    out.push(char::from(bytes[i]));
                    i += 1;
                }
            }
        }
        Cow::Owned(out)
    }

    /// The general case: lower-cases the text (when that keeps byte offsets;
    /// otherwise matches case-sensitively) and scans it char by char.
    fn censor_unicode(&self, text: &str) -> String {
        let lower = text.to_lowercase();
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
        let ascii = text.is_ascii();
        let lower = if ascii {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(text.to_lowercase())
        };
        if lower.len() != text.len() {
            return 0;
        }
        let window =
            &lower.as_bytes()[lower.len().saturating_sub(self.longest.saturating_sub(1))..];
        if ascii && !window.iter().any(|&b| self.starts_word[usize::from(b)]) {
            return 0;
        }
        let tail_matches = |len: usize, word: &str| {
            let tail = &lower.as_bytes()[lower.len() - len..];
            if ascii {
                tail.eq_ignore_ascii_case(&word.as_bytes()[..len])
            } else {
                tail == &word.as_bytes()[..len]
            }
        };
        let mut best = 0;
        for word in &self.words {
            for len in (1..word.len().min(lower.len() + 1)).rev() {
                if len <= best {
                    break;
                }
                if lower.is_char_boundary(lower.len() - len)
                    && word.is_char_boundary(len)
                    && tail_matches(len, word)
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    pub fn on_text(&mut self, index: u32, text: &str) -> Action {
        // The common case, decided in one pass: no byte of an ASCII text can
        // start a word, so it holds no word and no word's beginning.
        if self.held.is_empty()
            && text.is_ascii()
            && !text.bytes().any(|b| self.starts_word[usize::from(b)])
        {
            return Action::Pass;
        }
        let mut held = self.take_held(index);
        let had_held = !held.is_empty();
        let combined = if had_held {
            held.push_str(text);
            Cow::Owned(held)
        } else {
            Cow::Borrowed(text)
        };
        let censored = self.censor(&combined);
        let unchanged = !had_held && matches!(censored, Cow::Borrowed(_));
        let keep = self.partial_suffix(&censored);
        let (emit, hold) = censored.split_at(censored.len() - keep);
        if !hold.is_empty() {
            self.held.push((index, hold.to_string()));
        }
        if emit.is_empty() {
            Action::Hold
        } else if unchanged && hold.is_empty() {
            Action::Pass
        } else {
            Action::Replace(emit.to_string())
        }
    }

    /// Filters the consecutive texts of choice `index` that `whole` holds,
    /// text `i` ending at byte `ends[i]` (the `on-tokens` form). The text sent
    /// in total is what [`Censor::on_text`] on each would send. Seeing what
    /// follows, it holds back only the end of the last text: when no word
    /// occurs anywhere, every text but that end passes unchanged (where
    /// `on_text` would hold each possible start of a word until the next text).
    ///
    /// Each action goes through `to` (the plugin's own action type) as it is made.
    pub fn on_texts<A>(
        &mut self,
        index: u32,
        whole: &str,
        ends: &[u32],
        mut to: impl FnMut(Action) -> A,
    ) -> Vec<A> {
        let nothing_held = self.held.iter().all(|(i, _)| *i != index);
        let bounds_ok = ends.last().is_some_and(|&e| e as usize == whole.len())
            && ends.is_sorted()
            && ends.iter().all(|&e| whole.is_char_boundary(e as usize));
        if !(nothing_held && bounds_ok && matches!(self.censor(whole), Cow::Borrowed(_))) {
            return split_texts(whole, ends)
                .map(|text| to(self.on_text(index, text)))
                .collect();
        }
        let cut = whole.len() - self.partial_suffix(whole);
        if cut < whole.len() {
            self.held.push((index, whole[cut..].to_string()));
        }
        let mut start = 0;
        ends.iter()
            .map(|&end| {
                let (text_start, end) = (start, end as usize);
                start = end;
                to(if end <= cut {
                    Action::Pass
                } else if text_start >= cut {
                    Action::Hold
                } else {
                    Action::Replace(whole[text_start..cut].to_string())
                })
            })
            .collect()
    }

    pub fn on_end(&mut self, index: u32) -> String {
        self.take_held(index)
    }
}

/// The texts of an `on-tokens` call: `text` cut at the offsets in `ends`
/// (an offset out of range or off a character boundary gives an empty text).
pub fn split_texts<'t>(text: &'t str, ends: &'t [u32]) -> impl Iterator<Item = &'t str> + 't {
    let mut start = 0;
    ends.iter().map(move |&end| {
        let end = end as usize;
        let piece = text.get(start..end).unwrap_or("");
        start = end;
        piece
    })
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
        fn on_tokens(index: u32, text: String, ends: Vec<u32>) -> Vec<TokenAction> {
            CENSOR.with(|c| c.borrow_mut().on_texts(index, &text, &ends, to_wit))
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

    /// Appends what `action` sends for `chunk`.
    fn send(out: &mut String, action: Action, chunk: &str) {
        match action {
            Action::Pass => out.push_str(chunk),
            Action::Replace(text) => out.push_str(&text),
            Action::Hold => {}
        }
    }

    fn run(c: &mut Censor, chunks: &[&str]) -> String {
        let mut out = String::new();
        for chunk in chunks {
            send(&mut out, c.on_text(0, chunk), chunk);
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

    /// What `on_texts` sends in total, then the end flush.
    fn run_batch(c: &mut Censor, chunks: &[&str]) -> String {
        let whole: String = chunks.concat();
        let mut ends = Vec::new();
        let mut end = 0;
        for chunk in chunks {
            end += chunk.len();
            ends.push(end as u32);
        }
        let mut out = String::new();
        for (action, chunk) in c.on_texts(0, &whole, &ends, |a| a).into_iter().zip(chunks) {
            send(&mut out, action, chunk);
        }
        out + &c.on_end(0)
    }

    #[test]
    fn a_batch_sends_what_text_by_text_sends() {
        let words = ["darn", "heck", "a"];
        let alphabet = [
            "d", "a", "r", "n", "D", "h", "e", "c", "k", " ", "x", "é", "da",
        ];
        let mut seed = 11u64;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize % n
        };
        for _ in 0..3_000 {
            let chunks: Vec<String> = (0..next(6))
                .map(|_| {
                    (0..next(4))
                        .map(|_| alphabet[next(alphabet.len())])
                        .collect()
                })
                .collect();
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let mask = (next(2) == 0).then_some("#");
            let one_by_one = run(&mut censor(&words, mask), &chunks);
            assert_eq!(
                run_batch(&mut censor(&words, mask), &chunks),
                one_by_one,
                "{chunks:?}"
            );
        }
    }

    #[test]
    fn a_batch_without_words_passes_all_but_a_possible_start_at_its_end() {
        let mut c = censor(&["darn", "heck"], None);
        let actions = c.on_texts(0, " the river and", &[4, 10, 14], |a| a);
        assert_eq!(
            actions,
            [Action::Pass, Action::Pass, Action::Replace(" an".into())]
        );
        assert_eq!(c.on_end(0), "d");
        let actions = c.on_texts(0, " da", &[2, 3], |a| a);
        assert_eq!(actions, [Action::Replace(" ".into()), Action::Hold]);
        assert_eq!(c.on_end(0), "da");
    }

    #[test]
    fn split_texts_cuts_at_the_offsets() {
        let texts: Vec<&str> = split_texts(" da rn é!", &[3, 6, 9, 10]).collect();
        assert_eq!(texts, [" da", " rn", " é", "!"]);
        assert_eq!(split_texts("abc", &[]).count(), 0);
    }

    #[test]
    fn choices_are_independent() {
        let mut c = censor(&["darn"], None);
        assert_eq!(c.on_text(0, "da"), Action::Hold);
        assert_eq!(c.on_text(1, "rn"), Action::Pass);
        assert_eq!(c.on_text(0, "rn"), Action::Replace("****".into()));
    }

    #[test]
    fn the_ascii_fast_path_agrees_with_the_general_definitions() {
        let c = censor(&["darn", "heck", "a"], Some("#"));
        let alphabet = [
            "d", "a", "r", "n", "D", "A", "R", "N", "h", "e", "c", "k", "H", "E", "C", "K", " ",
            "x",
        ];
        let mut seed = 7u64;
        for _ in 0..5_000 {
            let len = (seed % 40) as usize;
            let text: String = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            seed = seed.wrapping_add(1);
            assert_eq!(c.censor(&text), c.censor_unicode(&text), "{text:?}");
            let lower = text.to_lowercase();
            let longest_start = ["darn", "heck", "a"]
                .iter()
                .flat_map(|w| (1..w.len()).filter(|&n| lower.ends_with(&w[..n])))
                .max()
                .unwrap_or(0);
            assert_eq!(c.partial_suffix(&text), longest_start, "{text:?}");
        }
    }
}
