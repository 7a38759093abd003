//! The upstream client: calls vLLM's `/v1/completions` or
//! `/v1/chat/completions` with `stream: true` on an endpoint of the
//! request's model (see [`crate::fleet`]), trying another endpoint when one
//! fails before the first chunk,
//! and yields each chunk the moment its SSE event is complete.
//!
//! Dropping an [`UpstreamStream`] closes its HTTP connection, which is how
//! vLLM learns to abort the generation.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;
use url::Url;

use super::FleetMetrics;
use super::{ModelConfig, UpstreamConfig};
use crate::error::{ErrorInfo, GatewayError, kind_for_status};
use crate::fleet::{Fleet, InFlight};
use crate::protocol::sse::SseParser;
use crate::protocol::{Chunk, Route, error_info_from_value, parse_error_event};

/// Largest error body read from the upstream.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The largest JSON answer read from vLLM (a large batch of embeddings).
const MAX_JSON_ANSWER: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the upstream: {0}")]
    Connect(String),
    #[error("the upstream sent nothing for {0:?}")]
    Timeout(Duration),
    /// An error status before the stream began, with the upstream's own message.
    #[error("upstream answered {}: {}", .0.status, .0.message)]
    Status(ErrorInfo),
    /// An error event in the middle of the stream.
    #[error("upstream error: {}", .0.message)]
    Event(ErrorInfo),
    #[error("reading the upstream response failed: {0}")]
    Body(String),
    #[error("the upstream closed the stream before [DONE]")]
    Truncated,
    /// The endpoint that holds a stored response is down or ejected: no
    /// other replica knows the response.
    #[error("{0}")]
    HolderDown(String),
    /// The endpoint that held a stored response is no longer in the fleet.
    #[error("{0}")]
    HolderGone(String),
}

impl UpstreamError {
    pub fn info(&self) -> ErrorInfo {
        match self {
            Self::Status(info) | Self::Event(info) => info.clone(),
            Self::Timeout(_) => GatewayError::UpstreamTimeout(self.to_string()).info(),
            Self::Connect(_) | Self::Body(_) | Self::Truncated => {
                GatewayError::UpstreamUnavailable(self.to_string()).info()
            }
            Self::HolderDown(message) => GatewayError::Overloaded(message.clone()).info(),
            Self::HolderGone(message) => GatewayError::NotFound(message.clone()).info(),
        }
    }

    /// Whether the endpoint is at fault (another may serve the request):
    /// unreachable, too slow, a 5xx, a broken or garbled stream. A 4xx or an
    /// error event from vLLM is the request's, and is passed on.
    pub fn is_endpoint_failure(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout(_) | Self::Body(_) | Self::Truncated => true,
            Self::Status(info) => info.status >= 500,
            Self::Event(_) | Self::HolderDown(_) | Self::HolderGone(_) => false,
        }
    }

    /// A low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Status(_) => "status",
            Self::Event(_) => "stream_error",
            Self::Body(_) => "body",
            Self::Truncated => "truncated",
            Self::HolderDown(_) | Self::HolderGone(_) => "holder",
        }
    }
}

/// One upstream call: what to send, and which endpoints may take it.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    /// The pool (`[[models]]`); "" for the single pool.
    pub model: &'a str,
    /// A hash of the prompt's start, for prefix-affine balancing.
    pub prefix: u64,
    pub route: Route,
    /// The body (for a `GET`, its query string).
    pub body: &'a bytes::Bytes,
    /// Request id, trace context, and a non-JSON body's `content-type`.
    pub headers: &'a [(String, String)],
    /// The stored response the call is about: its path names it, and it
    /// runs only on `pinned`, the endpoint that holds it.
    pub response_id: Option<&'a str>,
    pub pinned: Option<&'a str>,
}

pub struct UpstreamClient {
    http: reqwest::Client,
    fleet: Arc<Fleet>,
    api_key: Option<secrecy::SecretString>,
    first_chunk_timeout: Duration,
    idle_timeout: Duration,
    /// `upstream.max_continuations`.
    pub max_continuations: u32,
}

impl UpstreamClient {
    /// The client of every pool, with their health checks running.
    pub fn new(
        config: &UpstreamConfig,
        models: &[ModelConfig],
        metrics: &FleetMetrics,
    ) -> Result<Self, GatewayError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| GatewayError::Internal(format!("cannot build the HTTP client: {e}")))?;
        let fleet = Arc::new(Fleet::new(config, models, metrics));
        fleet.check_health(http.clone(), config.health_interval);
        Ok(Self {
            http,
            fleet,
            api_key: config.api_key.clone(),
            first_chunk_timeout: config.first_chunk_timeout,
            idle_timeout: config.idle_timeout,
            max_continuations: config.max_continuations,
        })
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Starts `call` (the JSON of a streamed completion or chat, or any
    /// route's body) on an endpoint of its model's pool and waits for its
    /// first event. An endpoint that fails before then is ejected and
    /// another one tried, up to `upstream.max_attempts`; nothing has reached
    /// the client yet, so the retry is invisible to it. A pinned call runs
    /// on its endpoint or fails.
    pub async fn open(&self, call: Call<'_>) -> Result<UpstreamStream, UpstreamError> {
        let mut tried = Vec::with_capacity(2);
        self.open_untried(call, &mut tried).await
    }

    /// As [`UpstreamClient::open`], on an endpoint other than `failed` (a
    /// continuation goes to another replica, or nowhere).
    pub async fn open_elsewhere(
        &self,
        call: Call<'_>,
        failed: &Url,
    ) -> Result<UpstreamStream, UpstreamError> {
        let pool = self.fleet.pool(call.model);
        let failed = pool.and_then(|pool| pool.endpoints.iter().position(|e| &e.url == failed));
        let mut tried: Vec<usize> = failed.into_iter().collect();
        self.open_untried(call, &mut tried).await
    }

    /// The whole answer to `call`, for a client that gets nothing before
    /// the end (a JSON answer), and the endpoint that gave it: an endpoint
    /// that fails at any point before the last chunk is ejected and the
    /// request run again on another, up to `upstream.max_attempts`
    /// endpoints in all, so a replica dying mid-generation costs the client
    /// time, not an error.
    pub async fn complete(&self, call: Call<'_>) -> Result<(Vec<Chunk>, Url), UpstreamError> {
        let mut tried = Vec::with_capacity(2);
        loop {
            let mut stream = self.open_untried(call, &mut tried).await?;
            let mut chunks = Vec::new();
            let failure = loop {
                match stream.next().await {
                    Ok(Some(chunk)) => chunks.push(chunk),
                    Ok(None) => {
                        let endpoint = stream.endpoint().cloned();
                        return Ok((
                            chunks,
                            endpoint.unwrap_or_else(|| {
                                Url::parse("http://unknown").expect("a valid URL")
                            }),
                        ));
                    }
                    Err(err) => break err,
                }
            };
            let endpoints = self
                .fleet
                .pool(call.model)
                .map_or(0, |pool| pool.endpoints.len());
            let left = call.pinned.is_none()
                && tried.len() < (self.fleet.max_attempts as usize).min(endpoints);
            let endpoint = stream.in_flight.as_ref().map(|f| f.endpoint().clone());
            match (failure.is_endpoint_failure(), endpoint) {
                (true, Some(endpoint)) => {
                    endpoint.failed(self.fleet.eject, self.fleet.max_eject);
                    if !left {
                        tracing::warn!(endpoint = %endpoint.url, err = %failure, "upstream endpoint failed mid-answer; no other endpoint to try (upstream.max_attempts, or the pool's size)");
                        return Err(failure);
                    }
                    tracing::warn!(endpoint = %endpoint.url, err = %failure, "upstream endpoint failed mid-answer; nothing reached the client, running it again on another");
                }
                _ => return Err(failure),
            }
        }
    }

    /// As [`UpstreamClient::open`], among the endpoints not in `tried` (to
    /// which it adds those it tries).
    async fn open_untried(
        &self,
        call: Call<'_>,
        tried: &mut Vec<usize>,
    ) -> Result<UpstreamStream, UpstreamError> {
        let model = call.model;
        let pool = self
            .fleet
            .pool(model)
            .ok_or_else(|| UpstreamError::Connect(format!("no endpoint serves `{model}`")))?;
        let pinned = match call.pinned {
            Some(url) => Some(pinned_endpoint(
                pool,
                url,
                call.response_id.unwrap_or_default(),
            )?),
            None => None,
        };
        let mut last = None;
        while tried.len() < self.fleet.max_attempts as usize {
            let at = match pinned {
                Some(at) if tried.is_empty() => at,
                Some(_) => break,
                None => match pool.pick(call.prefix, tried) {
                    Some(at) => at,
                    None => break,
                },
            };
            tried.push(at);
            let endpoint = &pool.endpoints[at];
            let in_flight = endpoint.start();
            let opened = match self.attempt(&endpoint.url, call).await {
                Ok(mut stream) => stream.prefetch().await.map(|()| stream),
                Err(err) => Err(err),
            };
            match opened {
                Ok(mut stream) => {
                    endpoint.succeeded();
                    stream.in_flight = Some(in_flight);
                    return Ok(stream);
                }
                Err(err) if err.is_endpoint_failure() && pinned.is_some() => {
                    endpoint.failed(self.fleet.eject, self.fleet.max_eject);
                    tracing::warn!(endpoint = %endpoint.url, %err, "the endpoint that holds a stored response failed; no other replica has it");
                    return Err(holder_down(call.response_id.unwrap_or_default()));
                }
                Err(err) if err.is_endpoint_failure() => {
                    endpoint.failed(self.fleet.eject, self.fleet.max_eject);
                    let attempts = self.fleet.max_attempts as usize;
                    match tried.len() < attempts.min(pool.endpoints.len()) {
                        true => {
                            tracing::warn!(endpoint = %endpoint.url, %err, attempt = tried.len(), "upstream endpoint failed before the first chunk; trying another")
                        }
                        false => {
                            tracing::warn!(endpoint = %endpoint.url, %err, attempt = tried.len(), "upstream endpoint failed before the first chunk; no attempts left (upstream.max_attempts, or the pool's size)")
                        }
                    }
                    last = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::Connect("no endpoint to try".into())))
    }

    /// One attempt on one endpoint; resolves once response headers arrive.
    async fn attempt(&self, base: &Url, call: Call<'_>) -> Result<UpstreamStream, UpstreamError> {
        let (route, headers) = (call.route, call.headers);
        let deadline = Instant::now() + self.first_chunk_timeout;
        let mut url = base.clone();
        let path = format!(
            "{}{}",
            url.path().trim_end_matches('/'),
            route.upstream_path(call.response_id)
        );
        url.set_path(&path);
        let accept = match (route.generates(), route.streams_when_asked()) {
            (true, _) => "text/event-stream",
            (false, true) => "application/json, text/event-stream",
            (false, false) => "application/json",
        };
        let is_content_type = |name: &str| name.eq_ignore_ascii_case("content-type");
        let content_type = headers
            .iter()
            .find(|(name, _)| is_content_type(name))
            .map_or("application/json", |(_, value)| value.as_str());
        let mut builder = match route.is_get() {
            true => {
                url.set_query(
                    std::str::from_utf8(call.body)
                        .ok()
                        .filter(|q| !q.is_empty()),
                );
                self.http.get(url).header("accept", accept)
            }
            false if call.body.is_empty() => self.http.post(url).header("accept", accept),
            false => self
                .http
                .post(url)
                .header("content-type", content_type)
                .header("accept", accept)
                .body(call.body.clone()),
        };
        for (name, value) in headers.iter().filter(|(name, _)| !is_content_type(name)) {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(secrecy::ExposeSecret::expose_secret(key));
        }
        let response = tokio::time::timeout_at(deadline, builder.send())
            .await
            .map_err(|_| UpstreamError::Timeout(self.first_chunk_timeout))?
            .map_err(|e| UpstreamError::Connect(describe(e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = Limited::new(reqwest::Body::from(response), MAX_ERROR_BODY).collect();
            let body = match tokio::time::timeout_at(deadline, body).await {
                Ok(Ok(collected)) => collected.to_bytes(),
                _ => bytes::Bytes::new(),
            };
            return Err(UpstreamError::Status(error_from_body(status, &body)));
        }
        // Speech to text and Messages stream when the request asked.
        let streamed = route.generates()
            || response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
        Ok(UpstreamStream {
            body: response.bytes_stream().boxed(),
            whole: (!streamed).then(bytes::BytesMut::new),
            parser: SseParser::new(),
            deadline: Some(deadline),
            first_chunk_timeout: self.first_chunk_timeout,
            idle_timeout: self.idle_timeout,
            finished: false,
            typed_end: route.is_responses(),
            ended: false,
            first: None,
            in_flight: None,
        })
    }
}

/// The index of the endpoint at `url` in `pool`, if it may take a request
/// now: the holder of stored response `id` (no other replica knows it).
fn pinned_endpoint(
    pool: &crate::fleet::endpoints::Pool,
    url: &str,
    id: &str,
) -> Result<usize, UpstreamError> {
    let at = pool
        .endpoints
        .iter()
        .position(|e| e.url.as_str() == url)
        .ok_or_else(|| {
            UpstreamError::HolderGone(format!(
                "Response with id '{id}' not found: the replica that held it is no longer in the fleet."
            ))
        })?;
    match pool.endpoints[at].available() {
        true => Ok(at),
        false => Err(holder_down(id)),
    }
}

fn holder_down(id: &str) -> UpstreamError {
    UpstreamError::HolderDown(format!(
        "The replica that holds response '{id}' is unavailable (down or ejected after failures); no other replica has it. Try again later, or start a new response without `previous_response_id`."
    ))
}

/// A reqwest error with its causes, without the URL (it may carry credentials).
fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(inner) = source {
        message = format!("{message}: {inner}");
        source = inner.source();
    }
    message
}

/// Maps an upstream error response to the error the client sees, keeping
/// vLLM's status, type and message.
fn error_from_body(status: StatusCode, body: &[u8]) -> ErrorInfo {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let error = value.get("error").unwrap_or(&value);
        let mut info = error_info_from_value(error);
        info.status = status.as_u16();
        if error.get("type").is_none() {
            info.kind = kind_for_status(status).to_string();
        }
        return info;
    }
    let text = String::from_utf8_lossy(body);
    ErrorInfo::new(
        status,
        kind_for_status(status),
        if text.trim().is_empty() {
            format!("upstream answered {status}")
        } else {
            text.chars().take(512).collect::<String>()
        },
    )
}

/// The chunks of one upstream response.
pub struct UpstreamStream {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    /// For a route answered with one JSON body: that body so far (it
    /// becomes the stream's one chunk at its end).
    whole: Option<bytes::BytesMut>,
    parser: SseParser,
    /// Until the first chunk arrives, the absolute first-chunk deadline.
    deadline: Option<Instant>,
    first_chunk_timeout: Duration,
    idle_timeout: Duration,
    finished: bool,
    /// Whether the stream ends with a terminal event of its own (the
    /// Responses API), and whether that event has arrived.
    typed_end: bool,
    ended: bool,
    /// The first chunk, read while choosing the endpoint.
    first: Option<Chunk>,
    /// Counts the stream as running on its endpoint.
    in_flight: Option<InFlight>,
}

impl UpstreamStream {
    /// The endpoint it runs on.
    pub fn endpoint(&self) -> Option<&Url> {
        self.in_flight.as_ref().map(|f| &f.endpoint().url)
    }

    /// Leaves its endpoint out after it failed mid-answer (as before the
    /// first chunk), so a continuation goes elsewhere.
    pub fn eject(&self, fleet: &Fleet) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.endpoint().failed(fleet.eject, fleet.max_eject);
        }
    }

    /// Reads the first event ahead, so that a failure before it can be retried elsewhere.
    async fn prefetch(&mut self) -> Result<(), UpstreamError> {
        self.first = self.read().await?;
        Ok(())
    }

    /// The next chunk; `Ok(None)` after `[DONE]`.
    pub async fn next(&mut self) -> Result<Option<Chunk>, UpstreamError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        self.read().await
    }

    async fn read(&mut self) -> Result<Option<Chunk>, UpstreamError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            if let Some(event) = self.parser.next_event() {
                if event.is_done() {
                    self.finished = true;
                    return Ok(None);
                }
                // The Responses API ends with its last event, not `[DONE]`.
                if self.typed_end && crate::protocol::is_terminal_event(event.chunk.payload_slice())
                {
                    self.ended = true;
                }
                if let Some(info) = parse_error_event(event.chunk.payload_slice()) {
                    self.finished = true;
                    return Err(UpstreamError::Event(info));
                }
                self.deadline = None;
                return Ok(Some(event.chunk));
            }
            let (deadline, waited) = match self.deadline {
                Some(deadline) => (deadline, self.first_chunk_timeout),
                None => (Instant::now() + self.idle_timeout, self.idle_timeout),
            };
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => return Err(UpstreamError::Timeout(waited)),
                Ok(None) if self.whole.is_some() => {
                    self.finished = true;
                    let body = self.whole.take().unwrap_or_default();
                    return Ok(Some(Chunk::from_json_body(&body)));
                }
                Ok(None) if self.ended => {
                    self.finished = true;
                    return Ok(None);
                }
                Ok(None) => {
                    self.finished = true;
                    return Err(UpstreamError::Truncated);
                }
                Ok(Some(Err(err))) => {
                    self.finished = true;
                    return Err(UpstreamError::Body(describe(err)));
                }
                Ok(Some(Ok(bytes))) => match &mut self.whole {
                    Some(whole) if whole.len() + bytes.len() > MAX_JSON_ANSWER => {
                        self.finished = true;
                        return Err(UpstreamError::Body(format!(
                            "the answer is larger than {MAX_JSON_ANSWER} bytes"
                        )));
                    }
                    Some(whole) => {
                        self.deadline = None;
                        whole.extend_from_slice(&bytes);
                    }
                    None => self.parser.push(&bytes),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_error_bodies_keep_status_type_and_message() {
        let body = br#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}}"#;
        let info = error_from_body(StatusCode::NOT_FOUND, body);
        assert_eq!(
            info,
            ErrorInfo::new(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                "The model `x` does not exist."
            )
        );
        let info = error_from_body(StatusCode::SERVICE_UNAVAILABLE, b"overloaded");
        assert_eq!(info.status, 503);
        assert_eq!(info.message, "overloaded");
    }

    /// What the operator reads when endpoints fail: "trying another" only
    /// when an attempt is left, and which setting ended the tries when not.
    #[tokio::test]
    async fn the_log_says_another_endpoint_is_tried_only_when_one_is() {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        async fn refused_url() -> Url {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            drop(listener);
            Url::parse(&url).unwrap()
        }
        // (max_attempts, endpoints in the pool, "trying another" lines)
        for (attempts, endpoints, trying_another) in [(1, 3, 0), (2, 3, 1), (3, 3, 2), (3, 1, 0)] {
            let lines = Lines::default();
            let writer = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            let _logging = tracing::subscriber::set_default(subscriber);
            let config = UpstreamConfig {
                urls: {
                    let mut urls = Vec::new();
                    for _ in 0..endpoints {
                        urls.push(refused_url().await);
                    }
                    urls
                },
                max_attempts: std::num::NonZeroU32::new(attempts).unwrap(),
                ..UpstreamConfig::default()
            };
            let registry = crate::observe::metrics::MetricsRegistry::new(
                crate::observe::metrics::Roles::WORKER,
            );
            let client = UpstreamClient::new(&config, &[], &FleetMetrics::new(&registry)).unwrap();
            let body = bytes::Bytes::from_static(br#"{"model":"m","prompt":"hi"}"#);
            let call = Call {
                model: "m",
                prefix: 0,
                route: Route::Completions,
                body: &body,
                headers: &[],
                response_id: None,
                pinned: None,
            };
            let opened = client.open(call).await;
            assert!(opened.is_err(), "no endpoint listens");
            let log = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            assert_eq!(
                log.matches("failed before the first chunk; trying another")
                    .count(),
                trying_another,
                "max_attempts = {attempts}, {endpoints} endpoints: {log}"
            );
            assert_eq!(
                log.matches("no attempts left (upstream.max_attempts, or the pool's size)")
                    .count(),
                1,
                "max_attempts = {attempts}: {log}"
            );
        }
    }
}
