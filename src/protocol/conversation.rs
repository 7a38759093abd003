//! The conversation of an agent API's request in chat roles, for plugins:
//! Anthropic's Messages (`system`, then each message) and OpenAI's
//! Responses (`instructions`, then each input item). One enumeration of
//! where each turn's text lives serves both reading the turns and writing
//! new texts back, so the two cannot drift.

use serde_json::{Map, Value};

/// One turn: its chat role, its text (`None`: none, as a function call's),
/// and the turn as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: String,
    pub text: Option<String>,
    pub json: String,
}

/// A request of an agent API, as plugins read and rewrite it.
pub trait Conversation {
    fn model(&self) -> &str;
    fn set_model(&mut self, model: String);
    /// The conversation in chat roles.
    fn turns(&self) -> Vec<Turn>;
    /// Puts rewritten texts back, one per turn of [`Conversation::turns`].
    fn set_turn_texts(&mut self, texts: Vec<Option<String>>) -> Result<(), String>;
}

/// Implements [`Conversation`] for a request type of `$api` that holds
/// its body as a `ForwardedJson` named `json`.
macro_rules! impl_conversation {
    ($request:ty, $api:expr) => {
        impl $crate::protocol::conversation::Conversation for $request {
            fn model(&self) -> &str {
                self.json.model()
            }

            fn set_model(&mut self, model: String) {
                self.json.set_model(model);
            }

            fn turns(&self) -> Vec<$crate::protocol::conversation::Turn> {
                $crate::protocol::conversation::turns($api, self.json.body())
            }

            fn set_turn_texts(&mut self, texts: Vec<Option<String>>) -> Result<(), String> {
                $crate::protocol::conversation::set_texts($api, self.json.body_mut(), texts)
            }
        }
    };
}
pub(crate) use impl_conversation;

/// Which API's body a conversation is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Messages,
    Responses,
}

/// Where one turn is: its role, the JSON pointer of the whole turn, and of
/// its text (a string, or a list of parts with `text`), if it has one.
struct Slot {
    role: String,
    turn: String,
    text: Option<String>,
}

fn slots(api: Api, body: &Map<String, Value>) -> Vec<Slot> {
    let slot = |role: &str, turn: String, text: Option<String>| Slot {
        role: role.to_string(),
        turn,
        text,
    };
    let mut slots = Vec::new();
    let (lead, list) = match api {
        Api::Messages => ("system", "messages"),
        Api::Responses => ("instructions", "input"),
    };
    if body.get(lead).is_some_and(|v| !v.is_null()) {
        slots.push(slot("system", format!("/{lead}"), Some(format!("/{lead}"))));
    }
    match body.get(list) {
        Some(Value::String(_)) => slots.push(slot("user", "/input".into(), Some("/input".into()))),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let turn = format!("/{list}/{i}");
                let role = item.get("role").and_then(Value::as_str);
                let kind = item.get("type").and_then(Value::as_str);
                slots.push(match (api, kind, role) {
                    (Api::Responses, Some("function_call"), _) => slot("assistant", turn, None),
                    (Api::Responses, Some("function_call_output"), _) => {
                        let text = format!("{turn}/output");
                        slot("tool", turn, Some(text))
                    }
                    (_, _, Some(role)) => {
                        let text = format!("{turn}/content");
                        slot(role, turn, Some(text))
                    }
                    (_, _, None) => slot("user", turn, None),
                });
            }
        }
        _ => {}
    }
    slots
}

/// The text of a content value: a string, or its parts' `text` joined.
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

/// Puts `text` in a content value: a string is replaced; in a list of
/// parts, the text parts become one (of the first one's type) where the
/// first was, the other parts (images, tool use) stay.
fn set_text(value: &mut Value, text: String) {
    match value {
        Value::Array(parts) => {
            let first = parts.iter().position(|p| p.get("text").is_some());
            let Some(first) = first else {
                parts.push(serde_json::json!({"type": "text", "text": text}));
                return;
            };
            let mut part = parts[first].clone();
            part["text"] = Value::String(text);
            let mut kept: Vec<Value> = Vec::with_capacity(parts.len());
            for (i, p) in parts.drain(..).enumerate() {
                if i == first {
                    kept.push(part.clone());
                } else if p.get("text").is_none() {
                    kept.push(p);
                }
            }
            *parts = kept;
        }
        other => *other = Value::String(text),
    }
}

/// The conversation of `body` in chat roles.
pub(crate) fn turns(api: Api, body: &Map<String, Value>) -> Vec<Turn> {
    let root = Value::Object(body.clone());
    slots(api, body)
        .into_iter()
        .map(|slot| Turn {
            text: slot
                .text
                .as_deref()
                .and_then(|p| root.pointer(p))
                .and_then(text_of),
            json: root
                .pointer(&slot.turn)
                .map(Value::to_string)
                .unwrap_or_default(),
            role: slot.role,
        })
        .collect()
}

/// Writes `texts` (one per turn, in order) back into `body` where they
/// differ; a turn without a text slot keeps what it had. Fails when the
/// count differs, or a text is given to a turn that cannot hold one.
pub(crate) fn set_texts(
    api: Api,
    body: &mut Map<String, Value>,
    texts: Vec<Option<String>>,
) -> Result<(), String> {
    let slots = slots(api, body);
    if slots.len() != texts.len() {
        return Err(format!(
            "returned {} messages for a conversation of {}: an agent API's messages may be rewritten, not added or removed",
            texts.len(),
            slots.len()
        ));
    }
    let mut root = Value::Object(std::mem::take(body));
    let mut result = Ok(());
    for (i, (slot, text)) in slots.into_iter().zip(texts).enumerate() {
        let Some(text) = text else { continue };
        let Some(pointer) = slot.text else {
            result = Err(format!("message {i} ({}) cannot hold text", slot.role));
            break;
        };
        if let Some(value) = root.pointer_mut(&pointer)
            && text_of(value).as_ref() != Some(&text)
        {
            set_text(value, text);
        }
    }
    if let Value::Object(map) = root {
        *body = map;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn messages_turns_read_and_write_in_place() {
        let mut body = map(
            json!({"model": "m", "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "source": {}}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c"}]}),
        );
        let turns = turns(Api::Messages, &body);
        let read: Vec<(&str, Option<&str>)> = turns
            .iter()
            .map(|t| (t.role.as_str(), t.text.as_deref()))
            .collect();
        assert_eq!(
            read,
            [
                ("system", Some("be brief")),
                ("user", Some("a\nb")),
                ("assistant", Some("c"))
            ]
        );
        set_texts(
            Api::Messages,
            &mut body,
            vec![Some("be brief".into()), Some("A".into()), Some("C".into())],
        )
        .unwrap();
        assert_eq!(
            body["messages"][0]["content"],
            json!([{"type": "text", "text": "A"}, {"type": "image", "source": {}}])
        );
        assert_eq!(body["messages"][1]["content"], "C");
        assert_eq!(
            body["system"],
            json!([{"type": "text", "text": "be brief"}]),
            "unchanged"
        );
        assert!(set_texts(Api::Messages, &mut body, vec![None]).is_err());
    }

    #[test]
    fn responses_turns_cover_instructions_strings_and_items() {
        let mut body = map(json!({"model": "m", "instructions": "sys", "input": "hi"}));
        let read = turns(Api::Responses, &body);
        assert_eq!(
            (read[0].role.as_str(), read[1].role.as_str()),
            ("system", "user")
        );
        set_texts(Api::Responses, &mut body, vec![None, Some("HI".into())]).unwrap();
        assert_eq!(body["input"], "HI");
        let mut body = map(json!({"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "secret"}]}));
        let read = turns(Api::Responses, &body);
        let roles: Vec<&str> = read.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool"]);
        assert_eq!(read[1].text, None);
        assert_eq!(read[2].text.as_deref(), Some("secret"));
        set_texts(
            Api::Responses,
            &mut body,
            vec![Some("Q".into()), None, Some("[redacted]".into())],
        )
        .unwrap();
        assert_eq!(
            body["input"][0]["content"],
            json!([{"type": "input_text", "text": "Q"}])
        );
        assert_eq!(body["input"][2]["output"], "[redacted]");
        assert!(
            set_texts(
                Api::Responses,
                &mut body,
                vec![None, Some("x".into()), None]
            )
            .is_err()
        );
    }
}
