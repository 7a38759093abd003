//! The vLLM/OpenAI wire formats, one file each: the completion request
//! (`completion`) and the chat request (`chat`) sluice accepts, requests
//! answered with one JSON body (`pooling`: embeddings, tokenize), the
//! stream `chunk`s it relays, upstream `errors` in a stream, the
//! `assembly` of a non-streaming answer from those chunks, and incremental
//! [`sse`] parsing.
//!
//! Chunks are kept as the exact bytes the upstream sent (`data: <json>\n\n`),
//! so relaying a chunk as SSE, storing it in the cache or replaying it costs
//! no re-serialisation.

mod assembly;
mod audio;
mod chat;
mod chunk;
mod completion;
mod conversation;
mod errors;
mod forwarded;
mod messages;
mod pooling;
mod responses;
pub mod sse;

use bytes::Bytes;
use serde::Serialize;
use serde::de;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;

pub use assembly::{ChatAssembler, CompletionAssembler, ResponseAssembler};
pub use audio::AudioRequest;
pub use chat::{ChatMessage, ChatRequest, Content};
pub use chunk::{ChoiceView, Chunk, ChunkSummary, ChunkView, Usage};
pub use completion::{CompletionRequest, Prompt, Stop, StreamOptions};
pub use conversation::{Conversation, Turn};
pub use errors::{error_info_from_value, parse_error_event};
pub use messages::MessagesRequest;
pub use pooling::PoolingRequest;
pub use responses::{ResponsesRequest, StoredResponseRequest, event_type, is_terminal_event};

/// The inference routes, each proxied to the same path upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Completions,
    ChatCompletions,
    Embeddings,
    /// Cohere's embed API, `/v2/embed`.
    EmbedV2,
    /// `/rerank`, as vLLM and Jina name it (`/v1/rerank` and `/v2/rerank`,
    /// Cohere's, take the same body).
    Rerank,
    RerankV1,
    RerankV2,
    Score,
    ScoreV1,
    Classify,
    Pooling,
    Tokenize,
    Detokenize,
    /// Speech to text, multipart uploads.
    Transcriptions,
    Translations,
    /// Anthropic's Messages API.
    Messages,
    MessagesCountTokens,
    /// OpenAI's Responses API: create, and a stored response's retrieve and cancel.
    Responses,
    ResponsesRetrieve,
    ResponsesCancel,
}

impl Route {
    pub const ALL: [Route; 20] = [
        Route::Completions,
        Route::ChatCompletions,
        Route::Embeddings,
        Route::EmbedV2,
        Route::Rerank,
        Route::RerankV1,
        Route::RerankV2,
        Route::Score,
        Route::ScoreV1,
        Route::Classify,
        Route::Pooling,
        Route::Tokenize,
        Route::Detokenize,
        Route::Transcriptions,
        Route::Translations,
        Route::Messages,
        Route::MessagesCountTokens,
        Route::Responses,
        Route::ResponsesRetrieve,
        Route::ResponsesCancel,
    ];

    /// The path, on the gateway and on the upstream (`{response_id}` stands
    /// for the id in a stored response's path: see [`Route::upstream_path`]).
    pub fn path(self) -> &'static str {
        match self {
            Route::Completions => "/v1/completions",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::EmbedV2 => "/v2/embed",
            Route::Rerank => "/rerank",
            Route::RerankV1 => "/v1/rerank",
            Route::RerankV2 => "/v2/rerank",
            Route::Score => "/score",
            Route::ScoreV1 => "/v1/score",
            Route::Classify => "/classify",
            Route::Pooling => "/pooling",
            Route::Tokenize => "/tokenize",
            Route::Detokenize => "/detokenize",
            Route::Transcriptions => "/v1/audio/transcriptions",
            Route::Translations => "/v1/audio/translations",
            Route::Messages => "/v1/messages",
            Route::MessagesCountTokens => "/v1/messages/count_tokens",
            Route::Responses => "/v1/responses",
            Route::ResponsesRetrieve => "/v1/responses/{response_id}",
            Route::ResponsesCancel => "/v1/responses/{response_id}/cancel",
        }
    }

    /// The path to call upstream, with the stored response's id in place.
    pub fn upstream_path(self, response_id: Option<&str>) -> std::borrow::Cow<'static, str> {
        match (self, response_id) {
            (Route::ResponsesRetrieve | Route::ResponsesCancel, Some(id)) => {
                self.path().replace("{response_id}", id).into()
            }
            _ => self.path().into(),
        }
    }

    /// Whether the upstream call is a `GET` (a retrieve; every other route posts).
    pub fn is_get(self) -> bool {
        self == Route::ResponsesRetrieve
    }

    /// The name of a request's server span: `POST <path>`.
    pub fn span_name(self) -> &'static str {
        match self {
            Route::Completions => "POST /v1/completions",
            Route::ChatCompletions => "POST /v1/chat/completions",
            Route::Embeddings => "POST /v1/embeddings",
            Route::EmbedV2 => "POST /v2/embed",
            Route::Rerank => "POST /rerank",
            Route::RerankV1 => "POST /v1/rerank",
            Route::RerankV2 => "POST /v2/rerank",
            Route::Score => "POST /score",
            Route::ScoreV1 => "POST /v1/score",
            Route::Classify => "POST /classify",
            Route::Pooling => "POST /pooling",
            Route::Tokenize => "POST /tokenize",
            Route::Detokenize => "POST /detokenize",
            Route::Transcriptions => "POST /v1/audio/transcriptions",
            Route::Translations => "POST /v1/audio/translations",
            Route::Messages => "POST /v1/messages",
            Route::MessagesCountTokens => "POST /v1/messages/count_tokens",
            Route::Responses => "POST /v1/responses",
            Route::ResponsesRetrieve => "GET /v1/responses/{response_id}",
            Route::ResponsesCancel => "POST /v1/responses/{response_id}/cancel",
        }
    }

    /// Whether the answer is generated token by token and always streamed
    /// from the upstream (a JSON answer is assembled by sluice); the other
    /// routes answer with one JSON body, or (speech to text) stream only
    /// when the client asks.
    pub fn generates(self) -> bool {
        matches!(self, Route::Completions | Route::ChatCompletions)
    }

    /// Whether the body is a multipart upload rather than JSON.
    pub fn takes_upload(self) -> bool {
        matches!(self, Route::Transcriptions | Route::Translations)
    }

    /// Whether the upstream streams its answer when the request asks
    /// (speech to text, Messages, Responses) rather than always or never.
    pub fn streams_when_asked(self) -> bool {
        self.takes_upload()
            || matches!(
                self,
                Route::Messages | Route::Responses | Route::ResponsesRetrieve
            )
    }

    /// Whether the stream's events are typed (`event: <type>` before each
    /// `data:`), as Anthropic's and the Responses API's are.
    pub fn has_typed_events(self) -> bool {
        self.is_anthropic() || self.is_responses()
    }

    /// Whether the answer's `usage` is this request's cost: not for a stored
    /// response read back or cancelled (its tokens were counted when made).
    pub fn counts_usage(self) -> bool {
        !matches!(self, Route::ResponsesRetrieve | Route::ResponsesCancel)
    }

    /// Whether the route is the Responses API's.
    pub fn is_responses(self) -> bool {
        matches!(
            self,
            Route::Responses | Route::ResponsesRetrieve | Route::ResponsesCancel
        )
    }

    /// Whether the route speaks Anthropic's API (its errors, its events).
    pub fn is_anthropic(self) -> bool {
        matches!(self, Route::Messages | Route::MessagesCountTokens)
    }

    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|route| route.path() == path)
    }
}

/// A parsed request of any route.
#[derive(Debug, Clone, PartialEq)]
pub enum InferenceRequest {
    Completion(CompletionRequest),
    Chat(ChatRequest),
    /// A route answered with one JSON body (embeddings, tokenize, ...).
    Pooling(PoolingRequest),
    /// Speech to text (a multipart upload).
    Audio(AudioRequest),
    /// Anthropic's Messages API.
    Messages(MessagesRequest),
    /// OpenAI's Responses API: a new response.
    Responses(ResponsesRequest),
    /// A stored response's retrieve or cancel.
    StoredResponse(StoredResponseRequest),
}

impl InferenceRequest {
    /// Parses and validates a JSON body sent to `route` (uploads, to the
    /// speech-to-text routes, are parsed by [`AudioRequest::parse`]).
    pub fn parse(route: Route, body: &[u8]) -> Result<Self, GatewayError> {
        match route {
            Route::Completions => CompletionRequest::parse(body).map(Self::Completion),
            Route::ChatCompletions => ChatRequest::parse(body).map(Self::Chat),
            Route::Transcriptions | Route::Translations => Err(GatewayError::BadRequest(format!(
                "{} takes a multipart/form-data upload",
                route.path()
            ))),
            Route::Messages | Route::MessagesCountTokens => {
                MessagesRequest::parse(route, body).map(Self::Messages)
            }
            Route::Responses => ResponsesRequest::parse(body).map(Self::Responses),
            Route::ResponsesRetrieve | Route::ResponsesCancel => Err(GatewayError::BadRequest(
                "a stored response is named by its path".into(),
            )),
            _ => PoolingRequest::parse(route, body).map(Self::Pooling),
        }
    }

    /// The body's `content-type`, when it is not JSON (an upload, or a
    /// stored response's query).
    pub fn content_type(&self) -> Option<&str> {
        match self {
            Self::Audio(r) => Some(r.content_type()),
            Self::StoredResponse(_) => Some(FORM_CONTENT_TYPE),
            _ => None,
        }
    }

    pub fn route(&self) -> Route {
        match self {
            Self::Completion(_) => Route::Completions,
            Self::Chat(_) => Route::ChatCompletions,
            Self::Pooling(r) => r.route(),
            Self::Audio(r) => r.route(),
            Self::Messages(r) => r.route(),
            Self::Responses(_) => Route::Responses,
            Self::StoredResponse(r) => r.route(),
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Self::Completion(r) => &r.model,
            Self::Chat(r) => &r.model,
            Self::Pooling(r) => r.model(),
            Self::Audio(r) => r.model(),
            Self::Messages(r) => r.model(),
            Self::Responses(r) => r.model(),
            Self::StoredResponse(r) => r.model(),
        }
    }

    /// How many generations each prompt asks for.
    pub fn n(&self) -> u32 {
        match self {
            Self::Completion(r) => r.n,
            Self::Chat(r) => r.n,
            _ => None,
        }
        .unwrap_or(1)
    }

    pub fn is_stream(&self) -> bool {
        match self {
            Self::Completion(r) => r.is_stream(),
            Self::Chat(r) => r.is_stream(),
            Self::Pooling(_) => false,
            Self::Audio(r) => r.is_stream(),
            Self::Messages(r) => r.is_stream(),
            Self::Responses(r) => r.is_stream(),
            Self::StoredResponse(r) => r.is_stream(),
        }
    }

    /// Whether the answer may come from the cache: not when it depends on
    /// or leaves state on a replica (a stored response, a follow-up).
    pub fn is_cacheable(&self) -> bool {
        match self {
            Self::Responses(r) => !r.is_stateful(),
            Self::StoredResponse(_) => false,
            _ => true,
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
            Self::Pooling(r) => r.texts().first().map(|t| prefix_of(t)).hash(&mut hasher),
            Self::Audio(r) => prefix_of(r.prompt()).hash(&mut hasher),
            Self::Messages(r) => prefix_of(&r.prefix_text()).hash(&mut hasher),
            Self::Responses(r) => prefix_of(&r.prefix_text()).hash(&mut hasher),
            Self::StoredResponse(r) => r.id().hash(&mut hasher),
        }
        hasher.finish()
    }

    /// Sends the request for `model` instead.
    pub fn set_model(&mut self, model: String) {
        match self {
            Self::Completion(r) => r.model = model,
            Self::Chat(r) => r.model = model,
            Self::Pooling(r) => r.set_model(model),
            Self::Audio(r) => r.set_model(model),
            Self::Messages(r) => r.set_model(model),
            Self::Responses(r) => r.set_model(model),
            Self::StoredResponse(r) => r.set_model(model),
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
            // Deterministic: the same input always gets the same answer.
            Self::Pooling(_) => return false,
            // An upload is rarely sent twice: cached only with `cache.sampled`.
            Self::Audio(_) => return true,
            Self::Messages(r) => return r.is_sampled(),
            Self::Responses(r) => return r.is_sampled(),
            Self::StoredResponse(_) => return false,
        };
        !seeded && temperature.is_none_or(|t| t > 0.0)
    }

    /// The output cap per choice the client set, if any.
    pub fn output_limit(&self) -> Option<u32> {
        match self {
            Self::Completion(r) => r.max_tokens,
            Self::Chat(r) => r.output_limit(),
            Self::Pooling(_) => Some(0),
            Self::Audio(_) => None,
            Self::Messages(r) => r.max_tokens(),
            Self::Responses(r) => r.max_output_tokens(),
            // It generates nothing (a cancel, or a stored answer read back).
            Self::StoredResponse(_) => Some(0),
        }
    }

    /// How many answers are generated: `n` for each prompt.
    pub fn choices(&self) -> u64 {
        let prompts = match self {
            Self::Completion(r) => r.prompt.count() as u64,
            _ => 1,
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
            Self::Pooling(r) => r.input_bytes(),
            // The audio's tokens are the model's to count; the prompt is text.
            Self::Audio(r) => r.prompt().len(),
            Self::Messages(r) => r.text_bytes(),
            Self::Responses(r) => r.text_bytes(),
            Self::StoredResponse(_) => 0,
        }
    }

    pub fn wants_usage_chunk(&self) -> bool {
        match self {
            Self::Completion(r) => r.wants_usage_chunk(),
            Self::Chat(r) => r.wants_usage_chunk(),
            Self::Pooling(_) => false,
            Self::Audio(r) => r.wants_usage_chunk(),
            // Usage rides on the APIs' own events, which every client gets.
            Self::Messages(_) | Self::Responses(_) | Self::StoredResponse(_) => true,
        }
    }

    pub fn upstream_body(&self) -> Bytes {
        match self {
            Self::Completion(r) => r.upstream_body(),
            Self::Chat(r) => r.upstream_body(),
            Self::Pooling(r) => r.upstream_body(),
            Self::Audio(r) => r.upstream_body(),
            Self::Messages(r) => r.upstream_body(),
            Self::Responses(r) => r.upstream_body(),
            Self::StoredResponse(r) => r.upstream_body(),
        }
    }

    pub fn default_cache_key(&self) -> String {
        match self {
            Self::Completion(r) => r.default_cache_key(),
            Self::Chat(r) => r.default_cache_key(),
            Self::Pooling(r) => r.default_cache_key(),
            Self::Audio(r) => r.default_cache_key(),
            Self::Messages(r) => r.default_cache_key(),
            Self::Responses(r) => r.default_cache_key(),
            Self::StoredResponse(r) => format!("openai-responses-stored:{}", r.id()),
        }
    }

    /// The body as JSON, for plugins that read fields sluice does not model.
    pub fn to_json(&self) -> String {
        match self {
            Self::Completion(r) => serde_json::to_string(r),
            Self::Chat(r) => serde_json::to_string(r),
            Self::Pooling(r) => return r.to_json(),
            Self::Audio(r) => return r.to_json(),
            Self::Messages(r) => return r.to_json(),
            Self::Responses(r) => return r.to_json(),
            Self::StoredResponse(r) => return r.to_json(),
        }
        .unwrap_or_default()
    }
}

/// The content type of a stored response's request as it is queued: its
/// query (`stream`, `starting_after`), sent upstream as the URL's query.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

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
