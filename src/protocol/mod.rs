//! The vLLM/OpenAI wire format: the request bodies sluice accepts (the
//! completion request here, the chat request in [`chat`]), the stream chunks
//! it relays, and the assembly of a non-streaming response from those chunks.
//!
//! Chunks are kept as the exact bytes the upstream sent (`data: <json>\n\n`),
//! so relaying a chunk as SSE, storing it in the cache or replaying it costs
//! no re-serialisation.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::GatewayError;

mod chat;
pub mod sse;

pub use chat::{ChatAssembler, ChatMessage, ChatRequest, Content};

/// The inference routes, each proxied to the same path upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Completions,
    ChatCompletions,
}

impl Route {
    pub const ALL: [Route; 2] = [Route::Completions, Route::ChatCompletions];

    /// The path, on the gateway and on the upstream.
    pub fn path(self) -> &'static str {
        match self {
            Route::Completions => "/v1/completions",
            Route::ChatCompletions => "/v1/chat/completions",
        }
    }

    /// The name of a request's server span: `POST <path>`.
    pub fn span_name(self) -> &'static str {
        match self {
            Route::Completions => "POST /v1/completions",
            Route::ChatCompletions => "POST /v1/chat/completions",
        }
    }

    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|route| route.path() == path)
    }
}

/// A parsed request of either route.
#[derive(Debug, Clone, PartialEq)]
pub enum InferenceRequest {
    Completion(CompletionRequest),
    Chat(ChatRequest),
}

impl InferenceRequest {
    /// Parses and validates a body sent to `route`.
    pub fn parse(route: Route, body: &[u8]) -> Result<Self, GatewayError> {
        match route {
            Route::Completions => CompletionRequest::parse(body).map(Self::Completion),
            Route::ChatCompletions => ChatRequest::parse(body).map(Self::Chat),
        }
    }

    pub fn route(&self) -> Route {
        match self {
            Self::Completion(_) => Route::Completions,
            Self::Chat(_) => Route::ChatCompletions,
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Self::Completion(r) => &r.model,
            Self::Chat(r) => &r.model,
        }
    }

    /// How many generations each prompt asks for.
    pub fn n(&self) -> u32 {
        match self {
            Self::Completion(r) => r.n,
            Self::Chat(r) => r.n,
        }
        .unwrap_or(1)
    }

    pub fn is_stream(&self) -> bool {
        match self {
            Self::Completion(r) => r.is_stream(),
            Self::Chat(r) => r.is_stream(),
        }
    }

    /// A hash of the start of the prompt, for routing requests that share a
    /// prefix to the same endpoint: a chat's leading system (or developer)
    /// messages, or its first message when there are none; a completion's
    /// first 256 bytes (or 64 token ids).
    pub fn prefix_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        match self {
            Self::Chat(r) => {
                let leading: Vec<&ChatMessage> = r
                    .messages
                    .iter()
                    .take_while(|m| m.role == "system" || m.role == "developer")
                    .collect();
                let leading = match leading.is_empty() {
                    true => r.messages.iter().take(1).collect(),
                    false => leading,
                };
                for message in leading {
                    message.role.hash(&mut hasher);
                    message.text().hash(&mut hasher);
                }
            }
            Self::Completion(r) => match &r.prompt {
                Prompt::Text(text) => prefix_of(text).hash(&mut hasher),
                Prompt::Texts(texts) => texts.first().map(|t| prefix_of(t)).hash(&mut hasher),
                Prompt::Tokens(ids) => ids[..ids.len().min(64)].hash(&mut hasher),
                Prompt::TokenBatches(batches) => batches
                    .first()
                    .map(|ids| &ids[..ids.len().min(64)])
                    .hash(&mut hasher),
            },
        }
        hasher.finish()
    }

    /// Sends the request for `model` instead.
    pub fn set_model(&mut self, model: String) {
        match self {
            Self::Completion(r) => r.model = model,
            Self::Chat(r) => r.model = model,
        }
    }

    /// Whether the answer is a sample: no `seed`, and a `temperature` above 0
    /// or none (vLLM's default then is the model's, usually 1).
    pub fn is_sampled(&self) -> bool {
        let (temperature, seeded) = match self {
            Self::Completion(r) => (r.temperature, r.seed.is_some()),
            Self::Chat(r) => (
                r.temperature,
                r.extra.get("seed").is_some_and(|seed| !seed.is_null()),
            ),
        };
        !seeded && temperature.is_none_or(|t| t > 0.0)
    }

    /// The output cap per choice the client set, if any.
    pub fn output_limit(&self) -> Option<u32> {
        match self {
            Self::Completion(r) => r.max_tokens,
            Self::Chat(r) => r.output_limit(),
        }
    }

    /// How many answers are generated: `n` for each prompt.
    pub fn choices(&self) -> u64 {
        let prompts = match self {
            Self::Completion(r) => r.prompt.count() as u64,
            Self::Chat(_) => 1,
        };
        u64::from(self.n()) * prompts
    }

    /// The bytes of prompt text (token-id prompts: 4 per id), to estimate its tokens.
    pub fn prompt_bytes(&self) -> usize {
        match self {
            Self::Completion(r) => match &r.prompt {
                Prompt::Text(text) => text.len(),
                Prompt::Texts(texts) => texts.iter().map(String::len).sum(),
                Prompt::Tokens(ids) => ids.len() * 4,
                Prompt::TokenBatches(batches) => batches.iter().map(|b| b.len() * 4).sum(),
            },
            Self::Chat(r) => r
                .messages
                .iter()
                .map(|m| match &m.content {
                    Some(Content::Text(text)) => text.len(),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .map(str::len)
                        .sum(),
                    None => 0,
                })
                .sum(),
        }
    }

    pub fn wants_usage_chunk(&self) -> bool {
        match self {
            Self::Completion(r) => r.wants_usage_chunk(),
            Self::Chat(r) => r.wants_usage_chunk(),
        }
    }

    pub fn upstream_body(&self) -> Bytes {
        match self {
            Self::Completion(r) => r.upstream_body(),
            Self::Chat(r) => r.upstream_body(),
        }
    }

    pub fn default_cache_key(&self) -> String {
        match self {
            Self::Completion(r) => r.default_cache_key(),
            Self::Chat(r) => r.default_cache_key(),
        }
    }

    /// The body as JSON, for plugins that read fields sluice does not model.
    pub fn to_json(&self) -> String {
        match self {
            Self::Completion(r) => serde_json::to_string(r),
            Self::Chat(r) => serde_json::to_string(r),
        }
        .unwrap_or_default()
    }
}

/// The first 256 bytes of `text` (at a character boundary).
fn prefix_of(text: &str) -> &str {
    let mut end = text.len().min(256);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Deserializes a request body; a failure is a 400 naming the field at fault.
pub(crate) fn parse_body<T: de::DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("request body is not valid JSON: {inner}")
        } else if path.is_empty() || path == "." {
            format!("invalid request: {inner}")
        } else {
            format!("invalid value for `{path}`: {inner}")
        };
        GatewayError::BadRequest(message)
    })
}

/// A `POST /v1/completions` body. Fields sluice does not know are kept in
/// `extra` and passed through to the upstream unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous_usage_stats: Option<bool>,
}

/// `prompt`: a string, a batch of strings, token ids, or a batch of token ids.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

const PROMPT_SHAPE: &str = "prompt must be a string, an array of strings, an array of token ids or an array of token-id arrays";

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let prompt = match value {
            Value::String(text) => Prompt::Text(text),
            Value::Array(items) if items.iter().all(Value::is_string) => Prompt::Texts(
                items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
            ),
            Value::Array(items) if items.iter().all(Value::is_u64) => {
                Prompt::Tokens(token_ids(&items).ok_or_else(|| de::Error::custom(PROMPT_SHAPE))?)
            }
            Value::Array(items) if items.iter().all(Value::is_array) => Prompt::TokenBatches(
                items
                    .iter()
                    .map(|batch| batch.as_array().and_then(|b| token_ids(b)))
                    .collect::<Option<_>>()
                    .ok_or_else(|| de::Error::custom(PROMPT_SHAPE))?,
            ),
            _ => return Err(de::Error::custom(PROMPT_SHAPE)),
        };
        Ok(prompt)
    }
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) => Ok(Stop::One(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(de::Error::custom(
                        "stop must be a string or an array of strings",
                    )),
                })
                .collect::<Result<_, _>>()
                .map(Stop::Many),
            _ => Err(de::Error::custom(
                "stop must be a string or an array of strings",
            )),
        }
    }
}

impl Prompt {
    fn is_empty(&self) -> bool {
        match self {
            Prompt::Text(s) => s.is_empty(),
            Prompt::Texts(v) => v.is_empty() || v.iter().any(String::is_empty),
            Prompt::Tokens(v) => v.is_empty(),
            Prompt::TokenBatches(v) => v.is_empty() || v.iter().any(Vec::is_empty),
        }
    }

    /// How many prompts the request holds.
    pub fn count(&self) -> usize {
        match self {
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
            Prompt::Texts(v) => v.len(),
            Prompt::TokenBatches(v) => v.len(),
        }
    }

    /// The prompt texts, for plugins; token-id prompts have none.
    pub fn texts(&self) -> Vec<String> {
        match self {
            Prompt::Text(s) => vec![s.clone()],
            Prompt::Texts(v) => v.clone(),
            Prompt::Tokens(_) | Prompt::TokenBatches(_) => Vec::new(),
        }
    }
}

impl CompletionRequest {
    /// Parses and validates a request body; every failure is a 400 that says what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let request: CompletionRequest = parse_body(body)?;
        if request.prompt.is_empty() {
            return Err(GatewayError::BadRequest("prompt must not be empty".into()));
        }
        request.check_common()?;
        Ok(request)
    }
}

impl RequestBody for CompletionRequest {
    const CACHE_NAMESPACE: &'static str = "v1";

    fn model(&self) -> &str {
        &self.model
    }

    fn sampling(&self) -> (Option<u32>, Option<f64>, Option<f64>) {
        (self.n, self.temperature, self.top_p)
    }

    fn transport(&self) -> (Option<bool>, Option<&StreamOptions>) {
        (self.stream, self.stream_options.as_ref())
    }

    fn transport_mut(&mut self) -> (&mut Option<bool>, &mut Option<StreamOptions>) {
        (&mut self.stream, &mut self.stream_options)
    }
}

/// What the completion and the chat body share: the checks of the sampling
/// fields, and the transport fields (`stream`, `stream_options`) that the
/// gateway sets for the upstream and leaves out of cache keys.
pub trait RequestBody: Clone + Serialize {
    /// The prefix of default cache keys: requests of two kinds never share an entry.
    const CACHE_NAMESPACE: &'static str;

    fn model(&self) -> &str;

    /// `n`, `temperature` and `top_p`.
    fn sampling(&self) -> (Option<u32>, Option<f64>, Option<f64>);

    fn transport(&self) -> (Option<bool>, Option<&StreamOptions>);

    fn transport_mut(&mut self) -> (&mut Option<bool>, &mut Option<StreamOptions>);

    /// The checks both kinds of request pass, each failure a 400 saying what is wrong.
    fn check_common(&self) -> Result<(), GatewayError> {
        let bad = |m: &str| Err(GatewayError::BadRequest(m.to_string()));
        let (n, temperature, top_p) = self.sampling();
        if self.model().trim().is_empty() {
            return bad("model must not be empty");
        }
        if n == Some(0) {
            return bad("n must be at least 1");
        }
        if temperature.is_some_and(|t| !(0.0..=100.0).contains(&t)) {
            return bad("temperature must be a non-negative number");
        }
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p must be in (0, 1]");
        }
        if self.transport().1.is_some() && !self.is_stream() {
            return bad("Stream options can only be defined when `stream=True`.");
        }
        Ok(())
    }

    fn is_stream(&self) -> bool {
        self.transport().0.unwrap_or(false)
    }

    /// Whether the client asked for the final usage chunk of a stream.
    fn wants_usage_chunk(&self) -> bool {
        self.transport()
            .1
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The body sent upstream: always streaming, always with the usage chunk
    /// (the gateway needs token counts; it strips the chunk for clients that did not ask).
    fn upstream_body(&self) -> Bytes {
        let mut upstream = self.clone();
        let (stream, stream_options) = upstream.transport_mut();
        *stream = Some(true);
        stream_options.get_or_insert_default().include_usage = Some(true);
        Bytes::from(serde_json::to_vec(&upstream).unwrap_or_default())
    }

    /// The default cache key: a digest of everything that changes the output.
    /// Transport choices (`stream`, `stream_options.include_usage`) are left out
    /// so that a streaming and a non-streaming request share one entry.
    fn default_cache_key(&self) -> String {
        let mut canonical = self.clone();
        let (stream, stream_options) = canonical.transport_mut();
        *stream = None;
        if let Some(options) = stream_options.as_mut() {
            options.include_usage = None;
            if options.continuous_usage_stats != Some(true) {
                *stream_options = None;
            }
        }
        let json = serde_json::to_vec(&canonical).unwrap_or_default();
        format!(
            "{}:{}",
            Self::CACHE_NAMESPACE,
            hex::encode(Sha256::digest(&json))
        )
    }
}

const SSE_PREFIX: &[u8] = b"data: ";
const SSE_SUFFIX: &[u8] = b"\n\n";

/// One upstream stream chunk, held as the SSE event bytes `data: <json>\n\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    framed: Bytes,
}

impl Chunk {
    /// Frames a JSON payload as an SSE `data:` event.
    pub fn from_payload(payload: &[u8]) -> Self {
        let mut framed =
            BytesMut::with_capacity(payload.len() + SSE_PREFIX.len() + SSE_SUFFIX.len());
        framed.put_slice(SSE_PREFIX);
        framed.put_slice(payload);
        framed.put_slice(SSE_SUFFIX);
        Self {
            framed: framed.freeze(),
        }
    }

    /// Wraps bytes that are already exactly `data: <payload>\n\n`.
    pub fn from_framed(framed: Bytes) -> Option<Self> {
        (framed.len() >= SSE_PREFIX.len() + SSE_SUFFIX.len()
            && framed.starts_with(SSE_PREFIX)
            && framed.ends_with(SSE_SUFFIX))
        .then_some(Self { framed })
    }

    /// The SSE event, ready to write to a client.
    pub fn framed(&self) -> &Bytes {
        &self.framed
    }

    /// The JSON payload (what a WebSocket frame carries).
    pub fn payload(&self) -> Bytes {
        self.framed
            .slice(SSE_PREFIX.len()..self.framed.len() - SSE_SUFFIX.len())
    }

    pub fn payload_slice(&self) -> &[u8] {
        &self.framed[SSE_PREFIX.len()..self.framed.len() - SSE_SUFFIX.len()]
    }

    /// This chunk with its response `id` naming `request_id`, as vLLM names
    /// the chunks of its answer to `X-Request-Id: <request_id>`
    /// (`cmpl-<request_id>`; the prefix up to the first `-` is kept).
    /// Unchanged when the payload does not begin with an `"id"`.
    pub fn naming(&self, request_id: &str) -> Chunk {
        const KEY: &[u8] = b"\"id\":\"";
        let payload = self.payload_slice();
        let Some(at) = memchr::memmem::find(&payload[..payload.len().min(16)], KEY) else {
            return self.clone();
        };
        let start = SSE_PREFIX.len() + at + KEY.len();
        let Some(len) = memchr::memchr(b'"', &self.framed[start..]) else {
            return self.clone();
        };
        let id = &self.framed[start..start + len];
        let keep = id
            .iter()
            .position(|&b| b == b'-')
            .map_or(0, |dash| dash + 1);
        if &id[keep..] == request_id.as_bytes() {
            return self.clone();
        }
        let mut framed =
            BytesMut::with_capacity(self.framed.len() - (len - keep) + request_id.len());
        framed.put_slice(&self.framed[..start + keep]);
        framed.put_slice(request_id.as_bytes());
        framed.put_slice(&self.framed[start + len..]);
        Chunk {
            framed: framed.freeze(),
        }
    }

    /// Reads what the gateway needs to know about a chunk without keeping it parsed.
    pub fn summary(&self) -> ChunkSummary {
        #[derive(Deserialize)]
        struct Peek {
            #[serde(default)]
            choices: Vec<IgnoredAny>,
            #[serde(default)]
            usage: Option<Usage>,
        }
        match serde_json::from_slice::<Peek>(self.payload_slice()) {
            Ok(peek) => ChunkSummary {
                choices: peek.choices.len(),
                usage: peek.usage,
            },
            Err(_) => ChunkSummary::default(),
        }
    }
}

/// The parts of a chunk the token filters need, borrowed from its bytes
/// (or owned, [`ChunkView::into_owned`], to keep alongside a cached answer).
#[derive(Debug, Clone, Deserialize)]
pub struct ChunkView<'a> {
    #[serde(borrow, default)]
    pub choices: Vec<ChoiceView<'a>>,
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// One choice of a chunk: a completion's `text`, or a chat chunk's `delta`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChoiceView<'a> {
    #[serde(default)]
    pub index: u32,
    #[serde(borrow, default, deserialize_with = "text_or_null")]
    text: Cow<'a, str>,
    #[serde(borrow, default)]
    delta: Option<DeltaView<'a>>,
    #[serde(default)]
    pub finish_reason: Option<IgnoredAny>,
}

/// The part of a chat delta token filters see: its `content`. Tool-call
/// deltas are not text and pass untouched.
#[derive(Debug, Clone, Deserialize)]
struct DeltaView<'a> {
    #[serde(borrow, default, deserialize_with = "text_or_null")]
    content: Cow<'a, str>,
}

impl ChoiceView<'_> {
    /// The text of the choice: a completion's `text`, a chat delta's `content`.
    pub fn text(&self) -> &str {
        match &self.delta {
            Some(delta) => &delta.content,
            None => &self.text,
        }
    }

    fn into_owned(self) -> ChoiceView<'static> {
        ChoiceView {
            index: self.index,
            text: Cow::Owned(self.text.into_owned()),
            delta: self.delta.map(|d| DeltaView {
                content: Cow::Owned(d.content.into_owned()),
            }),
            finish_reason: self.finish_reason,
        }
    }
}

/// A string borrowed from the input when it has no escapes; `null` reads as "".
fn text_or_null<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Cow<'a, str>, D::Error> {
    struct Text;
    impl<'de> de::Visitor<'de> for Text {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(""))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(""))
        }
    }
    deserializer.deserialize_any(Text)
}

impl<'a> ChunkView<'a> {
    /// `None` for a payload that is not a JSON object of this shape.
    pub fn parse(chunk: &'a Chunk) -> Option<Self> {
        serde_json::from_slice(chunk.payload_slice()).ok()
    }

    pub fn into_owned(self) -> ChunkView<'static> {
        ChunkView {
            choices: self
                .choices
                .into_iter()
                .map(ChoiceView::into_owned)
                .collect(),
            usage: self.usage,
        }
    }

    pub fn summary(&self) -> ChunkSummary {
        ChunkSummary {
            choices: self.choices.len(),
            usage: self.usage,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkSummary {
    pub choices: usize,
    pub usage: Option<Usage>,
}

impl ChunkSummary {
    /// The final `choices: []` chunk that carries only `usage`.
    pub fn is_usage_only(&self) -> bool {
        self.choices == 0 && self.usage.is_some()
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// Recognises an upstream error event (`{"error": {...}}`, or the older
/// flat `{"object": "error", ...}`) among stream payloads.
pub fn parse_error_event(payload: &[u8]) -> Option<crate::error::ErrorInfo> {
    #[derive(Deserialize)]
    struct Nested {
        error: Value,
    }
    #[derive(Deserialize)]
    struct Flat {
        object: String,
        #[serde(default)]
        message: String,
        #[serde(default, rename = "type")]
        kind: String,
        #[serde(default)]
        code: Option<u16>,
    }
    // Cheap pre-check: chunks start with {"id"; only errors mention "error" early.
    let head = &payload[..payload.len().min(64)];
    if !head.windows(5).any(|w| w == b"error") {
        return None;
    }
    if let Ok(Nested { error }) = serde_json::from_slice::<Nested>(payload) {
        return Some(error_info_from_value(&error));
    }
    match serde_json::from_slice::<Flat>(payload) {
        Ok(flat) if flat.object == "error" => Some(crate::error::ErrorInfo {
            status: flat.code.unwrap_or(500),
            kind: if flat.kind.is_empty() {
                "InternalServerError".into()
            } else {
                flat.kind
            },
            message: flat.message,
            code: None,
        }),
        _ => None,
    }
}

/// Builds an [`ErrorInfo`](crate::error::ErrorInfo) from the `error` object of an upstream body.
pub fn error_info_from_value(error: &Value) -> crate::error::ErrorInfo {
    match error {
        Value::Object(fields) => crate::error::ErrorInfo {
            status: fields
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..600).contains(c))
                .unwrap_or(500),
            kind: fields
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("InternalServerError")
                .to_string(),
            message: fields
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error")
                .to_string(),
            code: None,
        },
        Value::String(message) => crate::error::ErrorInfo {
            status: 500,
            kind: "InternalServerError".into(),
            message: message.clone(),
            code: None,
        },
        other => crate::error::ErrorInfo {
            status: 500,
            kind: "InternalServerError".into(),
            message: other.to_string(),
            code: None,
        },
    }
}

/// Accumulates stream chunks into the body vLLM returns for `stream: false`.
pub enum ResponseAssembler {
    Completion(CompletionAssembler),
    Chat(ChatAssembler),
}

impl ResponseAssembler {
    pub fn new(route: Route) -> Self {
        match route {
            Route::Completions => Self::Completion(CompletionAssembler::default()),
            Route::ChatCompletions => Self::Chat(ChatAssembler::default()),
        }
    }

    pub fn push(&mut self, payload: &[u8]) {
        match self {
            Self::Completion(asm) => asm.push(payload),
            Self::Chat(asm) => asm.push(payload),
        }
    }

    pub fn finish(self) -> String {
        match self {
            Self::Completion(asm) => asm.finish(),
            Self::Chat(asm) => asm.finish(),
        }
    }
}

/// Accumulates completion stream chunks into the body vLLM returns for `stream: false`.
#[derive(Default)]
pub struct CompletionAssembler {
    head: ResponseHead,
    choices: BTreeMap<u64, ChoiceAcc>,
}

/// What every chunk of a response repeats (kept from the first) and the usage.
#[derive(Default)]
pub(crate) struct ResponseHead {
    pub id: String,
    pub created: i64,
    pub model: String,
    usage: Option<Value>,
}

impl ResponseHead {
    /// Reads a chunk's envelope; returns its choices, as objects.
    pub fn read(&mut self, payload: &[u8]) -> Vec<Map<String, Value>> {
        let Ok(Value::Object(mut chunk)) = serde_json::from_slice::<Value>(payload) else {
            return Vec::new();
        };
        if self.id.is_empty() {
            if let Some(Value::String(id)) = chunk.remove("id") {
                self.id = id;
            }
            self.created = chunk.get("created").and_then(Value::as_i64).unwrap_or(0);
            if let Some(Value::String(model)) = chunk.remove("model") {
                self.model = model;
            }
        }
        if let Some(usage) = chunk.remove("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage);
        }
        match chunk.remove("choices") {
            Some(Value::Array(choices)) => choices
                .into_iter()
                .filter_map(|choice| match choice {
                    Value::Object(choice) => Some(choice),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The usage as vLLM's non-streaming body has it (zeros if none came).
    pub fn take_usage(&mut self) -> Value {
        let mut usage = self.usage.take().unwrap_or_else(
            || serde_json::json!({"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0}),
        );
        if let Value::Object(fields) = &mut usage {
            fields.entry("prompt_tokens_details").or_insert(Value::Null);
        }
        usage
    }
}

#[derive(Default)]
struct ChoiceAcc {
    text: String,
    logprobs: Option<LogprobsAcc>,
    finish_reason: Value,
    stop_reason: Value,
    token_ids: Option<Vec<Value>>,
    prompt_token_ids: Value,
}

#[derive(Default, Serialize)]
struct LogprobsAcc {
    text_offset: Vec<Value>,
    token_logprobs: Vec<Value>,
    tokens: Vec<Value>,
    top_logprobs: Vec<Value>,
}

impl CompletionAssembler {
    pub fn push(&mut self, payload: &[u8]) {
        for mut choice in self.head.read(payload) {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(index).or_default();
            if let Some(Value::String(text)) = choice.get("text") {
                acc.text.push_str(text);
            }
            if let Some(Value::Object(mut lp)) = choice.remove("logprobs") {
                let logprobs = acc.logprobs.get_or_insert_with(Default::default);
                let mut take = |name: &str, into: &mut Vec<Value>| {
                    if let Some(Value::Array(items)) = lp.remove(name) {
                        into.extend(items);
                    }
                };
                take("text_offset", &mut logprobs.text_offset);
                take("token_logprobs", &mut logprobs.token_logprobs);
                take("tokens", &mut logprobs.tokens);
                take("top_logprobs", &mut logprobs.top_logprobs);
            }
            if let Some(reason) = choice.remove("finish_reason").filter(|v| !v.is_null()) {
                acc.finish_reason = reason;
            }
            if let Some(reason) = choice.remove("stop_reason").filter(|v| !v.is_null()) {
                acc.stop_reason = reason;
            }
            if let Some(Value::Array(ids)) = choice.remove("token_ids") {
                acc.token_ids.get_or_insert_with(Vec::new).extend(ids);
            }
            if let Some(ids) = choice.remove("prompt_token_ids").filter(|v| !v.is_null()) {
                acc.prompt_token_ids = ids;
            }
        }
    }

    /// The JSON body vLLM returns for `stream: false`, fields in vLLM's order.
    pub fn finish(mut self) -> String {
        #[derive(Serialize)]
        struct Body {
            id: String,
            object: &'static str,
            created: i64,
            model: String,
            choices: Vec<ChoiceOut>,
            service_tier: Option<()>,
            system_fingerprint: Option<()>,
            usage: Value,
            kv_transfer_params: Option<()>,
        }
        #[derive(Serialize)]
        struct ChoiceOut {
            index: u64,
            text: String,
            logprobs: Option<LogprobsAcc>,
            finish_reason: Value,
            stop_reason: Value,
            token_ids: Option<Vec<Value>>,
            prompt_logprobs: Option<()>,
            prompt_token_ids: Value,
        }
        let choices = self
            .choices
            .into_iter()
            .map(|(index, acc)| ChoiceOut {
                index,
                text: acc.text,
                logprobs: acc.logprobs,
                finish_reason: acc.finish_reason,
                stop_reason: acc.stop_reason,
                token_ids: acc.token_ids,
                prompt_logprobs: None,
                prompt_token_ids: acc.prompt_token_ids,
            })
            .collect();
        let usage = self.head.take_usage();
        serde_json::to_string(&Body {
            id: self.head.id,
            object: "text_completion",
            created: self.head.created,
            model: self.head.model,
            choices,
            service_tier: None,
            system_fingerprint: None,
            usage,
            kv_transfer_params: None,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_can_be_renamed_for_another_request() {
        let chunk =
            Chunk::from_payload(br#"{"id":"cmpl-abc123","object":"text_completion","choices":[]}"#);
        let renamed = chunk.naming("r-42");
        assert_eq!(
            renamed.payload_slice(),
            br#"{"id":"cmpl-r-42","object":"text_completion","choices":[]}"#
        );
        assert_eq!(renamed.naming("r-42"), renamed, "already named");
        let no_id = Chunk::from_payload(br#"{"object":"text_completion","id":"x"}"#);
        assert_eq!(no_id.naming("r-42"), no_id);
    }

    fn parse(body: &str) -> Result<CompletionRequest, String> {
        CompletionRequest::parse(body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_every_documented_field_and_keeps_unknown_ones() {
        let req = parse(
            r#"{"model":"m","prompt":["a","b"],"max_tokens":5,"temperature":0.5,"top_p":0.9,"n":2,
                "stop":["x"],"seed":7,"stream":true,"stream_options":{"include_usage":true},
                "logprobs":2,"echo":false,"user":"u","top_k":40}"#,
        )
        .unwrap();
        assert_eq!(req.prompt, Prompt::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(req.extra.get("top_k"), Some(&serde_json::json!(40)));
        let upstream: Value = serde_json::from_slice(&req.upstream_body()).unwrap();
        assert_eq!(upstream["top_k"], 40);
        assert_eq!(upstream["stream"], true);
        assert_eq!(upstream["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rejects_bad_bodies_with_a_message_naming_the_problem() {
        assert!(parse("{not json").unwrap_err().contains("not valid JSON"));
        assert!(parse(r#"{"prompt":"x"}"#).unwrap_err().contains("model"));
        assert!(parse(r#"{"model":"m"}"#).unwrap_err().contains("prompt"));
        assert!(
            parse(r#"{"model":"m","prompt":"x","max_tokens":"ten"}"#)
                .unwrap_err()
                .contains("max_tokens")
        );
        assert!(
            parse(r#"{"model":"m","prompt":{"a":1}}"#)
                .unwrap_err()
                .contains("prompt must be")
        );
        assert!(parse(r#"[1,2]"#).is_err());
        assert!(
            parse(r#"{"model":"m","prompt":""}"#)
                .unwrap_err()
                .contains("empty")
        );
    }

    #[test]
    fn cache_key_ignores_transport_but_not_sampling() {
        let a = parse(
            r#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        let b = parse(r#"{"model":"m","prompt":"x"}"#).unwrap();
        let c = parse(r#"{"model":"m","prompt":"x","temperature":0.1}"#).unwrap();
        let d = parse(r#"{"model":"m","prompt":"x","top_k":3}"#).unwrap();
        assert_eq!(a.default_cache_key(), b.default_cache_key());
        assert_ne!(b.default_cache_key(), c.default_cache_key());
        assert_ne!(b.default_cache_key(), d.default_cache_key());
    }

    #[test]
    fn chunk_payload_and_framing_round_trip() {
        let chunk = Chunk::from_payload(br#"{"id":"x","choices":[]}"#);
        assert_eq!(
            chunk.framed().as_ref(),
            b"data: {\"id\":\"x\",\"choices\":[]}\n\n"
        );
        assert_eq!(chunk.payload().as_ref(), br#"{"id":"x","choices":[]}"#);
        assert_eq!(Chunk::from_framed(chunk.framed().clone()), Some(chunk));
    }

    #[test]
    fn recognises_error_events() {
        let nested =
            br#"{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}"#;
        assert_eq!(parse_error_event(nested).unwrap().message, "boom");
        let chunk = br#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" error"}]}"#;
        assert!(parse_error_event(chunk).is_none());
    }

    #[test]
    fn assembles_text_logprobs_and_usage() {
        let mut asm = CompletionAssembler::default();
        asm.push(br#"{"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"a","logprobs":{"text_offset":[0],"token_logprobs":[-1.0],"tokens":["a"],"top_logprobs":[{"a":-1.0}]},"finish_reason":null,"stop_reason":null}],"usage":null}"#);
        asm.push(br#"{"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"b","logprobs":{"text_offset":[1],"token_logprobs":[-2.0],"tokens":["b"],"top_logprobs":[{"b":-2.0}]},"finish_reason":"length","stop_reason":null}],"usage":null}"#);
        asm.push(br#"{"id":"c","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2}}"#);
        let body: Value = serde_json::from_str(&asm.finish()).unwrap();
        assert!(body.to_string().len() > 10);
        assert_eq!(body["choices"][0]["text"], "ab");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(
            body["choices"][0]["logprobs"]["tokens"],
            serde_json::json!(["a", "b"])
        );
        assert_eq!(body["usage"]["completion_tokens"], 2);
    }
}
