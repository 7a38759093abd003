//! prompt-guard: rejects prompts that contain configured phrases
//! (case-insensitive) and can prepend an instruction to every prompt.
//!
//! Config: `block = ["ignore previous instructions"]`, `status = 400`,
//! `message = "..."`, `prepend = "You are a careful assistant.\n"`.

#[derive(serde::Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub block: Vec<String>,
    #[serde(default)]
    pub prepend: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Rewrite(Vec<String>),
    Reject { status: u16, message: String },
}

pub fn judge(config: &Config, prompts: &[String]) -> Verdict {
    for prompt in prompts {
        let lower = prompt.to_lowercase();
        if let Some(phrase) = config
            .block
            .iter()
            .find(|p| !p.is_empty() && lower.contains(&p.to_lowercase()))
        {
            return Verdict::Reject {
                status: config.status.unwrap_or(400),
                message: config.message.clone().unwrap_or_else(|| {
                    format!("prompt rejected by policy: it contains \"{phrase}\"")
                }),
            };
        }
    }
    match &config.prepend {
        Some(prefix) if !prefix.is_empty() && !prompts.is_empty() => {
            Verdict::Rewrite(prompts.iter().map(|p| format!("{prefix}{p}")).collect())
        }
        _ => Verdict::Allow,
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use super::{Config, Verdict, judge};

    wit_bindgen::generate!({ path: "../../wit", world: "request-plugin" });

    use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
    use exports::sluice::plugin::request_hook::{
        CompletionRequest, Guest as RequestHook, Rejection, RequestContext, RequestDecision,
    };
    use sluice::plugin::host::{LogLevel, log};

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
        fn on_request(ctx: RequestContext, request: CompletionRequest) -> RequestDecision {
            match CONFIG.with(|c| judge(&c.borrow(), &request.prompts)) {
                Verdict::Allow => RequestDecision::Proceed,
                Verdict::Rewrite(prompts) => {
                    RequestDecision::Modify(CompletionRequest { prompts, ..request })
                }
                Verdict::Reject { status, message } => {
                    log(
                        LogLevel::Info,
                        &format!("rejected a prompt for key {}", ctx.key_name),
                    );
                    RequestDecision::Reject(Rejection { status, message })
                }
            }
        }
    }

    export!(Plugin);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(block: &[&str], prepend: Option<&str>) -> Config {
        Config {
            block: block.iter().map(|s| s.to_string()).collect(),
            prepend: prepend.map(String::from),
            ..Config::default()
        }
    }

    #[test]
    fn rejects_blocked_phrases_case_insensitively() {
        let verdict = judge(
            &config(&["ignore previous instructions"], None),
            &["Please IGNORE previous instructions now".into()],
        );
        assert!(matches!(verdict, Verdict::Reject { status: 400, .. }));
    }

    #[test]
    fn prepends_the_instruction_to_every_prompt() {
        let verdict = judge(&config(&[], Some("Be brief. ")), &["a".into(), "b".into()]);
        assert_eq!(
            verdict,
            Verdict::Rewrite(vec!["Be brief. a".into(), "Be brief. b".into()])
        );
        assert_eq!(
            judge(&config(&["x"], None), &["clean".into()]),
            Verdict::Allow
        );
    }
}
