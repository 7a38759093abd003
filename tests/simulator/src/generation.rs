//! One generation: what a request asks for, and its deterministic tokens
//! (a function of prompt, seed, choice and step).
//!
//! Like a model decoding greedily, the simulator continues its own answer:
//! a prompt that ends with the first `k` tokens it answers to the text
//! before them (an answer cut off, sent back to be continued; for chat, the
//! partial answer as the final assistant message with
//! `continue_final_message`) is answered with the rest of that answer,
//! token for token, as if it had never been interrupted.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use serde_json::Value;

use crate::SimulatorConfig;
use crate::wire::{
    ChatStreamChoice, Delta, FunctionDelta, Logprobs, StreamChoice, ToolCallDelta, Usage,
};

pub(crate) const VOCABULARY: &[&str] = &[
    "the", "river", "flows", "through", "a", "quiet", "valley", "where", "light", "falls", "on",
    "stone", "and", "water", "meets", "sky", "every", "morning", "brings", "new", "sound", "of",
    "wind", "over", "fields", "gate", "opens", "slowly", "as", "boats", "drift", "past", "old",
    "mills", "lanterns", "glow", "near", "harbor", "walls", "while", "gulls", "circle", "high",
    "above", "tide", "returns", "again", "to", "sand", "shore", "bright", "cold", "deep", "long",
    "narrow", "green", "silver", "north", "south", "east", "west", "path", "bridge", "sluice",
];

pub(crate) struct Generation {
    pub(crate) id: String,
    pub(crate) request_id: String,
    /// A chat request: what the answer is made of.
    pub(crate) chat: Option<ChatPlan>,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) prompts: Vec<(String, u64)>,
    pub(crate) n: u32,
    pub(crate) max_tokens: u32,
    /// The tokens a text answer has: `max_tokens`, or fewer when the answer
    /// ends by itself first (then its `finish_reason` is `stop`).
    pub(crate) text_len: u32,
    pub(crate) seed: i64,
    pub(crate) echo: bool,
    pub(crate) logprobs: Option<u32>,
    pub(crate) include_usage: bool,
    pub(crate) continuous_usage: bool,
    pub(crate) error_after: Option<u32>,
    pub(crate) stall_after: Option<u32>,
    pub(crate) drop_after: Option<u32>,
    pub(crate) first_token_delay: Duration,
    pub(crate) token_delay: Duration,
    pub(crate) record_emit_times: bool,
    /// Tokens of the answer the prompt already ends with (a continuation):
    /// this generation starts after them.
    pub(crate) continued: u32,
}

impl Generation {
    pub(crate) fn from_body(
        config: &SimulatorConfig,
        request_id: String,
        body: &Value,
    ) -> Result<Self, String> {
        let prompts: Vec<(String, u64)> = match body.get("prompt") {
            Some(Value::String(s)) => vec![(s.clone(), count_words(s))],
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(Value::as_str)
                .map(|s| (s.to_string(), count_words(s)))
                .collect(),
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
                vec![(format!("{items:?}"), items.len() as u64)]
            }
            Some(Value::Array(items)) => items
                .iter()
                .map(|batch| {
                    (
                        batch.to_string(),
                        batch.as_array().map_or(1, |b| b.len() as u64),
                    )
                })
                .collect(),
            _ => return Err("prompt is required".into()),
        };
        let seed = body.get("seed").and_then(Value::as_i64).unwrap_or(0);
        // A single prompt ending with the start of its own answer continues it.
        let mut prompts = prompts;
        let mut continued = 0;
        if let [(prompt, _)] = &mut prompts[..]
            && let Some((split, tokens)) = continuation(prompt, seed)
        {
            prompt.truncate(split);
            continued = tokens;
        }
        let number = |name: &str| body.get(name).and_then(Value::as_u64);
        let ms =
            |name: &str, default: Duration| number(name).map_or(default, Duration::from_millis);
        let options = body.get("stream_options");
        let option = |name: &str| {
            options
                .and_then(|o| o.get(name))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        Ok(Self {
            id: format!("cmpl-{request_id}"),
            request_id,
            chat: None,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: config.model.clone(),
            prompts,
            n: number("n").map_or(1, |n| n.max(1) as u32),
            max_tokens: number("max_tokens").map_or(config.default_max_tokens, |n| n as u32),
            text_len: 0,
            seed,
            echo: body.get("echo").and_then(Value::as_bool).unwrap_or(false),
            logprobs: number("logprobs").map(|n| n as u32),
            include_usage: option("include_usage")
                && !body
                    .get("sim_no_usage")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            continuous_usage: option("continuous_usage_stats"),
            error_after: number("sim_error_after").map(|n| n as u32),
            stall_after: number("sim_stall_after").map(|n| n as u32),
            drop_after: number("sim_drop_after").map(|n| n as u32),
            first_token_delay: ms("sim_first_token_delay_ms", config.first_token_delay),
            token_delay: ms("sim_token_delay_ms", config.token_delay),
            record_emit_times: config.record_emit_times,
            continued,
        }
        .end_naturally(config, body))
    }

    /// Sets how long the text answer is: `max_tokens`, unless the answer
    /// (a function of the first prompt and the seed) ends before.
    fn end_naturally(mut self, config: &SimulatorConfig, body: &Value) -> Self {
        let ignore_eos = body
            .get("ignore_eos")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let range = &config.answer_tokens;
        let natural = range.start
            + (self.hash_of("length") % u64::from((range.end - range.start).max(1))) as u32;
        self.text_len = match ignore_eos {
            true => self.max_tokens,
            false => self
                .max_tokens
                .min(natural.saturating_sub(self.continued).max(1)),
        };
        self
    }

    /// The `finish_reason` of a text answer's last chunk.
    pub(crate) fn text_finish(&self) -> &'static str {
        match self.text_len < self.max_tokens {
            true => "stop",
            false => "length",
        }
    }

    /// vLLM's answer to a request that does not fit the context: `None` when it does.
    pub(crate) fn over_context(&self, config: &SimulatorConfig) -> Option<(String, &'static str)> {
        let prompt = self.prompts.iter().map(|(_, n)| *n).max().unwrap_or(0);
        let limit = u64::from(config.max_model_len);
        if prompt >= limit {
            return Some((
                format!(
                    "This model's maximum context length is {limit} tokens. However, your request has {prompt} input tokens. Please reduce the length of the input messages."
                ),
                "input_tokens",
            ));
        }
        let max_tokens = u64::from(self.max_tokens);
        (prompt + max_tokens > limit).then(|| {
            (
                format!(
                    "'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context length is {limit} tokens and your request has {prompt} input tokens ({max_tokens} > {limit} - {prompt})."
                ),
                "max_tokens",
            )
        })
    }

    /// A chat request: the conversation is the one prompt.
    pub(crate) fn from_chat_body(
        config: &SimulatorConfig,
        request_id: String,
        body: &Value,
    ) -> Result<Self, String> {
        let Some(Value::Array(messages)) = body.get("messages") else {
            return Err("messages is required".into());
        };
        let text_of = message_text;
        // vLLM's `continue_final_message`: the final assistant message is the
        // start of the answer, continued rather than answered.
        let continue_final = body.get("continue_final_message").and_then(Value::as_bool)
            == Some(true)
            && messages
                .last()
                .and_then(|m| m.get("role"))
                .and_then(Value::as_str)
                == Some("assistant");
        let conversation = match (continue_final, messages.split_last()) {
            (true, Some((last, before))) => chat_template(before) + &text_of(last),
            _ => chat_template(messages),
        };
        let mut prompt_body = body.clone();
        if let Value::Object(fields) = &mut prompt_body {
            fields.insert("prompt".into(), Value::String(conversation));
            if let Some(limit) = body.get("max_completion_tokens") {
                fields.insert("max_tokens".into(), limit.clone());
            }
            fields.remove("logprobs");
        }
        let mut generation = Self::from_body(config, request_id, &prompt_body)?;
        generation.id = format!("chatcmpl-{}", generation.request_id);
        let last = messages.last();
        let answered_tool =
            last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("tool");
        let tools = body
            .get("tools")
            .and_then(Value::as_array)
            .filter(|t| !t.is_empty());
        let choice = body.get("tool_choice");
        let tool_choice_none = choice.and_then(Value::as_str) == Some("none");
        let tool = match tools {
            Some(tools) if !tool_choice_none && !answered_tool => {
                let named = choice
                    .and_then(|c| c.pointer("/function/name"))
                    .and_then(Value::as_str);
                let name = named
                    .or_else(|| tools[0].pointer("/function/name").and_then(Value::as_str))
                    .unwrap_or("tool")
                    .to_string();
                let asked = last.map(text_of).unwrap_or_default();
                let words: Vec<&str> = asked.split_whitespace().take(6).collect();
                let schema = tools
                    .iter()
                    .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(&name))
                    .and_then(|t| t.pointer("/function/parameters"));
                let arguments = arguments_for(schema, &words.join(" ")).to_string();
                Some(ToolCall {
                    id: format!("chatcmpl-tool-{:016x}", generation.hash_of(&name)),
                    name,
                    pieces: split_pieces(&arguments, 8),
                })
            }
            _ => None,
        };
        generation.chat = Some(ChatPlan {
            tool,
            logprobs: body
                .get("logprobs")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        });
        Ok(generation)
    }

    pub(crate) fn hash_of(&self, what: &str) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        (&self.prompts[0].0, self.seed, what).hash(&mut hasher);
        hasher.finish()
    }

    /// How many steps the answer takes: one token (or tool-call piece) per choice each.
    pub(crate) fn steps(&self) -> u32 {
        match self.chat.as_ref().and_then(|c| c.tool.as_ref()) {
            Some(tool) => 1 + tool.pieces.len() as u32,
            None => self.text_len,
        }
    }

    pub(crate) fn object(&self) -> &'static str {
        match self.chat {
            Some(_) => "chat.completion.chunk",
            None => "text_completion",
        }
    }

    /// The chat chunk choices of `step` for one choice (the role chunk first, at step 0).
    pub(crate) fn chat_choices(
        &self,
        plan: &ChatPlan,
        prompt: usize,
        choice: u32,
        step: u32,
    ) -> Vec<ChatStreamChoice> {
        let index = prompt as u32 * self.n + choice;
        let last = step + 1 == self.steps();
        let mut out = Vec::new();
        if step == 0 {
            out.push(ChatStreamChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                logprobs: Value::Null,
                finish_reason: None,
                stop_reason: None,
            });
        }
        let (delta, logprobs) = match &plan.tool {
            Some(tool) => {
                let call = match step {
                    0 => ToolCallDelta {
                        id: Some(tool.id.clone()),
                        kind: Some("function"),
                        index: 0,
                        function: FunctionDelta {
                            name: Some(tool.name.clone()),
                            arguments: String::new(),
                        },
                    },
                    _ => ToolCallDelta {
                        id: None,
                        kind: None,
                        index: 0,
                        function: FunctionDelta {
                            name: None,
                            arguments: tool.pieces[step as usize - 1].clone(),
                        },
                    },
                };
                let delta = Delta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![call]),
                };
                (delta, Value::Null)
            }
            None => {
                let token = self.token(prompt, choice, step);
                let logprobs = match plan.logprobs {
                    true => serde_json::json!({"content": [chat_logprob(&token, step)]}),
                    false => Value::Null,
                };
                let delta = Delta {
                    role: None,
                    content: Some(token),
                    tool_calls: None,
                };
                (delta, logprobs)
            }
        };
        let reason = if plan.tool.is_some() {
            "tool_calls"
        } else {
            self.text_finish()
        };
        out.push(ChatStreamChoice {
            index,
            delta,
            logprobs,
            finish_reason: last.then_some(reason),
            stop_reason: last.then_some(Value::Null),
        });
        out
    }

    /// (prompt index, choice index) pairs in output order.
    pub(crate) fn choices(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (0..self.prompts.len()).flat_map(move |p| (0..self.n).map(move |c| (p, c)))
    }

    pub(crate) fn token(&self, prompt: usize, choice: u32, step: u32) -> String {
        token_of(
            &self.prompts[prompt].0,
            self.seed,
            choice,
            step + self.continued,
        )
    }

    pub(crate) fn prompt_tokens(&self) -> u64 {
        self.prompts.iter().map(|(_, n)| n).sum()
    }

    pub(crate) fn usage(&self, completion_tokens: u64) -> Usage {
        let prompt_tokens = self.prompt_tokens();
        Usage {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
        }
    }

    /// The choice for `step`, with the text offset before it updated in `offsets`.
    pub(crate) fn choice(
        &self,
        prompt: usize,
        choice: u32,
        step: u32,
        offset: &mut u64,
    ) -> StreamChoice {
        let token = self.token(prompt, choice, step);
        let mut text = token.clone();
        if step == 0 && self.echo {
            text = format!("{}{}", self.prompts[prompt].0, token);
        }
        let logprobs = self.logprobs.map(|_| {
            let logprob = -((step % 7) as f64 + 1.0) / 4.0;
            Logprobs {
                text_offset: vec![*offset],
                token_logprobs: vec![logprob],
                tokens: vec![token.clone()],
                top_logprobs: vec![std::iter::once((token.clone(), logprob)).collect()],
            }
        });
        *offset += text.len() as u64;
        let last = step + 1 == self.text_len;
        StreamChoice {
            index: prompt as u32 * self.n + choice,
            text,
            logprobs,
            finish_reason: last.then(|| self.text_finish()),
            stop_reason: None,
            prompt_token_ids: None,
            token_ids: None,
        }
    }
}

/// The token at `step` of the answer to `prompt`.
fn token_of(prompt: &str, seed: i64, choice: u32, step: u32) -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    (prompt, seed, choice, step).hash(&mut hasher);
    let word = VOCABULARY[(hasher.finish() % VOCABULARY.len() as u64) as usize];
    format!(" {word}")
}

/// Where `prompt`'s own continuation starts, and how many tokens of its
/// answer it already holds: the longest tail of whole words (up to 512)
/// that is the start of the answer to the text before it. `None` for a
/// prompt that does not end with one.
fn continuation(prompt: &str, seed: i64) -> Option<(usize, u32)> {
    let last = prompt.rsplit(' ').next()?;
    if !VOCABULARY.contains(&last) {
        return None;
    }
    let mut best = None;
    let splits = prompt
        .match_indices(' ')
        .map(|(i, _)| i)
        .collect::<Vec<_>>();
    for &split in splits.iter().rev().take(512) {
        let (head, tail) = prompt.split_at(split);
        let mut expected = String::with_capacity(tail.len());
        let mut step = 0;
        while expected.len() < tail.len() {
            expected.push_str(&token_of(head, seed, 0, step));
            step += 1;
            if !tail.starts_with(expected.as_str()) {
                break;
            }
        }
        if expected == tail {
            best = Some((split, step));
        }
    }
    best
}

/// A message's text: its `content` string, or its text parts joined.
pub(crate) fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The simulator's chat template: a conversation as one prompt.
pub(crate) fn chat_template(messages: &[Value]) -> String {
    messages
        .iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            format!("<{role}> {}\n", message_text(m))
        })
        .collect()
}

/// The `logprobs.content` entry of a chat token (its own token as the top one).
pub(crate) fn chat_logprob(token: &str, step: u32) -> Value {
    let logprob = -((step % 7) as f64 + 1.0) / 4.0;
    let entry = serde_json::json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let mut with_top = entry.clone();
    with_top["top_logprobs"] = serde_json::json!([entry]);
    with_top
}

/// What a chat answer is made of.
pub(crate) struct ChatPlan {
    pub(crate) tool: Option<ToolCall>,
    pub(crate) logprobs: bool,
}

pub(crate) struct ToolCall {
    pub(crate) id: String,
    pub(crate) name: String,
    /// The arguments' JSON, in the pieces it streams in.
    pub(crate) pieces: Vec<String>,
}

/// `text` in pieces of at most `size` bytes, cut at character boundaries.
pub(crate) fn split_pieces(text: &str, size: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if current.len() + c.len_utf8() > size {
            pieces.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

pub(crate) fn count_words(s: &str) -> u64 {
    s.split_whitespace().count().max(1) as u64
}

/// Arguments that satisfy a tool's JSON schema, as a model that follows it
/// would write them: every declared property (a required one is always
/// declared) with a value of its type; strings from the user's words.
pub(crate) fn arguments_for(schema: Option<&Value>, words: &str) -> Value {
    let Some(schema) = schema else {
        return Value::Object(Default::default());
    };
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        // A list of types: the first that is not null.
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("string"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" => {
            let mut object = serde_json::Map::new();
            let properties = schema.get("properties").and_then(Value::as_object);
            let required = schema.get("required").and_then(Value::as_array);
            let names = properties
                .into_iter()
                .flat_map(|p| p.keys().cloned())
                .chain(
                    required
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str().map(String::from)),
                );
            for name in names {
                let property = properties.and_then(|p| p.get(&name));
                object.entry(name).or_insert_with(|| match property {
                    Some(property) => arguments_for(Some(property), words),
                    None => Value::from(words),
                });
            }
            Value::Object(object)
        }
        "array" => Value::Array(vec![arguments_for(schema.get("items"), words)]),
        "integer" => Value::from(words.split_whitespace().count().max(1)),
        "number" => Value::from(words.split_whitespace().count().max(1) as f64 + 0.5),
        "boolean" => Value::Bool(true),
        "null" => Value::Null,
        _ => Value::from(words),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokens(generation: &Generation) -> Vec<String> {
        (0..generation.text_len)
            .map(|step| generation.token(0, 0, step))
            .collect()
    }

    #[test]
    fn a_cut_off_completion_is_continued_token_for_token() {
        let config = SimulatorConfig::default();
        let whole = Generation::from_body(
            &config,
            "a".into(),
            &json!({"prompt": "Once upon a time", "max_tokens": 12, "seed": 3}),
        )
        .unwrap();
        let full = tokens(&whole);
        assert_eq!(full.len(), 12);
        let sent = full[..5].concat();
        let rest = Generation::from_body(
            &config,
            "b".into(),
            &json!({"prompt": format!("Once upon a time{sent}"), "max_tokens": 7, "seed": 3}),
        )
        .unwrap();
        assert_eq!(tokens(&rest), full[5..]);
        assert_eq!(rest.prompt_tokens(), 4 + 5, "the prompt as sent is counted");
        // A prompt that only happens to end with vocabulary words is answered afresh.
        let fresh = Generation::from_body(
            &config,
            "c".into(),
            &json!({"prompt": "the river", "max_tokens": 4}),
        )
        .unwrap();
        assert_eq!(fresh.continued, 0);
    }

    #[test]
    fn a_cut_off_chat_answer_is_continued_as_the_final_assistant_message() {
        let config = SimulatorConfig::default();
        let ask =
            json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]);
        let whole = Generation::from_chat_body(
            &config,
            "a".into(),
            &json!({"messages": ask, "max_tokens": 10}),
        )
        .unwrap();
        let full = tokens(&whole);
        let mut messages = ask.as_array().unwrap().clone();
        messages.push(json!({"role": "assistant", "content": full[..4].concat()}));
        let rest = Generation::from_chat_body(
            &config,
            "b".into(),
            &json!({"messages": messages, "max_tokens": 6,
                "continue_final_message": true, "add_generation_prompt": false}),
        )
        .unwrap();
        assert_eq!(tokens(&rest), full[4..]);
    }
}
