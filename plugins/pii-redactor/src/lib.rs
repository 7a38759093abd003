//! pii-redactor: replaces e-mail addresses and phone numbers in prompts, in
//! the text of every chat message (and of every turn of a Messages or
//! Responses API conversation: system, messages, instructions, tool
//! outputs), and in every text an embedding, rerank,
//! score, classify, pooling or tokenize request carries (inputs, queries,
//! documents) before they reach the model (or the cache key).
//!
//! Config: `email = "[EMAIL]"`, `phone = "[PHONE]"` (the replacements).

#[derive(serde::Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_email")]
    pub email: String,
    #[serde(default = "default_phone")]
    pub phone: String,
}

fn default_email() -> String {
    "[EMAIL]".into()
}
fn default_phone() -> String {
    "[PHONE]".into()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            email: default_email(),
            phone: default_phone(),
        }
    }
}

fn is_email_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._%+-".contains(&b)
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".-".contains(&b)
}

// Both scans work on bytes: every byte they look for is ASCII, and no byte of
// a multi-byte character is, so an address or number never splits a character.

/// Replaces e-mail addresses (`local@domain.tld`) in `text`.
fn redact_emails(text: &str, replacement: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut pending = 0; // where the text not yet copied to `out` starts
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'@' {
            let mut start = i;
            while start > pending && is_email_local(bytes[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < bytes.len() && is_domain(bytes[end]) {
                end += 1;
            }
            while end > i + 1 && bytes[end - 1] == b'.' {
                end -= 1; // a trailing full stop ends the sentence, not the domain
            }
            let domain = &text[i + 1..end];
            let valid_domain = domain.contains('.')
                && !domain.starts_with('.')
                && domain.rsplit('.').next().is_some_and(|tld| tld.len() >= 2);
            if start < i && valid_domain {
                out.push_str(&text[pending..start]);
                out.push_str(replacement);
                i = end;
                pending = end;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&text[pending..]);
    out
}

/// Replaces phone numbers: runs of 7 to 15 digits, optionally with a leading
/// `+` and `-`, `.`, space or parenthesis separators.
fn redact_phones(text: &str, replacement: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut pending = 0;
    let mut i = 0;
    while i < bytes.len() {
        let starts_number = bytes[i].is_ascii_digit()
            || ((bytes[i] == b'+' || bytes[i] == b'(')
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit));
        // `i` is at an ASCII byte here, so at a character boundary.
        if !starts_number
            || text[..i]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric)
        {
            i += 1;
            continue;
        }
        let mut end = i;
        let mut digits = 0;
        let mut last_digit_end = i;
        while end < bytes.len() {
            let b = bytes[end];
            if b.is_ascii_digit() {
                digits += 1;
                last_digit_end = end + 1;
            } else if !b"+-. ()".contains(&b)
                || (b == b' '
                    && bytes
                        .get(end + 1)
                        .is_some_and(|n| !n.is_ascii_digit() && *n != b'('))
            {
                break;
            }
            end += 1;
        }
        let followed_by_word = text[last_digit_end..]
            .chars()
            .next()
            .is_some_and(char::is_alphanumeric);
        if (7..=15).contains(&digits) && !followed_by_word {
            out.push_str(&text[pending..i]);
            out.push_str(replacement);
            pending = last_digit_end;
            i = last_digit_end;
            continue;
        }
        i = last_digit_end.max(i + 1);
    }
    out.push_str(&text[pending..]);
    out
}

pub fn redact(config: &Config, text: &str) -> String {
    // Most prompts hold neither: skip the scans that cannot find anything.
    let emails = if text.contains('@') {
        std::borrow::Cow::Owned(redact_emails(text, &config.email))
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    if emails.bytes().any(|b| b.is_ascii_digit()) {
        redact_phones(&emails, &config.phone)
    } else {
        emails.into_owned()
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use super::{Config, redact};

    wit_bindgen::generate!({ path: "../../wit", world: "request-plugin" });

    use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
    use exports::sluice::plugin::request_hook::{
        Guest as RequestHook, RequestContext, RequestDecision,
    };
    use sluice::plugin::types::InferenceRequest;

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

    /// Redacts `text` in place; true when it changed.
    fn redact_in_place(config: &Config, text: &mut String) -> bool {
        let redacted = redact(config, text);
        let changed = redacted != *text;
        *text = redacted;
        changed
    }

    impl RequestHook for Plugin {
        fn on_request(_ctx: RequestContext, mut request: InferenceRequest) -> RequestDecision {
            let changed = CONFIG.with(|c| {
                let config = c.borrow();
                let mut changed = false;
                match &mut request {
                    InferenceRequest::Completion(completion) => {
                        for prompt in &mut completion.prompts {
                            changed |= redact_in_place(&config, prompt);
                        }
                    }
                    InferenceRequest::Chat(chat) => {
                        for text in chat.messages.iter_mut().filter_map(|m| m.content.as_mut()) {
                            changed |= redact_in_place(&config, text);
                        }
                    }
                    InferenceRequest::Pooling(pooling) => {
                        for text in &mut pooling.texts {
                            changed |= redact_in_place(&config, text);
                        }
                    }
                }
                changed
            });
            match changed {
                true => RequestDecision::Modify(request),
                false => RequestDecision::Proceed,
            }
        }
    }

    export!(Plugin);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_emails_and_phone_numbers() {
        let c = Config::default();
        assert_eq!(
            redact(
                &c,
                "Mail jane.doe+x@example.co.uk or call +1 (555) 123-4567."
            ),
            "Mail [EMAIL] or call [PHONE]."
        );
        assert_eq!(
            redact(&c, "Reach me at bob@mail.example.com."),
            "Reach me at [EMAIL]."
        );
        assert_eq!(redact(&c, "call 555.123.4567 now"), "call [PHONE] now");
    }

    // The first, char-by-char implementation: the byte scans must agree with it.
    fn char_email_local(c: char) -> bool {
        c.is_ascii_alphanumeric() || "._%+-".contains(c)
    }

    fn char_domain(c: char) -> bool {
        c.is_ascii_alphanumeric() || ".-".contains(c)
    }

    // Replaces e-mail addresses (`local@domain.tld`) in `text`.
    fn reference_emails(text: &str, replacement: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        let mut start_of_pending = 0;
        while i < chars.len() {
            if chars[i] == '@' {
                let mut start = i;
                while start > start_of_pending && char_email_local(chars[start - 1]) {
                    start -= 1;
                }
                let mut end = i + 1;
                while end < chars.len() && char_domain(chars[end]) {
                    end += 1;
                }
                while end > i + 1 && chars[end - 1] == '.' {
                    end -= 1; // a trailing full stop ends the sentence, not the domain
                }
                let domain: String = chars[i + 1..end].iter().collect();
                let valid_domain = domain.contains('.')
                    && !domain.starts_with('.')
                    && domain.rsplit('.').next().is_some_and(|tld| tld.len() >= 2);
                if start < i && valid_domain {
                    out.extend(&chars[start_of_pending..start]);
                    out.push_str(replacement);
                    i = end;
                    start_of_pending = end;
                    continue;
                }
            }
            i += 1;
        }
        out.extend(&chars[start_of_pending..]);
        out
    }

    // Replaces phone numbers: runs of 7 to 15 digits, optionally with a leading
    // `+` and `-`, `.`, space or parenthesis separators.
    fn reference_phones(text: &str, replacement: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < chars.len() {
            let starts_number = chars[i].is_ascii_digit()
                || ((chars[i] == '+' || chars[i] == '(')
                    && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()));
            let preceded_by_word = i > 0 && (chars[i - 1].is_alphanumeric());
            if starts_number && !preceded_by_word {
                let mut end = i;
                let mut digits = 0;
                let mut last_digit_end = i;
                while end < chars.len() {
                    let c = chars[end];
                    if c.is_ascii_digit() {
                        digits += 1;
                        last_digit_end = end + 1;
                    } else if !("+-. ()".contains(c))
                        || (c == ' '
                            && chars
                                .get(end + 1)
                                .is_some_and(|n| !n.is_ascii_digit() && *n != '('))
                    {
                        break;
                    }
                    end += 1;
                }
                let followed_by_word = chars
                    .get(last_digit_end)
                    .is_some_and(|c| c.is_alphanumeric());
                if (7..=15).contains(&digits) && !followed_by_word {
                    out.push_str(replacement);
                    i = last_digit_end;
                    continue;
                }
                out.extend(&chars[i..last_digit_end.max(i + 1)]);
                i = last_digit_end.max(i + 1);
                continue;
            }
            out.push(chars[i]);
            i += 1;
        }
        out
    }

    #[test]
    fn the_byte_scans_agree_with_the_char_scans() {
        let pieces = [
            "a", "Z", "é", "例", "@", ".", "-", "+", "(", ")", " ", "5", "12", "555", "x.fr", "ü",
        ];
        let mut seed = 3u64;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let len = (seed >> 40) as usize % 16;
            let text: String = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    pieces[(seed >> 33) as usize % pieces.len()]
                })
                .collect();
            assert_eq!(
                redact_emails(&text, "[E]"),
                reference_emails(&text, "[E]"),
                "{text:?}"
            );
            assert_eq!(
                redact_phones(&text, "[P]"),
                reference_phones(&text, "[P]"),
                "{text:?}"
            );
        }
    }

    #[test]
    fn leaves_ordinary_numbers_and_at_signs_alone() {
        let c = Config::default();
        for text in [
            "In 2024 we sold 120 units",
            "meet @noon",
            "version 1.2.3",
            "a@b",
            "order #12345",
            "no digits, no at sign: é",
        ] {
            assert_eq!(redact(&c, text), text);
        }
    }
}
