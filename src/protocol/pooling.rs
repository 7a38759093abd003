//! Requests whose answer is one JSON body rather than a stream of tokens:
//! `POST /v1/embeddings`, Cohere's `/v2/embed`, rerank (`/rerank`,
//! `/v1/rerank`, `/v2/rerank`), score (`/score`, `/v1/score`), `/classify`,
//! `/pooling`, `/tokenize` and `/detokenize`. Sluice reads only
//! what it routes, limits, caches and logs by (`model`, the inputs) and
//! forwards the body's own bytes unchanged, unless it must set the model (an
//! alias). vLLM checks the rest.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::Route;
use super::forwarded::{ForwardedJson, invalid as bad};
use crate::error::GatewayError;

/// A request on a route answered with one JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolingRequest {
    route: Route,
    json: ForwardedJson,
    /// The texts the request carries (inputs, prompt, messages' text).
    texts: Vec<String>,
    /// Token ids given in place of text.
    token_ids: usize,
}

fn token_ids(value: &Value) -> Option<usize> {
    let items = value.as_array()?;
    items.iter().all(Value::is_u64).then_some(items.len())
}

/// Whether `value` is a chat conversation: a non-empty list of messages.
fn is_conversation(value: &Value) -> bool {
    value.as_array().is_some_and(|items| {
        !items.is_empty()
            && items
                .iter()
                .all(|m| m.get("role").is_some_and(Value::is_string))
    })
}

/// The inputs of an embedding-style request (`/v1/embeddings`, `/classify`,
/// `/pooling`): `input` as a string, strings, token ids or lists of them, or
/// a conversation (`messages`, or `input` holding messages).
fn embedding_inputs(body: &Map<String, Value>, ids: &mut usize) -> Result<(), GatewayError> {
    let conversation = body
        .get("messages")
        .or_else(|| body.get("input").filter(|i| is_conversation(i)));
    if let Some(messages) = conversation {
        if !is_conversation(messages) {
            return Err(bad("messages", "must be a non-empty list of messages"));
        }
    } else {
        match body.get("input") {
            None => {
                return Err(GatewayError::BadRequest("`input` is required".into()));
            }
            Some(Value::String(_)) => {}
            Some(Value::Array(items)) if items.is_empty() => {
                return Err(bad("input", "must not be empty"));
            }
            Some(input @ Value::Array(items)) => match token_ids(input) {
                Some(n) => *ids = n,
                None => {
                    for (i, item) in items.iter().enumerate() {
                        match (item, token_ids(item)) {
                            (Value::String(_), _) => {}
                            (_, Some(n)) => *ids += n,
                            _ => {
                                return Err(bad(
                                    &format!("input[{i}]"),
                                    "must be a string or a list of token ids",
                                ));
                            }
                        }
                    }
                }
            },
            Some(_) => {
                return Err(bad(
                    "input",
                    "must be a string, a list of strings, token ids or lists of token ids",
                ));
            }
        }
    }
    Ok(())
}

/// The inputs of Cohere's embed request (`/v2/embed`): exactly one of
/// `texts`, `images` (data URIs, no text) or `inputs` (content parts).
fn cohere_inputs(body: &Map<String, Value>) -> Result<(), GatewayError> {
    let given: Vec<&str> = ["texts", "images", "inputs"]
        .into_iter()
        .filter(|f| body.get(*f).is_some_and(|v| !v.is_null()))
        .collect();
    let [field] = given[..] else {
        return Err(GatewayError::BadRequest(
            "exactly one of `texts`, `images` or `inputs` is required".into(),
        ));
    };
    let items = match body.get(field).and_then(Value::as_array) {
        Some(items) if !items.is_empty() => items,
        _ => return Err(bad(field, "must be a non-empty list")),
    };
    for (i, item) in items.iter().enumerate() {
        match (field, item) {
            ("texts" | "images", Value::String(_)) => {}
            ("inputs", Value::Object(input)) if input.contains_key("content") => {}
            _ => {
                return Err(bad(
                    &format!("{field}[{i}]"),
                    match field {
                        "inputs" => "must be an object with `content`",
                        _ => "must be a string",
                    },
                ));
            }
        }
    }
    Ok(())
}

/// The prefix of a route's default cache keys (versioned, as the
/// generation routes' are, so a change of key format starts afresh).
fn cache_namespace(route: Route) -> &'static str {
    match route {
        // One body and one answer on all three paths.
        Route::Rerank | Route::RerankV1 | Route::RerankV2 => "rerank-v1",
        Route::Score | Route::ScoreV1 => "score-v1",
        Route::Classify => "classify-v1",
        Route::Pooling => "pooling-v1",
        Route::EmbedV2 => "cohere-embed-v1",
        Route::Tokenize => "tokenize-v1",
        Route::Detokenize => "detokenize-v1",
        _ => "embeddings-v1",
    }
}

/// Checks a scoring input: a string, multimodal content (`{"content":
/// [parts]}`, whose text parts are its texts), or a list of them.
fn score_input(field: &str, value: &Value) -> Result<(), GatewayError> {
    let one = |item: &Value| match item {
        Value::String(_) => true,
        Value::Object(object) => object.get("content").is_some_and(Value::is_array),
        _ => false,
    };
    let valid = match value {
        Value::Array(items) if items.is_empty() => false,
        Value::Array(items) => items.iter().all(one),
        item => one(item),
    };
    match valid {
        true => Ok(()),
        false => Err(bad(
            field,
            "must be a string, multimodal content, or a non-empty list of them",
        )),
    }
}

/// The two sides of a score request, by the first of vLLM's four spellings the body uses.
fn score_sides(body: &Map<String, Value>) -> Option<(&'static str, &'static str)> {
    [
        ("queries", "documents"),
        ("queries", "items"),
        ("data_1", "data_2"),
        ("text_1", "text_2"),
    ]
    .into_iter()
    .find(|(a, b)| body.contains_key(*a) && body.contains_key(*b))
}

/// Whether a `/pooling` body is an IO-processor plugin's request (`data` of its own shape).
fn is_plugin_data(route: Route, body: &Map<String, Value>) -> bool {
    route == Route::Pooling && body.contains_key("data") && !body.contains_key("input")
}

/// Calls `f` on each text of a checked body, in body order: the one walk
/// that both reads the texts (for limits, logs and plugins) and writes back
/// the texts a plugin rewrote.
fn visit_texts(route: Route, body: &mut Map<String, Value>, f: &mut dyn FnMut(&mut String)) {
    fn parts(parts: Option<&mut Value>, f: &mut dyn FnMut(&mut String)) {
        let parts = parts.and_then(Value::as_array_mut).into_iter().flatten();
        for part in parts {
            if let Some(Value::String(text)) = part.get_mut("text") {
                f(text);
            }
        }
    }
    fn conversation(messages: &mut Value, f: &mut dyn FnMut(&mut String)) {
        for message in messages.as_array_mut().into_iter().flatten() {
            match message.get_mut("content") {
                Some(Value::String(text)) => f(text),
                content @ Some(Value::Array(_)) => parts(content, f),
                _ => {}
            }
        }
    }
    fn score_input(value: &mut Value, f: &mut dyn FnMut(&mut String)) {
        match value {
            Value::String(text) => f(text),
            Value::Object(object) => parts(object.get_mut("content"), f),
            Value::Array(items) => items.iter_mut().for_each(|item| score_input(item, f)),
            _ => {}
        }
    }
    match route {
        _ if is_plugin_data(route, body) => {}
        Route::Embeddings | Route::Classify | Route::Pooling => {
            if body.contains_key("messages") {
                body.get_mut("messages")
                    .into_iter()
                    .for_each(|m| conversation(m, f));
            } else if let Some(input) = body.get_mut("input") {
                match input {
                    input if is_conversation(input) => conversation(input, f),
                    Value::String(text) => f(text),
                    Value::Array(items) => items.iter_mut().for_each(|item| {
                        if let Value::String(text) = item {
                            f(text);
                        }
                    }),
                    _ => {}
                }
            }
        }
        Route::EmbedV2 => {
            for text in body
                .get_mut("texts")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Value::String(text) = text {
                    f(text);
                }
            }
            for input in body
                .get_mut("inputs")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                parts(input.get_mut("content"), f);
            }
        }
        Route::Rerank | Route::RerankV1 | Route::RerankV2 => {
            for field in ["query", "documents"] {
                body.get_mut(field)
                    .into_iter()
                    .for_each(|v| score_input(v, f));
            }
        }
        Route::Score | Route::ScoreV1 => {
            if let Some((first, second)) = score_sides(body) {
                for field in [first, second] {
                    body.get_mut(field)
                        .into_iter()
                        .for_each(|v| score_input(v, f));
                }
            }
        }
        Route::Tokenize => match body.get_mut("prompt") {
            Some(Value::String(prompt)) => f(prompt),
            _ => body
                .get_mut("messages")
                .into_iter()
                .for_each(|m| conversation(m, f)),
        },
        Route::Detokenize
        | Route::Completions
        | Route::ChatCompletions
        | Route::Transcriptions
        | Route::Translations
        | Route::Messages
        | Route::MessagesCountTokens
        | Route::Responses
        | Route::ResponsesRetrieve
        | Route::ResponsesCancel => {}
    }
}

impl PoolingRequest {
    /// Parses and checks a body sent to `route` (one of the JSON-answer routes).
    pub fn parse(route: Route, raw: &[u8]) -> Result<Self, GatewayError> {
        let mut json = ForwardedJson::parse(raw)?;
        let body = json.body();
        let mut ids = 0;
        match route {
            _ if is_plugin_data(route, body) => {}
            Route::Embeddings | Route::Classify | Route::Pooling => {
                embedding_inputs(body, &mut ids)?
            }
            Route::EmbedV2 => cohere_inputs(body)?,
            Route::Rerank | Route::RerankV1 | Route::RerankV2 => {
                for field in ["query", "documents"] {
                    let value = body.get(field).ok_or_else(|| {
                        GatewayError::BadRequest(format!("`{field}` is required"))
                    })?;
                    score_input(field, value)?;
                }
            }
            Route::Score | Route::ScoreV1 => {
                let Some((first, second)) = score_sides(body) else {
                    return Err(GatewayError::BadRequest(
                        "two sides to score are required: `queries` and `documents` (or `items`), `data_1` and `data_2`, or `text_1` and `text_2`".into(),
                    ));
                };
                for field in [first, second] {
                    score_input(field, &body[field])?;
                }
            }
            Route::Tokenize => match (body.get("prompt"), body.get("messages")) {
                (Some(Value::String(_)), _) => {}
                (Some(_), _) => return Err(bad("prompt", "must be a string")),
                (None, Some(messages)) if is_conversation(messages) => {}
                (None, Some(_)) => {
                    return Err(bad("messages", "must be a non-empty list of messages"));
                }
                (None, None) => {
                    return Err(GatewayError::BadRequest(
                        "`prompt` or `messages` is required".into(),
                    ));
                }
            },
            Route::Detokenize => match body.get("tokens").map(token_ids) {
                Some(Some(n)) => ids = n,
                Some(None) => return Err(bad("tokens", "must be a list of token ids")),
                None => return Err(GatewayError::BadRequest("`tokens` is required".into())),
            },
            Route::Completions
            | Route::ChatCompletions
            | Route::Transcriptions
            | Route::Translations
            | Route::Messages
            | Route::MessagesCountTokens
            | Route::Responses
            | Route::ResponsesRetrieve
            | Route::ResponsesCancel => {
                return Err(GatewayError::Internal(format!(
                    "{} is not a JSON-answer route",
                    route.path()
                )));
            }
        }
        let mut texts = Vec::new();
        json.read_mut(|body| visit_texts(route, body, &mut |text| texts.push(text.clone())));
        Ok(Self {
            route,
            json,
            texts,
            token_ids: ids,
        })
    }

    pub fn route(&self) -> Route {
        self.route
    }

    pub fn model(&self) -> &str {
        self.json.model()
    }

    /// Sends the request for `model` instead (an alias resolved).
    pub fn set_model(&mut self, model: String) {
        self.json.set_model(model);
    }

    /// The texts the request carries, for limits, logs and plugins.
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// Puts `texts` where the request's texts were read from (a plugin's
    /// rewrite); there must be as many as [`Self::texts`] returned.
    pub fn set_texts(&mut self, texts: Vec<String>) -> Result<(), String> {
        if texts.len() != self.texts.len() {
            return Err(format!(
                "returned {} texts for the {} it was given",
                texts.len(),
                self.texts.len()
            ));
        }
        let mut replacements = texts.iter();
        visit_texts(self.route, self.json.body_mut(), &mut |text| {
            if let Some(replacement) = replacements.next() {
                replacement.clone_into(text);
            }
        });
        self.texts = texts;
        Ok(())
    }

    /// The bytes of input text (token ids: 4 per id), to estimate its tokens.
    pub fn input_bytes(&self) -> usize {
        self.texts.iter().map(String::len).sum::<usize>() + self.token_ids * 4
    }

    /// The body for the upstream: the client's own bytes, unless sluice changed it.
    pub fn upstream_body(&self) -> Bytes {
        self.json.upstream_body()
    }

    /// A digest of the body (the model as sent upstream), in the route's own
    /// namespace: an embedding and a tokenization of one text never share an entry.
    pub fn default_cache_key(&self) -> String {
        self.json.cache_key(cache_namespace(self.route))
    }

    pub fn to_json(&self) -> String {
        self.json.to_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(route: Route, body: &str) -> Result<PoolingRequest, String> {
        PoolingRequest::parse(route, body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn embedding_inputs_in_every_shape_vllm_takes() {
        let one = parse(Route::Embeddings, r#"{"model":"m","input":"hello"}"#).unwrap();
        assert_eq!(one.texts(), ["hello"]);
        let many = parse(Route::Embeddings, r#"{"model":"m","input":["a","bc"]}"#).unwrap();
        assert_eq!(many.input_bytes(), 3);
        let ids = parse(Route::Embeddings, r#"{"model":"m","input":[1,2,3]}"#).unwrap();
        assert_eq!(ids.input_bytes(), 12);
        let batches = parse(Route::Embeddings, r#"{"model":"m","input":[[1,2],[3]]}"#).unwrap();
        assert_eq!(batches.input_bytes(), 12);
        let chat = parse(
            Route::Embeddings,
            r#"{"model":"m","input":[{"role":"user","content":"hi there"}]}"#,
        )
        .unwrap();
        assert_eq!(chat.texts(), ["hi there"]);
    }

    #[test]
    fn malformed_bodies_are_refused_naming_the_field() {
        for (route, body, field) in [
            (Route::Embeddings, r#"{"input":"x"}"#, "model"),
            (Route::Embeddings, r#"{"model":"m"}"#, "input"),
            (Route::Embeddings, r#"{"model":"m","input":[]}"#, "input"),
            (
                Route::Embeddings,
                r#"{"model":"m","input":["a",{}]}"#,
                "input[1]",
            ),
            (Route::Embeddings, r#"{"model":"m","input":7}"#, "input"),
            (Route::Tokenize, r#"{"model":"m"}"#, "prompt"),
            (Route::Tokenize, r#"{"model":"m","prompt":3}"#, "prompt"),
            (
                Route::Detokenize,
                r#"{"model":"m","tokens":["a"]}"#,
                "tokens",
            ),
            (Route::Detokenize, r#"{"model":"m"}"#, "tokens"),
        ] {
            let err = parse(route, body).unwrap_err();
            assert!(err.contains(&format!("`{field}`")), "{body}: {err}");
        }
    }

    #[test]
    fn rerank_and_score_read_both_sides() {
        let rerank = parse(
            Route::RerankV2,
            r#"{"model":"m","query":"q","documents":["a",{"content":[{"type":"text","text":"b"}]}],"top_n":1}"#,
        )
        .unwrap();
        assert_eq!(rerank.texts(), ["q", "a", "b"]);
        let score = parse(
            Route::Score,
            r#"{"model":"m","text_1":"q","text_2":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!(score.texts(), ["q", "a", "b"]);
        for (route, body, field) in [
            (Route::Rerank, r#"{"model":"m","documents":["a"]}"#, "query"),
            (
                Route::Rerank,
                r#"{"model":"m","query":"q","documents":[]}"#,
                "documents",
            ),
            (
                Route::ScoreV1,
                r#"{"model":"m","queries":"q","documents":[1]}"#,
                "documents",
            ),
            (Route::Score, r#"{"model":"m","text_1":"q"}"#, "text_2"),
        ] {
            let err = parse(route, body).unwrap_err();
            assert!(err.contains(&format!("`{field}`")), "{body}: {err}");
        }
    }

    #[test]
    fn rewritten_texts_go_back_where_they_were_read() {
        for (route, body) in [
            (
                Route::Embeddings,
                r#"{"model":"m","input":["a",[1,2],"b"]}"#,
            ),
            (
                Route::Embeddings,
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"}]},{"role":"assistant","content":"b"}]}"#,
            ),
            (
                Route::EmbedV2,
                r#"{"model":"m","inputs":[{"content":[{"type":"text","text":"a"}]}]}"#,
            ),
            (
                Route::RerankV1,
                r#"{"model":"m","query":"q","documents":["a",{"content":[{"type":"text","text":"b"}]}]}"#,
            ),
            (
                Route::Score,
                r#"{"model":"m","queries":["q","r"],"items":"a","text_1":"unused"}"#,
            ),
            (Route::Tokenize, r#"{"model":"m","prompt":"p"}"#),
        ] {
            let mut request = parse(route, body).unwrap();
            assert!(!request.texts().is_empty(), "{body}");
            let upper: Vec<String> = request.texts().iter().map(|t| t.to_uppercase()).collect();
            request.set_texts(upper.clone()).unwrap();
            let sent = PoolingRequest::parse(route, &request.upstream_body()).unwrap();
            assert_eq!(sent.texts(), upper, "{body}");
            assert_eq!(request.texts(), upper);
        }
        let mut request = parse(Route::Embeddings, r#"{"model":"m","input":"a"}"#).unwrap();
        let err = request.set_texts(vec![]).unwrap_err();
        assert!(err.contains("0 texts for the 1"), "{err}");
    }

    #[test]
    fn the_body_goes_upstream_unchanged_unless_the_model_is_set() {
        let body = r#"{"model":"alias",  "input":"x","extra_field":{"kept":true}}"#;
        let mut request = parse(Route::Embeddings, body).unwrap();
        assert_eq!(request.upstream_body(), body.as_bytes());
        let key = request.default_cache_key();
        request.set_model("real".into());
        let sent: Value = serde_json::from_slice(&request.upstream_body()).unwrap();
        assert_eq!(sent["model"], "real");
        assert_eq!(sent["extra_field"]["kept"], true);
        assert_ne!(request.default_cache_key(), key);
        assert!(key.starts_with("embeddings-v1:"));
    }
}
