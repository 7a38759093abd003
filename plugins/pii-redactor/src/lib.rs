//! pii-redactor: replaces e-mail addresses and phone numbers in prompts
//! before they reach the model (or the cache key).
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

fn is_email_local(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._%+-".contains(c)
}

fn is_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || ".-".contains(c)
}

/// Replaces e-mail addresses (`local@domain.tld`) in `text`.
fn redact_emails(text: &str, replacement: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut start_of_pending = 0;
    while i < chars.len() {
        if chars[i] == '@' {
            let mut start = i;
            while start > start_of_pending && is_email_local(chars[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < chars.len() && is_domain(chars[end]) {
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

/// Replaces phone numbers: runs of 7 to 15 digits, optionally with a leading
/// `+` and `-`, `.`, space or parenthesis separators.
fn redact_phones(text: &str, replacement: &str) -> String {
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
        CompletionRequest, Guest as RequestHook, RequestContext, RequestDecision,
    };

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

    impl RequestHook for Plugin {
        fn on_request(_ctx: RequestContext, request: CompletionRequest) -> RequestDecision {
            let redacted: Vec<String> = CONFIG.with(|c| {
                request
                    .prompts
                    .iter()
                    .map(|p| redact(&c.borrow(), p))
                    .collect()
            });
            if redacted == request.prompts {
                RequestDecision::Proceed
            } else {
                RequestDecision::Modify(CompletionRequest {
                    prompts: redacted,
                    ..request
                })
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
