//! The fleet: each model's pool of vLLM endpoints, their health, and the
//! choice of an endpoint for a request.
//!
//! An endpoint is left out while it is *ejected* — after a failure before a
//! request's first byte (connection refused, timeout, 5xx, a broken
//! stream), for a cooldown that doubles while it keeps failing
//! (`upstream.eject_ms` up to `upstream.max_eject_ms`) — or while its
//! `/health` check fails. A passing health check takes it back at once.
//! When every endpoint of a pool is out, the one whose cooldown ends first
//! is tried anyway: a request is refused only when no endpoint could serve it.
//!
//! Balancing per pool: round robin, or least outstanding (the less busy of
//! two endpoints picked at random, counting the requests this process runs
//! on each).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use url::Url;

use crate::config::{Balance, ModelConfig, UpstreamConfig};
use crate::metrics::Metrics;

/// One vLLM server of a pool.
pub struct Endpoint {
    pub url: Url,
    /// Requests this process runs on it now.
    in_flight: AtomicUsize,
    /// The last `/health` check passed (true until one fails).
    healthy: AtomicBool,
    /// Milliseconds since the fleet's epoch until which it is left out.
    ejected_until_ms: AtomicU64,
    /// Failures in a row.
    failures: AtomicU32,
    epoch: Instant,
    up: prometheus::IntGauge,
    in_flight_gauge: prometheus::IntGauge,
    succeeded: prometheus::IntCounter,
    failed: prometheus::IntCounter,
}

impl Endpoint {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether requests may be sent to it now.
    pub fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.now_ms() >= self.ejected_until_ms.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn show(&self) {
        self.up.set(i64::from(self.available()));
    }

    /// A request reached its first chunk here.
    pub fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.succeeded.inc();
    }

    /// A request failed here before its first byte: leave it out for a
    /// cooldown that doubles with each failure in a row.
    pub fn failed(&self, eject: Duration, max_eject: Duration) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let cooldown = eject
            .saturating_mul(1 << (failures - 1).min(16))
            .min(max_eject);
        self.ejected_until_ms.store(
            self.now_ms() + cooldown.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.failed.inc();
        self.show();
    }

    /// Counts a request running here until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_gauge.inc();
        InFlight(self.clone())
    }

    fn checked(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        if healthy {
            // Back in rotation at once, whatever its cooldown.
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
        }
        self.show();
    }
}

/// A request running on an endpoint.
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.in_flight_gauge.dec();
    }
}

/// The endpoints of one model.
pub struct Pool {
    pub name: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    balance: Balance,
    next: AtomicUsize,
}

impl Pool {
    /// The endpoint for the next attempt, none of `tried`: an available one
    /// by the pool's balance, else (all out) the one back soonest.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| !tried.contains(i) && self.endpoints[*i].available())
            .collect();
        if candidates.is_empty() {
            return (0..self.endpoints.len())
                .filter(|i| !tried.contains(i))
                .min_by_key(|i| self.endpoints[*i].ejected_until_ms.load(Ordering::Relaxed));
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        match self.balance {
            Balance::RoundRobin => Some(candidates[turn % candidates.len()]),
            Balance::LeastOutstanding => {
                let a = candidates[turn % candidates.len()];
                let b = candidates[rand::random_range(0..candidates.len())];
                Some(
                    match self.endpoints[b].in_flight() < self.endpoints[a].in_flight() {
                        true => b,
                        false => a,
                    },
                )
            }
        }
    }

    /// Endpoints available now.
    pub fn healthy(&self) -> usize {
        self.endpoints.iter().filter(|e| e.available()).count()
    }
}

/// Every pool: one per `[[models]]` entry, and the single pool of
/// `upstream.urls` (named "") for requests of any other model.
pub struct Fleet {
    pools: HashMap<String, Arc<Pool>>,
    pub eject: Duration,
    pub max_eject: Duration,
    pub max_attempts: u32,
}

impl Fleet {
    pub fn new(config: &UpstreamConfig, models: &[ModelConfig], metrics: &Metrics) -> Self {
        let epoch = Instant::now();
        let pool = |name: &str, urls: &[Url], balance: Balance| {
            let label = if name.is_empty() { "*" } else { name };
            let endpoints = urls
                .iter()
                .map(|url| {
                    let host = url.as_str().trim_end_matches('/');
                    let labels = [label, host];
                    let endpoint = Endpoint {
                        url: url.clone(),
                        in_flight: AtomicUsize::new(0),
                        healthy: AtomicBool::new(true),
                        ejected_until_ms: AtomicU64::new(0),
                        failures: AtomicU32::new(0),
                        epoch,
                        up: metrics.endpoint_up.with_label_values(&labels),
                        in_flight_gauge: metrics.endpoint_in_flight.with_label_values(&labels),
                        succeeded: metrics
                            .endpoint_requests
                            .with_label_values(&[label, host, "ok"]),
                        failed: metrics
                            .endpoint_requests
                            .with_label_values(&[label, host, "failed"]),
                    };
                    endpoint.show();
                    Arc::new(endpoint)
                })
                .collect();
            Arc::new(Pool {
                name: name.to_string(),
                endpoints,
                balance,
                next: AtomicUsize::new(0),
            })
        };
        let mut pools = HashMap::new();
        pools.insert(String::new(), pool("", &config.urls, config.balance));
        for model in models {
            pools.insert(
                model.name.clone(),
                pool(&model.name, &model.endpoints, model.balance),
            );
        }
        Self {
            pools,
            eject: config.eject,
            max_eject: config.max_eject,
            max_attempts: config.max_attempts,
        }
    }

    /// The pool serving `model` ("" or unknown: the single pool).
    pub fn pool(&self, model: &str) -> Option<&Arc<Pool>> {
        self.pools.get(model).or_else(|| self.pools.get(""))
    }

    /// The pools of `[[models]]` (the single pool only when there are none), for `/ready`.
    pub fn models(&self) -> Vec<&Arc<Pool>> {
        let mut pools: Vec<_> = self
            .pools
            .values()
            .filter(|p| !p.name.is_empty() || self.pools.len() == 1)
            .collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        pools
    }

    /// Checks every endpoint's `/health` every `interval`, in the background,
    /// for as long as the fleet lives.
    pub fn check_health(self: &Arc<Self>, http: reqwest::Client, interval: Duration) {
        for pool in self.pools.values() {
            for endpoint in &pool.endpoints {
                let endpoint: Weak<Endpoint> = Arc::downgrade(endpoint);
                let http = http.clone();
                tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(interval);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        ticks.tick().await;
                        let Some(endpoint) = endpoint.upgrade() else {
                            return;
                        };
                        let mut url = endpoint.url.clone();
                        let path = format!("{}/health", url.path().trim_end_matches('/'));
                        url.set_path(&path);
                        let answer = http
                            .get(url)
                            .timeout(interval.min(Duration::from_secs(2)))
                            .send()
                            .await;
                        let healthy = answer.is_ok_and(|r| r.status().is_success());
                        let was = endpoint.available();
                        endpoint.checked(healthy);
                        if was != endpoint.available() {
                            let state = if endpoint.available() { "back" } else { "out" };
                            tracing::info!(endpoint = %endpoint.url, state, "upstream endpoint health changed");
                        }
                    }
                });
            }
        }
    }
}
