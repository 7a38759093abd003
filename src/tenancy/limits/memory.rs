//! The limits counted in process: the sliding-window log of [`super`], one
//! per scope, under one lock (a check is a few map operations).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    LimitKind, LimitStore, LimiterUnavailable, Scope, Settlement, Standing, Verdict, WINDOW,
};

/// One scope's admissions within the window.
#[derive(Default)]
struct ScopeLog {
    /// When each counted request was admitted, oldest first.
    requests: VecDeque<(Instant, String)>,
    /// Token charges by admission time, oldest first, and their sum.
    tokens: VecDeque<(Instant, String, u64)>,
    token_sum: u64,
    /// Requests running, with when their lease ends.
    running: HashMap<String, Instant>,
}

impl ScopeLog {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.requests.front() {
            if now.duration_since(*at) < WINDOW {
                break;
            }
            self.requests.pop_front();
        }
        while let Some((at, _, amount)) = self.tokens.front() {
            if now.duration_since(*at) < WINDOW {
                break;
            }
            self.token_sum -= amount;
            self.tokens.pop_front();
        }
        self.running.retain(|_, lease_end| *lease_end > now);
    }

    fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.tokens.is_empty() && self.running.is_empty()
    }

    /// Why this scope refuses `tokens` more, and when to retry.
    fn refusal(&self, scope: &Scope, tokens: u64, now: Instant) -> Option<(LimitKind, Duration)> {
        let limits = &scope.limits;
        if let Some(limit) = limits.requests_per_minute
            && self.requests.len() as u64 >= limit
        {
            let oldest = self.requests.front().map_or(now, |(at, _)| *at);
            return Some((
                LimitKind::Requests,
                (oldest + WINDOW).saturating_duration_since(now),
            ));
        }
        if let Some(limit) = limits.tokens_per_minute
            && self.token_sum + tokens > limit
        {
            // When enough of the oldest charges leave the window.
            let mut freed = 0;
            let mut wait = WINDOW;
            for (at, _, amount) in &self.tokens {
                freed += amount;
                if self.token_sum - freed + tokens <= limit {
                    wait = (*at + WINDOW).saturating_duration_since(now);
                    break;
                }
            }
            return Some((LimitKind::Tokens, wait));
        }
        if let Some(limit) = limits.max_concurrent
            && self.running.len() as u64 >= limit
        {
            return Some((LimitKind::Concurrency, Duration::from_secs(1)));
        }
        None
    }

    fn standing(&self, scope: &Scope, now: Instant) -> Standing {
        let reset = |oldest: Option<Instant>| {
            oldest.map_or(Duration::ZERO, |at| {
                (at + WINDOW).saturating_duration_since(now)
            })
        };
        let limits = &scope.limits;
        Standing {
            limit_requests: limits.requests_per_minute,
            remaining_requests: limits
                .requests_per_minute
                .unwrap_or(0)
                .saturating_sub(self.requests.len() as u64),
            reset_requests: reset(self.requests.front().map(|(at, _)| *at)),
            limit_tokens: limits.tokens_per_minute,
            remaining_tokens: limits
                .tokens_per_minute
                .unwrap_or(0)
                .saturating_sub(self.token_sum),
            reset_tokens: reset(self.tokens.front().map(|(at, _, _)| *at)),
        }
    }
}

/// Limits counted in this process.
pub struct MemoryLimits {
    scopes: Mutex<HashMap<String, ScopeLog>>,
    lease: Duration,
}

impl MemoryLimits {
    pub fn new(lease: Duration) -> Self {
        Self {
            scopes: Mutex::new(HashMap::new()),
            lease,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ScopeLog>> {
        self.scopes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl LimitStore for MemoryLimits {
    async fn admit(
        &self,
        scopes: &[Scope],
        request_id: &str,
        tokens: u64,
    ) -> Result<Verdict, LimiterUnavailable> {
        let now = Instant::now();
        let mut logs = self.lock();
        for (i, scope) in scopes.iter().enumerate() {
            let log = logs.entry(scope.id.clone()).or_default();
            log.expire(now);
            if let Some((kind, retry_after)) = log.refusal(scope, tokens, now) {
                let standings = scopes
                    .iter()
                    .map(|scope| {
                        logs.get(&scope.id)
                            .map(|log| log.standing(scope, now))
                            .unwrap_or_else(|| ScopeLog::default().standing(scope, now))
                    })
                    .collect();
                return Ok(Verdict::Refused {
                    kind,
                    scope: i,
                    retry_after,
                    standings,
                });
            }
        }
        let mut standings = Vec::with_capacity(scopes.len());
        for scope in scopes {
            let log = logs.entry(scope.id.clone()).or_default();
            log.requests.push_back((now, request_id.to_string()));
            log.tokens.push_back((now, request_id.to_string(), tokens));
            log.token_sum += tokens;
            log.running.insert(request_id.to_string(), now + self.lease);
            standings.push(log.standing(scope, now));
        }
        // Forget scopes with nothing left in their window.
        if logs.len() > 10_000 {
            logs.retain(|_, log| {
                log.expire(now);
                !log.is_empty()
            });
        }
        Ok(Verdict::Admitted(standings))
    }

    async fn settle(
        &self,
        scopes: &[Scope],
        request_id: &str,
        settlement: Settlement,
    ) -> Result<(), LimiterUnavailable> {
        let mut logs = self.lock();
        for scope in scopes {
            let Some(log) = logs.get_mut(&scope.id) else {
                continue;
            };
            log.running.remove(request_id);
            let tokens = match settlement {
                Settlement::Used(tokens) => tokens,
                Settlement::Refund => {
                    log.requests.retain(|(_, id)| id != request_id);
                    if let Some(at) = log.tokens.iter().position(|(_, id, _)| id == request_id)
                        && let Some((_, _, amount)) = log.tokens.remove(at)
                    {
                        log.token_sum -= amount;
                    }
                    continue;
                }
            };
            if let Some(charge) = log
                .tokens
                .iter_mut()
                .rev()
                .find(|(_, id, _)| id == request_id)
            {
                log.token_sum = log.token_sum - charge.2 + tokens;
                charge.2 = tokens;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::Limits;
    use crate::tenancy::limits::Whose;

    fn scope(rpm: Option<u64>, tpm: Option<u64>, concurrent: Option<u64>) -> Scope {
        Scope {
            id: "key:k".into(),
            whose: Whose::Key,
            limits: Limits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                max_concurrent: concurrent,
                models: None,
                priority: None,
            },
        }
    }

    #[tokio::test]
    async fn admits_exactly_the_limit_per_window() {
        let limits = MemoryLimits::new(Duration::from_secs(600));
        let scopes = [scope(Some(3), None, None)];
        let mut admitted = 0;
        for i in 0..10 {
            if let Verdict::Admitted(standings) =
                limits.admit(&scopes, &format!("r{i}"), 1).await.unwrap()
            {
                admitted += 1;
                assert_eq!(standings[0].remaining_requests, 3 - admitted);
            }
        }
        assert_eq!(admitted, 3);
    }

    #[tokio::test]
    async fn settling_frees_unused_tokens_and_the_concurrency_slot() {
        let limits = MemoryLimits::new(Duration::from_secs(600));
        let scopes = [scope(None, Some(100), Some(1))];
        assert!(matches!(
            limits.admit(&scopes, "a", 80).await.unwrap(),
            Verdict::Admitted(_)
        ));
        assert!(matches!(
            limits.admit(&scopes, "b", 10).await.unwrap(),
            Verdict::Refused {
                kind: LimitKind::Concurrency,
                ..
            }
        ));
        limits
            .settle(&scopes, "a", Settlement::Used(30))
            .await
            .unwrap();
        assert!(matches!(
            limits.admit(&scopes, "c", 70).await.unwrap(),
            Verdict::Admitted(_)
        ));
        limits
            .settle(&scopes, "c", Settlement::Used(70))
            .await
            .unwrap();
        let refused = limits.admit(&scopes, "d", 1).await.unwrap();
        assert!(
            matches!(refused, Verdict::Refused { kind: LimitKind::Tokens, retry_after, .. } if retry_after > Duration::from_secs(58)),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn a_refusing_team_records_nothing_for_the_key() {
        let limits = MemoryLimits::new(Duration::from_secs(600));
        let team = Scope {
            id: "team:t".into(),
            whose: Whose::Team,
            ..scope(Some(1), None, None)
        };
        let key = scope(Some(5), None, None);
        assert!(matches!(
            limits
                .admit(&[key.clone(), team.clone()], "a", 1)
                .await
                .unwrap(),
            Verdict::Admitted(_)
        ));
        assert!(matches!(
            limits.admit(&[key.clone(), team], "b", 1).await.unwrap(),
            Verdict::Refused { scope: 1, .. }
        ));
        let Verdict::Admitted(standings) = limits.admit(&[key], "c", 1).await.unwrap() else {
            panic!("the key alone has room")
        };
        assert_eq!(standings[0].remaining_requests, 3, "b was not counted");
    }
}
