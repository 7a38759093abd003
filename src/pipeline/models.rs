//! `GET /v1/models` and model names: the models clients may use. With
//! `[[models]]` (a fleet) or a list in `upstream.models`, that list is the
//! answer, an alias resolves to its model, and a request for any other
//! model is refused here with vLLM's 404 (no upstream call). Without either,
//! the answer is the upstream's own `/v1/models`, kept for a few seconds,
//! and an unknown model is for vLLM to refuse.

use std::time::{Duration, Instant};

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use url::Url;

use crate::error::{ErrorInfo, GatewayError};
use crate::fleet::{Balance, ModelConfig, UpstreamConfig};
use crate::tenancy::Identity;

/// A requested model name, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The model whose endpoints serve it ("" for the single pool).
    pub pool: String,
    /// The name vLLM knows it by.
    pub upstream: String,
    /// Whether its pool routes by prompt prefix (then the request carries its prefix's hash).
    pub by_prefix: bool,
}

/// A `[[models]]` name or alias: its model, the name vLLM knows, and whether its pool routes by prefix.
#[derive(Debug, Clone)]
struct FleetModel {
    pool: String,
    upstream: String,
    by_prefix: bool,
}

/// How long an upstream's model list is served without asking again.
const UPSTREAM_LIST_TTL: Duration = Duration::from_secs(10);
/// Longest model list read from an upstream.
const MAX_LIST_BYTES: usize = 1 << 20;

pub struct ModelCatalog {
    configured: Option<Vec<String>>,
    /// `[[models]]`: each name and alias, to its model.
    fleet: std::collections::HashMap<String, FleetModel>,
    /// Whether the single pool of `upstream.urls` routes by prefix.
    single_pool_by_prefix: bool,
    http: reqwest::Client,
    urls: Vec<Url>,
    api_key: Option<SecretString>,
    /// The upstream's last answer and when it came.
    fetched: Mutex<Option<(Instant, Bytes)>>,
}

impl ModelCatalog {
    pub fn new(config: &UpstreamConfig, fleet: &[ModelConfig]) -> Result<Self, GatewayError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .timeout(config.connect_timeout + Duration::from_secs(5))
            .build()
            .map_err(|e| GatewayError::Internal(format!("cannot build the HTTP client: {e}")))?;
        let mut names = std::collections::HashMap::new();
        for model in fleet {
            let upstream = model
                .upstream_model
                .clone()
                .unwrap_or_else(|| model.name.clone());
            let entry = FleetModel {
                pool: model.name.clone(),
                upstream,
                by_prefix: model.balance == Balance::Prefix,
            };
            for name in std::iter::once(&model.name).chain(&model.aliases) {
                names.insert(name.clone(), entry.clone());
            }
        }
        let configured = match fleet.is_empty() {
            true => (!config.models.is_empty()).then(|| config.models.clone()),
            false => Some(fleet.iter().map(|m| m.name.clone()).collect()),
        };
        Ok(Self {
            configured,
            fleet: names,
            single_pool_by_prefix: config.balance == Balance::Prefix,
            http,
            urls: config.urls.clone(),
            api_key: config.api_key.clone(),
            fetched: Mutex::new(None),
        })
    }

    /// The models `identity` may use, of those listed.
    fn visible(identity: &Identity, body: Bytes) -> Bytes {
        let restricted = identity.limits.models.is_some()
            || identity
                .team
                .as_ref()
                .is_some_and(|t| t.limits.models.is_some());
        if !restricted {
            return body;
        }
        let Ok(serde_json::Value::Object(mut list)) = serde_json::from_slice(&body) else {
            return body;
        };
        if let Some(serde_json::Value::Array(data)) = list.get_mut("data") {
            data.retain(|model| {
                model
                    .get("id")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|id| identity.allows_model(id))
            });
        }
        Bytes::from(serde_json::Value::Object(list).to_string())
    }

    /// What a requested model name means: its model's name (the pool that
    /// serves it; "" for the single pool of `upstream.urls`) and the name
    /// to send vLLM. A model outside the configured list is refused, as vLLM
    /// refuses one it does not serve.
    pub fn resolve(&self, model: &str) -> Result<Resolved, GatewayError> {
        if let Some(entry) = self.fleet.get(model) {
            return Ok(Resolved {
                pool: entry.pool.clone(),
                upstream: entry.upstream.clone(),
                by_prefix: entry.by_prefix,
            });
        }
        match &self.configured {
            Some(models) if !models.iter().any(|m| m == model) => {
                Err(GatewayError::Upstream(ErrorInfo::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "NotFoundError",
                    format!("The model `{model}` does not exist."),
                )))
            }
            _ => Ok(Resolved {
                pool: String::new(),
                upstream: model.to_string(),
                by_prefix: self.single_pool_by_prefix,
            }),
        }
    }

    /// The models `identity` may use, in OpenAI's list shape, as JSON.
    pub async fn list_for(&self, identity: &Identity) -> Result<Bytes, GatewayError> {
        Ok(Self::visible(identity, self.list().await?))
    }

    /// The list in OpenAI's shape (`{"object": "list", "data": [...]}`), as JSON.
    async fn list(&self) -> Result<Bytes, GatewayError> {
        if let Some(models) = &self.configured {
            let data: Vec<serde_json::Value> = models
                .iter()
                .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "sluice"}))
                .collect();
            let body = serde_json::json!({"object": "list", "data": data});
            return Ok(Bytes::from(body.to_string()));
        }
        let mut fetched = self.fetched.lock().await;
        if let Some((at, body)) = fetched.as_ref()
            && at.elapsed() < UPSTREAM_LIST_TTL
        {
            return Ok(body.clone());
        }
        let body = self.fetch().await?;
        *fetched = Some((Instant::now(), body.clone()));
        Ok(body)
    }

    /// The first upstream's answer that is a model list.
    async fn fetch(&self) -> Result<Bytes, GatewayError> {
        let mut last_error = String::from("no upstream configured");
        for base in &self.urls {
            let mut url = base.clone();
            let path = format!("{}/v1/models", url.path().trim_end_matches('/'));
            url.set_path(&path);
            let mut request = self.http.get(url);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key.expose_secret());
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => {
                    let body = match response.bytes().await {
                        Ok(body) if body.len() <= MAX_LIST_BYTES => body,
                        Ok(_) => {
                            last_error = "the model list is too large".into();
                            continue;
                        }
                        Err(err) => {
                            last_error = err.without_url().to_string();
                            continue;
                        }
                    };
                    #[derive(serde::Deserialize)]
                    struct List {
                        #[serde(rename = "data")]
                        _data: Vec<serde::de::IgnoredAny>,
                    }
                    match serde_json::from_slice::<List>(&body) {
                        Ok(_) => return Ok(body),
                        Err(err) => last_error = format!("not a model list: {err}"),
                    }
                }
                Ok(response) => last_error = format!("answered {}", response.status()),
                Err(err) => last_error = err.without_url().to_string(),
            }
        }
        Err(GatewayError::UpstreamUnavailable(format!(
            "cannot list the upstream's models: {last_error}"
        )))
    }
}

/// OpenAI's answer for a model the key may not use: 404, as for one that does not exist.
pub fn no_access(model: &str) -> GatewayError {
    GatewayError::Upstream(ErrorInfo::new(
        axum::http::StatusCode::NOT_FOUND,
        "NotFoundError",
        format!("The model `{model}` does not exist or you do not have access to it."),
    ))
}
