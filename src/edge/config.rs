//! The edge's sections of `gateway.toml`: `[server]` (the listener and its
//! deadlines, request bounds, WebSockets), `[cors]` and `[admin]`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::settings::{Invalid, millis, non_empty, non_empty_secret, positive_millis};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the edge listens on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: NonZeroUsize,
    /// Largest upload accepted on the speech-to-text routes (a multipart
    /// form with the audio), in bytes.
    pub max_upload_bytes: NonZeroUsize,
    /// How long in-flight streams may run on after a shutdown signal.
    #[serde(rename = "shutdown_grace_ms", deserialize_with = "millis")]
    pub shutdown_grace: Duration,
    /// Connections the kernel queues before they are accepted (the listen backlog).
    pub listen_backlog: NonZeroU32,
    /// Open connections at once (WebSockets included); over it, new ones get
    /// 503 and are closed. Unset: the open-file limit less 256.
    pub max_connections: Option<NonZeroUsize>,
    /// Deadline for a request's headers; also closes a keep-alive connection
    /// that sends no new request for this long.
    #[serde(rename = "header_timeout_ms", deserialize_with = "positive_millis")]
    pub header_timeout: Duration,
    /// Deadline for a request's whole body, once its headers are in (408 after it).
    #[serde(rename = "body_timeout_ms", deserialize_with = "positive_millis")]
    pub body_timeout: Duration,
    /// A WebSocket with no request running that sends nothing for this long is closed.
    #[serde(rename = "ws_idle_timeout_ms", deserialize_with = "positive_millis")]
    pub ws_idle_timeout: Duration,
    /// Requests a WebSocket client may send ahead while one streams; one
    /// more gets an error frame and close 1008.
    pub ws_max_queued_requests: NonZeroUsize,
    /// WebSockets one API key may hold open at once; one more is refused (4429).
    pub ws_max_sockets_per_key: NonZeroUsize,
    /// Largest `n` (choices per prompt) a request may ask for (OpenAI's limit).
    pub max_n: NonZeroU32,
    /// Most prompts in one request's `prompt` list.
    pub max_prompts: NonZeroUsize,
    /// A stream still waiting for its first event this long (queued, or in
    /// a long prefill) starts with its headers and then an SSE comment line
    /// this often until the answer comes (a WebSocket gets a ping), so
    /// proxies with idle timeouts do not cut it. 0: wait silently.
    #[serde(rename = "wait_keepalive_ms", deserialize_with = "millis")]
    pub wait_keepalive: Duration,
}

/// `n`, checked for 0 when the constant is evaluated.
const fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("a default is not zero")
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: const { nonzero(1024 * 1024) },
            // OpenAI's limit for an audio file.
            max_upload_bytes: const { nonzero(25 * 1024 * 1024) },
            shutdown_grace: Duration::from_secs(10),
            listen_backlog: const { NonZeroU32::new(4096).expect("not zero") },
            max_connections: None,
            header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            ws_idle_timeout: Duration::from_secs(300),
            ws_max_queued_requests: const { nonzero(16) },
            ws_max_sockets_per_key: const { nonzero(100) },
            max_n: const { NonZeroU32::new(128).expect("not zero") },
            max_prompts: const { nonzero(2048) },
            wait_keepalive: Duration::from_secs(15),
        }
    }
}

/// Which web pages may call the gateway (CORS, and the `Origin` of WebSocket
/// upgrades). The defaults are vLLM's: any origin, method and header, no
/// credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins such as `https://app.example.com`; `"*"` allows any.
    pub allowed_origins: Vec<String>,
    /// Methods a page may use; `"*"` allows any.
    pub allowed_methods: Vec<String>,
    /// Request headers a page may send; `"*"` allows any.
    pub allowed_headers: Vec<String>,
    /// Whether pages may send credentials (cookies, HTTP authentication).
    pub allow_credentials: bool,
}

impl Default for CorsConfig {
    fn default() -> Self {
        let any = || vec!["*".to_string()];
        Self {
            allowed_origins: any(),
            allowed_methods: any(),
            allowed_headers: any(),
            allow_credentials: false,
        }
    }
}

impl CorsConfig {
    /// Whether a request with this `Origin` may proceed (no `Origin`: not a browser).
    pub fn allows_origin(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            None => true,
            Some(origin) => self
                .allowed_origins
                .iter()
                .any(|allowed| allowed == "*" || allowed.as_bytes() == origin),
        }
    }

    /// Refuses origins, methods and headers that are not one.
    pub fn validate(&self) -> Result<(), Invalid> {
        for origin in &self.allowed_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(Invalid::new(
                    "cors.allowed_origins",
                    format!("`{origin}` is not an origin"),
                ));
            }
        }
        for method in &self.allowed_methods {
            if method != "*" && method.parse::<axum::http::Method>().is_err() {
                return Err(Invalid::new(
                    "cors.allowed_methods",
                    format!("`{method}` is not an HTTP method"),
                ));
            }
        }
        for header in &self.allowed_headers {
            if header != "*" && header.parse::<axum::http::HeaderName>().is_err() {
                return Err(Invalid::new(
                    "cors.allowed_headers",
                    format!("`{header}` is not a header name"),
                ));
            }
        }
        Ok(())
    }
}

/// `[admin]`: the admin API's own listener, off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin API listens, e.g. `127.0.0.1:8081`; unset: no admin API.
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// The bearer token admin requests must present (set it with
    /// `SLUICE_ADMIN__TOKEN`); only its SHA-256 is kept after startup.
    #[serde(deserialize_with = "non_empty_secret")]
    pub token: Option<SecretString>,
}

impl AdminConfig {
    /// A listener needs a token of at least 16 characters.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.listen.is_none() {
            return Ok(());
        }
        match &self.token {
            None => Err(Invalid::new(
                "admin.token",
                "must be set when admin.listen is (use $SLUICE_ADMIN__TOKEN)",
            )),
            Some(token) if token.expose_secret().len() < 16 => Err(Invalid::new(
                "admin.token",
                "must be at least 16 characters",
            )),
            Some(_) => Ok(()),
        }
    }
}

fn optional_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    match non_empty(d)? {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(serde::de::Error::custom),
    }
}
