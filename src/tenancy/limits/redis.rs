//! The limits counted in Redis, exact across every edge: each check is one
//! run of `admit.lua` (every scope checked and recorded atomically, on
//! Redis's clock) and each settlement one run of `settle.lua`, both called
//! by their SHA-1 (`EVALSHA`), loaded again if Redis lost them.

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::config::Options;
use tokio::sync::RwLock;

use super::{
    LimitKind, LimitStore, LimiterUnavailable, Scope, Settlement, Standing, Verdict, WINDOW,
};

const ADMIT: &str = include_str!("admit.lua");
const SETTLE: &str = include_str!("settle.lua");

pub struct RedisLimits {
    client: Client,
    key_prefix: String,
    lease: Duration,
    options: Options,
    /// The scripts' SHA-1s, once loaded.
    hashes: RwLock<Option<(String, String)>>,
}

impl RedisLimits {
    /// Creates the client and starts connecting; never fails (an unreachable
    /// Redis is handled per check, like one that goes away later).
    pub async fn connect(url: &str, key_prefix: &str, timeout: Duration, lease: Duration) -> Self {
        let client = crate::backends::redis::connect(url, timeout, "rate limiter").await;
        Self {
            client,
            key_prefix: key_prefix.to_string(),
            lease,
            options: crate::backends::redis::one_attempt(timeout),
            hashes: RwLock::new(None),
        }
    }

    /// The four keys of each scope, in the order the scripts expect.
    fn keys(&self, scopes: &[Scope]) -> Vec<String> {
        let mut keys = Vec::with_capacity(scopes.len() * 4);
        for scope in scopes {
            for part in ["req", "tok", "amt", "run"] {
                keys.push(format!("{}limits:{}:{part}", self.key_prefix, scope.id));
            }
        }
        keys
    }

    async fn hashes(&self, reload: bool) -> Result<(String, String), LimiterUnavailable> {
        if !reload && let Some(hashes) = self.hashes.read().await.clone() {
            return Ok(hashes);
        }
        let client = self.client.with_options(&self.options);
        let admit: String = client.script_load(ADMIT).await.map_err(unavailable)?;
        let settle: String = client.script_load(SETTLE).await.map_err(unavailable)?;
        *self.hashes.write().await = Some((admit.clone(), settle.clone()));
        Ok((admit, settle))
    }

    /// Runs a script by hash, loading the scripts again if Redis forgot them.
    async fn run<R: FromValue>(
        &self,
        settle: bool,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, LimiterUnavailable> {
        if !self.client.is_connected() {
            return Err(LimiterUnavailable("not connected".into()));
        }
        let client = self.client.with_options(&self.options);
        let mut reload = false;
        loop {
            let (admit, settle_hash) = self.hashes(reload).await?;
            let hash = if settle { settle_hash } else { admit };
            match client.evalsha(hash, keys.clone(), args.clone()).await {
                Ok(value) => return Ok(value),
                Err(err) if !reload && err.details().starts_with("NOSCRIPT") => reload = true,
                Err(err) => return Err(unavailable(err)),
            }
        }
    }
}

fn unavailable(err: Error) -> LimiterUnavailable {
    LimiterUnavailable(err.to_string())
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[async_trait]
impl LimitStore for RedisLimits {
    async fn admit(
        &self,
        scopes: &[Scope],
        request_id: &str,
        tokens: u64,
    ) -> Result<Verdict, LimiterUnavailable> {
        let mut args: Vec<Value> = vec![
            request_id.into(),
            (tokens as i64).into(),
            (WINDOW.as_millis() as i64).into(),
            (self.lease.as_millis() as i64).into(),
        ];
        let limit = |v: Option<u64>| Value::from(v.map_or(0, |v| v as i64));
        for scope in scopes {
            args.push(limit(scope.limits.requests_per_minute));
            args.push(limit(scope.limits.tokens_per_minute));
            args.push(limit(scope.limits.max_concurrent));
        }
        let answer: Vec<i64> = self.run(false, self.keys(scopes), args).await?;
        // Each scope's standing: four numbers from `at` on.
        let standings = |at: usize| -> Option<Vec<Standing>> {
            let numbers = answer.get(at..at + 4 * scopes.len())?;
            Some(
                scopes
                    .iter()
                    .zip(numbers.chunks(4))
                    .map(|(scope, n)| Standing {
                        limit_requests: scope.limits.requests_per_minute,
                        remaining_requests: n[0].max(0) as u64,
                        reset_requests: millis(n[1]),
                        limit_tokens: scope.limits.tokens_per_minute,
                        remaining_tokens: n[2].max(0) as u64,
                        reset_tokens: millis(n[3]),
                    })
                    .collect(),
            )
        };
        let verdict = match answer.first() {
            Some(1) => standings(1).map(Verdict::Admitted),
            Some(0) if answer.len() >= 4 => standings(4).map(|standings| Verdict::Refused {
                scope: answer[1].max(0) as usize,
                kind: match answer[2] {
                    1 => LimitKind::Requests,
                    2 => LimitKind::Tokens,
                    _ => LimitKind::Concurrency,
                },
                retry_after: millis(answer[3]),
                standings,
            }),
            _ => None,
        };
        verdict.ok_or_else(|| {
            LimiterUnavailable(format!(
                "unexpected answer from the admit script: {answer:?}"
            ))
        })
    }

    async fn settle(
        &self,
        scopes: &[Scope],
        request_id: &str,
        settlement: Settlement,
    ) -> Result<(), LimiterUnavailable> {
        let (tokens, refund) = match settlement {
            Settlement::Used(tokens) => (tokens, 0),
            Settlement::Refund => (0, 1),
        };
        let args = vec![
            Value::from(request_id),
            Value::from(tokens as i64),
            Value::from(refund),
        ];
        let _: i64 = self.run(true, self.keys(scopes), args).await?;
        Ok(())
    }
}
