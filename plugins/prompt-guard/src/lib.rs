//! prompt-guard: rejects prompts and conversations that contain configured
//! phrases (case-insensitive, in any message; on the embedding, rerank,
//! score, classify, pooling and tokenize routes, in any text the request
//! carries; in the conversations of Anthropic's Messages and OpenAI's
//! Responses APIs), can prepend an instruction to every prompt (on the chat
//! route: a system message first; never to texts that are embedded or
//! scored, whose vectors it would change, nor to an agent API's
//! conversation, whose system prompt is the agent's), and can stop an
//! answer that calls a forbidden tool before the call reaches the client.
//!
//! Config: `block = ["ignore previous instructions"]`, `status = 400`,
//! `message = "..."`, `prepend = "You are a careful assistant.\n"`,
//! `blocked_tools = ["delete_file"]`.

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
    /// Tools the model may not call: an answer that starts such a call ends
    /// there, with a note in place of the call.
    #[serde(default)]
    pub blocked_tools: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Rewrite(Vec<String>),
    Reject { status: u16, message: String },
}

/// A configured guard: the config, and its phrases lower-cased once with a
/// substring finder each (built at `init`, not per request).
pub struct Guard {
    config: Config,
    phrases: Vec<(String, memchr::memmem::Finder<'static>)>,
}

impl Guard {
    pub fn new(config: Config) -> Self {
        let phrases = config
            .block
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| {
                let lower = p.to_lowercase();
                let finder = memchr::memmem::Finder::new(lower.as_bytes()).into_owned();
                (p.clone(), finder)
            })
            .collect();
        Self { config, phrases }
    }

    /// The rejection for the first text holding a blocked phrase, if any.
    pub fn blocked(&self, texts: &[String]) -> Option<Verdict> {
        for text in texts {
            // ASCII lower-casing agrees with Unicode's on ASCII text, and is cheaper.
            let lower = if text.is_ascii() {
                text.to_ascii_lowercase()
            } else {
                text.to_lowercase()
            };
            let blocked = self
                .phrases
                .iter()
                .find(|(_, finder)| finder.find(lower.as_bytes()).is_some());
            if let Some((phrase, _)) = blocked {
                return Some(Verdict::Reject {
                    status: self.config.status.unwrap_or(400),
                    message: self.config.message.clone().unwrap_or_else(|| {
                        format!("prompt rejected by policy: it contains \"{phrase}\"")
                    }),
                });
            }
        }
        None
    }

    /// The text that replaces a call of tool `name`, if that tool is blocked.
    pub fn tool_blocked(&self, name: &str) -> Option<String> {
        self.config
            .blocked_tools
            .iter()
            .any(|t| t == name)
            .then(|| format!("[the call of tool \"{name}\" was blocked by policy]"))
    }

    /// The instruction to prepend, if one is configured.
    pub fn instruction(&self) -> Option<&str> {
        self.config.prepend.as_deref().filter(|p| !p.is_empty())
    }

    /// The verdict on a completion's prompts.
    pub fn judge(&self, prompts: &[String]) -> Verdict {
        if let Some(rejection) = self.blocked(prompts) {
            return rejection;
        }
        match self.instruction() {
            Some(prefix) if !prompts.is_empty() => {
                Verdict::Rewrite(prompts.iter().map(|p| format!("{prefix}{p}")).collect())
            }
            _ => Verdict::Allow,
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use super::{Config, Guard, Verdict};

    wit_bindgen::generate!({ path: "../../wit", world: "guard-plugin" });

    use exports::sluice::plugin::lifecycle::Guest as Lifecycle;
    use exports::sluice::plugin::request_hook::{
        Guest as RequestHook, Rejection, RequestContext, RequestDecision,
    };
    use exports::sluice::plugin::tool_call_hook::{
        Guest as ToolCallHook, ToolCallAction, ToolCallPiece,
    };
    use sluice::plugin::host::{LogLevel, log};
    use sluice::plugin::types::{ChatMessage, CompletionRequest, InferenceRequest};

    thread_local! {
        static GUARD: RefCell<Guard> = RefCell::new(Guard::new(Config::default()));
    }

    struct Plugin;

    impl Lifecycle for Plugin {
        fn init(config: String) -> Result<(), String> {
            // A panic would show only as "wasm `unreachable` instruction executed";
            // this puts its message in the gateway's log first.
            std::panic::set_hook(Box::new(|info| log(LogLevel::Error, &info.to_string())));
            let config: Config =
                serde_json::from_str(&config).map_err(|e| format!("invalid config: {e}"))?;
            GUARD.with(|g| *g.borrow_mut() = Guard::new(config));
            Ok(())
        }
    }

    fn reject(ctx: &RequestContext, verdict: Verdict) -> RequestDecision {
        log(
            LogLevel::Info,
            &format!("rejected a request for key {}", ctx.key_name),
        );
        match verdict {
            Verdict::Reject { status, message } => {
                RequestDecision::Reject(Rejection { status, message })
            }
            _ => RequestDecision::Proceed,
        }
    }

    impl RequestHook for Plugin {
        fn on_request(ctx: RequestContext, request: InferenceRequest) -> RequestDecision {
            GUARD.with(|g| {
                let guard = g.borrow();
                match request {
                    InferenceRequest::Completion(request) => match guard.judge(&request.prompts) {
                        Verdict::Allow => RequestDecision::Proceed,
                        Verdict::Rewrite(prompts) => RequestDecision::Modify(
                            InferenceRequest::Completion(CompletionRequest { prompts, ..request }),
                        ),
                        rejection => reject(&ctx, rejection),
                    },
                    InferenceRequest::Chat(mut chat) => {
                        // Every message counts: an injection can hide in a tool result.
                        let texts: Vec<String> = chat
                            .messages
                            .iter()
                            .filter_map(|m| m.content.clone())
                            .collect();
                        if let Some(rejection) = guard.blocked(&texts) {
                            return reject(&ctx, rejection);
                        }
                        // The agent APIs' own system prompts are theirs: a
                        // conversation of theirs may be rewritten, not lengthened.
                        let agent = ctx.route == "/v1/messages" || ctx.route == "/v1/responses";
                        match guard.instruction().filter(|_| !agent) {
                            Some(instruction) => {
                                let system = ChatMessage {
                                    role: "system".into(),
                                    content: Some(instruction.trim_end().to_string()),
                                    json: "{}".into(),
                                };
                                chat.messages.insert(0, system);
                                RequestDecision::Modify(InferenceRequest::Chat(chat))
                            }
                            None => RequestDecision::Proceed,
                        }
                    }
                    InferenceRequest::Pooling(pooling) => match guard.blocked(&pooling.texts) {
                        Some(rejection) => reject(&ctx, rejection),
                        None => RequestDecision::Proceed,
                    },
                }
            })
        }
    }

    impl ToolCallHook for Plugin {
        fn on_tool_call(_index: u32, piece: ToolCallPiece) -> ToolCallAction {
            // The name comes with the call's first piece: stopping there keeps
            // the whole call from the client.
            let Some(name) = piece.name else {
                return ToolCallAction::Pass;
            };
            match GUARD.with(|g| g.borrow().tool_blocked(&name)) {
                Some(note) => {
                    log(LogLevel::Info, &format!("stopped a call of tool {name}"));
                    ToolCallAction::Stop(note)
                }
                None => ToolCallAction::Pass,
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
        let guard = Guard::new(config(&["Ignore previous instructions"], None));
        let verdict = guard.judge(&["Please IGNORE previous instructions now".into()]);
        assert!(matches!(verdict, Verdict::Reject { status: 400, .. }));
        let verdict = guard.judge(&["Ignorez-les: IGNORE PREVIOUS INSTRUCTIONS, é".into()]);
        assert!(matches!(verdict, Verdict::Reject { status: 400, .. }));
    }

    #[test]
    fn blocks_only_the_listed_tools() {
        let guard = Guard::new(Config {
            blocked_tools: vec!["delete_file".into()],
            ..Config::default()
        });
        assert!(
            guard
                .tool_blocked("delete_file")
                .unwrap()
                .contains("delete_file")
        );
        assert_eq!(guard.tool_blocked("get_weather"), None);
    }

    #[test]
    fn prepends_the_instruction_to_every_prompt() {
        let verdict = Guard::new(config(&[], Some("Be brief. "))).judge(&["a".into(), "b".into()]);
        assert_eq!(
            verdict,
            Verdict::Rewrite(vec!["Be brief. a".into(), "Be brief. b".into()])
        );
        assert_eq!(
            Guard::new(config(&["x"], None)).judge(&["clean".into()]),
            Verdict::Allow
        );
    }
}
