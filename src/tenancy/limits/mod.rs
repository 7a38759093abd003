//! The limits stage: per-key and per-team requests per minute, tokens per
//! minute and concurrent requests, checked at admission and settled when the
//! request ends.
//!
//! Each limit is a sliding window of one minute over a log of admissions: a
//! request is admitted only if, counting it, no limit of its key (or of the
//! key's team) is exceeded over the last 60 s, so at most the limit is ever
//! admitted in any minute. A request reserves its token budget (`max_tokens`
//! times the choices, or `limits.reserve_tokens`, plus an estimate of the
//! prompt) and is settled with vLLM's usage when it ends, so a short answer
//! frees what it did not use. Concurrent requests hold a lease until they end
//! (or, if their edge died, until `limits.lease_secs` passes).
//!
//! With `limits.url = redis://…` every check is one Lua script run in Redis,
//! atomic across all edges (`redis`); with `memory://` the same algorithm
//! runs in process (`memory`). When Redis is unreachable, `on_unavailable`
//! decides: `local` checks in process with each limit divided by
//! `limits.edges`, `refuse` answers 503.

mod config;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::{Identity, Limits, TenancyMetrics};
use crate::backends::queue::Lane;
use crate::error::{GatewayError, RateLimited};
use crate::observe::outage::Outage;

pub use config::{LimitsConfig, OnLimiterDown};
pub use memory::MemoryLimits;
pub use redis::RedisLimits;

/// The window every limit counts over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Each limit of `limits` divided by `parts` (at least 1 left of each): an
/// edge's share when limits are checked locally.
fn share(limits: &Limits, parts: u64) -> Limits {
    let part = |v: Option<u64>| v.map(|v| (v / parts.max(1)).max(1));
    Limits {
        requests_per_minute: part(limits.requests_per_minute),
        tokens_per_minute: part(limits.tokens_per_minute),
        max_concurrent: part(limits.max_concurrent),
        models: limits.models.clone(),
        priority: limits.priority,
    }
}

/// One set of limits counted together: a key's, or its team's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `key:<id>` or `team:<id>`.
    pub id: String,
    pub whose: Whose,
    pub limits: Limits,
}

/// Whose limits a scope holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    Key,
    Team,
}

impl Whose {
    /// How a refusal names it.
    fn describe(self) -> &'static str {
        match self {
            Whose::Key => "this API key",
            Whose::Team => "this API key's team",
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
}

impl LimitKind {
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrency => "concurrency",
        }
    }
}

/// Where one scope stands after a check. The `x-ratelimit-*` headers
/// describe the binding limits of all the request's scopes ([`Standing::binding`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub limit_requests: Option<u64>,
    pub remaining_requests: u64,
    /// Until the oldest request counted leaves the window (one more is free).
    pub reset_requests: Duration,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: u64,
    pub reset_tokens: Duration,
}

/// The answer of a check, with each scope's standing (in the scopes' order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Admitted(Vec<Standing>),
    Refused {
        kind: LimitKind,
        /// Which of the scopes refused (an index into them).
        scope: usize,
        retry_after: Duration,
        standings: Vec<Standing>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("rate limiter unavailable: {0}")]
pub struct LimiterUnavailable(pub String);

/// Where admissions are counted: in process or in Redis.
#[async_trait]
pub trait LimitStore: Send + Sync + 'static {
    /// Admits `request_id` with `tokens` reserved if no limit of any scope
    /// would be exceeded, recording it in every scope; else records nothing.
    async fn admit(
        &self,
        scopes: &[Scope],
        request_id: &str,
        tokens: u64,
    ) -> Result<Verdict, LimiterUnavailable>;

    /// Ends the request's lease, and replaces its reservation by the tokens
    /// it used, or takes it out of every window (a refund).
    async fn settle(
        &self,
        scopes: &[Scope],
        request_id: &str,
        settlement: Settlement,
    ) -> Result<(), LimiterUnavailable>;
}

/// How an admitted request ends, for its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// It ran: it counts, with the tokens it used.
    Used(u64),
    /// It was refused after admission, for a reason its key's limits must
    /// not pay for (a model it may not use): it never counted.
    Refund,
}

/// Checks and settles requests against their key's and team's limits.
pub struct Limiter {
    store: Arc<dyn LimitStore>,
    /// With a Redis store: the in-process store used while Redis is down
    /// (`on_unavailable = "local"`), with each limit shared between `edges`.
    fallback: Option<(MemoryLimits, u64)>,
    on_unavailable: OnLimiterDown,
    /// Tokens reserved for a request that sets no `max_tokens`.
    reserve_tokens: u64,
    outage: Outage,
    metrics: Arc<TenancyMetrics>,
}

/// An admitted request's place in its scopes, settled when the request ends.
pub struct Admission {
    limiter: Arc<Limiter>,
    scopes: Vec<Scope>,
    request_id: String,
    /// Counted in the in-process fallback (Redis was down at admission).
    local: bool,
    pub reserved: u64,
    /// The part of `reserved` estimated for the prompt.
    pub prompt_estimate: u64,
    pub standing: Standing,
}

impl Limiter {
    pub async fn new(config: &LimitsConfig, metrics: Arc<TenancyMetrics>) -> Arc<Self> {
        let (store, fallback): (Arc<dyn LimitStore>, _) = match config.redis_url() {
            Some(url) => (
                Arc::new(
                    RedisLimits::connect(url, &config.key_prefix, config.timeout, config.lease)
                        .await,
                ),
                Some((MemoryLimits::new(config.lease), config.edges.get())),
            ),
            None => (Arc::new(MemoryLimits::new(config.lease)), None),
        };
        Arc::new(Self {
            store,
            fallback,
            on_unavailable: config.on_unavailable,
            reserve_tokens: config.reserve_tokens.get(),
            outage: Outage::default(),
            metrics,
        })
    }

    /// The scopes a request counts in: its key's and, if any, its team's
    /// (only those with a rate or concurrency limit).
    fn scopes(identity: &Identity, lane: Lane) -> Vec<Scope> {
        // Batch lines count in a budget of their own, with the same limits:
        // a key's batch never locks it out of its interactive quota.
        let budget = match lane {
            Lane::Interactive => "",
            Lane::Batch => "batch:",
        };
        let mut scopes = Vec::with_capacity(2);
        if identity.limits.counts() {
            scopes.push(Scope {
                id: format!("{budget}key:{}", identity.key_id),
                whose: Whose::Key,
                limits: identity.limits.clone(),
            });
        }
        if let Some(team) = &identity.team
            && team.limits.counts()
        {
            scopes.push(Scope {
                id: format!("{budget}team:{}", team.id),
                whose: Whose::Team,
                limits: team.limits.clone(),
            });
        }
        scopes
    }

    /// Admits a request of `identity` or refuses it with a 429 (503 when the
    /// limiter is unavailable and configured to refuse). `None`: its key and
    /// team have no rate or concurrency limit, so there is nothing to count.
    /// It reserves its output cap (`max_tokens` per choice, or
    /// `limits.reserve_tokens`) times `choices`, plus about a token per 4
    /// bytes of prompt.
    pub async fn admit(
        self: &Arc<Self>,
        identity: &Identity,
        request_id: &str,
        request: &crate::protocol::InferenceRequest,
        lane: Lane,
    ) -> Result<Option<Admission>, GatewayError> {
        let scopes = Self::scopes(identity, lane);
        if scopes.is_empty() {
            return Ok(None);
        }
        let prompt_estimate = (request.prompt_bytes() as u64).div_ceil(4);
        let tokens = request
            .output_limit()
            .map_or(self.reserve_tokens, u64::from)
            .saturating_mul(request.choices().max(1))
            .saturating_add(prompt_estimate);
        let (verdict, local) = match self.store.admit(&scopes, request_id, tokens).await {
            Ok(verdict) => {
                self.up();
                (verdict, false)
            }
            Err(err) => {
                self.down(&err);
                match (&self.fallback, self.on_unavailable) {
                    (Some((local, edges)), OnLimiterDown::Local) => {
                        let shares: Vec<Scope> = scopes
                            .iter()
                            .map(|s| Scope {
                                limits: share(&s.limits, *edges),
                                ..s.clone()
                            })
                            .collect();
                        let verdict = local
                            .admit(&shares, request_id, tokens)
                            .await
                            .map_err(|err| GatewayError::Overloaded(err.to_string()))?;
                        (verdict, true)
                    }
                    _ => {
                        self.metrics
                            .limited
                            .with_label_values(&["unavailable"])
                            .inc();
                        return Err(GatewayError::Overloaded(format!(
                            "{err}; requests are refused until it is back"
                        )));
                    }
                }
            }
        };
        match verdict {
            Verdict::Admitted(standings) => Ok(Some(Admission {
                limiter: self.clone(),
                scopes,
                request_id: request_id.to_string(),
                local,
                reserved: tokens,
                prompt_estimate,
                standing: Standing::binding(&standings),
            })),
            Verdict::Refused {
                kind,
                scope,
                retry_after,
                standings,
            } => {
                self.metrics
                    .limited
                    .with_label_values(&[kind.label()])
                    .inc();
                let refusing = &scopes[scope.min(scopes.len() - 1)];
                let (whose, limit) = (refusing.whose.describe(), &refusing.limits);
                let message = match kind {
                    LimitKind::Requests => format!(
                        "Rate limit reached for requests per minute on {whose}: limit {}. Try again in {}.",
                        limit.requests_per_minute.unwrap_or(0),
                        format_duration(retry_after)
                    ),
                    LimitKind::Tokens if tokens > limit.tokens_per_minute.unwrap_or(u64::MAX) => {
                        format!(
                            "Request too large for tokens per minute on {whose}: it may use {tokens} tokens (the prompt and max_tokens), the limit is {}. Lower max_tokens.",
                            limit.tokens_per_minute.unwrap_or(0)
                        )
                    }
                    LimitKind::Tokens => format!(
                        "Rate limit reached for tokens per minute on {whose}: limit {}, this request may use {tokens}. Try again in {}.",
                        limit.tokens_per_minute.unwrap_or(0),
                        format_duration(retry_after)
                    ),
                    LimitKind::Concurrency => format!(
                        "Too many concurrent requests on {whose}: limit {}. Try again when one has finished.",
                        limit.max_concurrent.unwrap_or(0)
                    ),
                };
                Err(GatewayError::RateLimited(Box::new(RateLimited {
                    limit: kind.label(),
                    message,
                    retry_after,
                    headers: Standing::binding(&standings).headers(),
                })))
            }
        }
    }

    fn up(&self) {
        if self.fallback.is_some() && self.outage.succeeded().is_some() {
            tracing::info!("the rate limiter's Redis is back; limits are exact across edges again");
            self.metrics
                .backend_up
                .with_label_values(&["limits"])
                .set(1);
        }
    }

    fn down(&self, err: &LimiterUnavailable) {
        if self.outage.failed().is_some() {
            let fallback = match self.on_unavailable {
                OnLimiterDown::Local => {
                    "checking limits in this process, each divided by limits.edges"
                }
                OnLimiterDown::Refuse => "refusing requests of limited keys",
            };
            tracing::warn!(%err, "the rate limiter's Redis is unavailable; {fallback} until it is back");
            self.metrics
                .backend_up
                .with_label_values(&["limits"])
                .set(0);
        }
        self.metrics.limiter_fallbacks.inc();
    }
}

impl Admission {
    /// Settles the request with the tokens it used, off the request path.
    pub fn settle(self, tokens: u64) {
        tokio::spawn(self.end(Settlement::Used(tokens)));
    }

    /// Takes the request out of its limits' windows before the refusal is
    /// answered, so that a client retrying at once finds its quota whole.
    pub async fn refund(self) {
        self.end(Settlement::Refund).await;
    }

    async fn end(self, settlement: Settlement) {
        let limiter = &self.limiter;
        let result = match (&limiter.fallback, self.local) {
            (Some((local, _)), true) => {
                local
                    .settle(&self.scopes, &self.request_id, settlement)
                    .await
            }
            _ => {
                limiter
                    .store
                    .settle(&self.scopes, &self.request_id, settlement)
                    .await
            }
        };
        if let Err(err) = result {
            tracing::debug!(%err, request_id = %self.request_id, ?settlement, "could not settle the request in its limits; its reservation stands");
        }
    }
}

impl Standing {
    /// The binding limits of several scopes: for requests and for tokens
    /// each, the scope (of those with that limit) with the least left; the
    /// first scope, the key, on a tie.
    pub fn binding(standings: &[Standing]) -> Standing {
        let requests = standings
            .iter()
            .filter(|s| s.limit_requests.is_some())
            .min_by_key(|s| s.remaining_requests);
        let tokens = standings
            .iter()
            .filter(|s| s.limit_tokens.is_some())
            .min_by_key(|s| s.remaining_tokens);
        Standing {
            limit_requests: requests.and_then(|s| s.limit_requests),
            remaining_requests: requests.map_or(0, |s| s.remaining_requests),
            reset_requests: requests.map_or(Duration::ZERO, |s| s.reset_requests),
            limit_tokens: tokens.and_then(|s| s.limit_tokens),
            remaining_tokens: tokens.map_or(0, |s| s.remaining_tokens),
            reset_tokens: tokens.map_or(Duration::ZERO, |s| s.reset_tokens),
        }
    }

    /// OpenAI's rate-limit headers for this standing (only for the limits set).
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        if let Some(limit) = self.limit_requests {
            put("x-ratelimit-limit-requests", limit.to_string());
            put(
                "x-ratelimit-remaining-requests",
                self.remaining_requests.to_string(),
            );
            put(
                "x-ratelimit-reset-requests",
                format_duration(self.reset_requests),
            );
        }
        if let Some(limit) = self.limit_tokens {
            put("x-ratelimit-limit-tokens", limit.to_string());
            put(
                "x-ratelimit-remaining-tokens",
                self.remaining_tokens.to_string(),
            );
            put(
                "x-ratelimit-reset-tokens",
                format_duration(self.reset_tokens),
            );
        }
        headers
    }
}

/// A duration as OpenAI's headers write it: `20ms`, `1.5s`, `6m0s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (minutes, rest_ms) = (ms / 60_000, ms % 60_000);
    let seconds = rest_ms as f64 / 1000.0;
    let seconds = format!("{seconds:.3}");
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    match minutes {
        0 => format!("{seconds}s"),
        m => format!("{m}m{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openais() {
        assert_eq!(format_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_duration(Duration::from_millis(61_250)), "1m1.25s");
    }

    #[test]
    fn an_edges_share_of_limits_leaves_at_least_one() {
        let limits = Limits {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(10),
            models: Some(vec!["a".into()]),
            ..Limits::default()
        };
        assert_eq!(share(&limits, 4).requests_per_minute, Some(15));
        assert_eq!(share(&limits, 100).requests_per_minute, Some(1));
        assert_eq!(share(&limits, 100).models, limits.models);
    }
}
