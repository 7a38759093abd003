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
//! Balancing per pool: round robin; least outstanding (the less busy of two
//! endpoints picked at random, counting the requests this process runs on
//! each); load (the fewest requests running and waiting by vLLM's own
//! `/metrics`, scraped with the health checks: the signal every worker
//! process shares); or prefix: a request whose prompt starts as an earlier
//! one did goes where that one went, whose vLLM holds the prefix in its
//! prefix cache; a new prefix goes to the endpoint with the fewest prefixes
//! (then the least loaded), so prefixes split evenly; and a request whose
//! endpoint is loaded beyond 1.25 × the mean (+1) goes to the least-loaded
//! endpoint instead, without moving its prefix.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use url::Url;

use super::FleetMetrics;
use super::admission::FairQueue;
use super::{Balance, ModelConfig, UpstreamConfig};
use crate::backends::queue::Priority;

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
    /// Requests running and waiting by the endpoint's last scraped `/metrics`.
    scraped_load: AtomicU64,
    /// Requests of this process that ended there since that scrape: the
    /// scraped load, less these, is what it runs now as far as is known.
    ended_since_scrape: AtomicU64,
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

    /// Its load as best known: vLLM's running and waiting requests by the
    /// last scrape less this process's requests that ended there since, or
    /// this process's own count when that is higher (it moves between scrapes).
    pub fn load(&self) -> u64 {
        let scraped = self.scraped_load.load(Ordering::Relaxed);
        let ended = self.ended_since_scrape.load(Ordering::Relaxed);
        (self.in_flight() as u64).max(scraped.saturating_sub(ended))
    }

    fn show(&self) {
        self.up.set(i64::from(self.available()));
    }

    /// Whether its last health check passed.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// How much longer it is left out after failing requests, if it is.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Requests that reached their first chunk here, and requests that
    /// failed here before it, since the process started.
    pub fn outcomes(&self) -> (u64, u64) {
        (self.succeeded.get(), self.failed.get())
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

impl InFlight {
    /// The endpoint the request runs on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.ended_since_scrape.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight_gauge.dec();
    }
}

/// The endpoints of one model.
pub struct Pool {
    pub name: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    balance: Balance,
    /// Whether its streams are continued on another endpoint when theirs fails.
    pub continue_streams: bool,
    /// Sequences one endpoint runs at once.
    pub capacity: u64,
    /// Jobs of this process running on the pool, counted from their start
    /// (before an endpoint is picked), both lanes.
    running: AtomicUsize,
    /// Interactive requests waiting for room, in weighted fair order.
    waiting: std::sync::Mutex<FairQueue<Waiter>>,
    /// Per class, in `Priority::ALL`'s order (looked up once, not per request).
    waiting_gauge: [prometheus::IntGauge; 3],
    wait_seconds: [prometheus::Histogram; 3],
    next: AtomicUsize,
    /// For `prefix`: where each prefix went, and how many prefixes each endpoint holds.
    affinity: std::sync::Mutex<Affinity>,
}

/// How far above the mean load an endpoint may be and still take its prefixes.
const LOAD_BOUND: f64 = 1.25;
/// Prefixes remembered per pool; past it the table starts over.
const MAX_PREFIXES: usize = 1 << 16;

#[derive(Default)]
struct Affinity {
    home: HashMap<u64, usize>,
    prefixes: Vec<usize>,
}

impl Pool {
    /// The endpoint for the next attempt of a request whose prompt starts
    /// as `prefix` hashes, none of `tried`: an available one by the pool's
    /// balance, else (all out) the one back soonest.
    pub fn pick(&self, prefix: u64, tried: &[usize]) -> Option<usize> {
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
                // Two different endpoints (when there are two).
                let n = candidates.len();
                let a = candidates[turn % n];
                let b = candidates[(turn + 1 + rand::random_range(0..n.max(2) - 1)) % n];
                Some(
                    match self.endpoints[b].in_flight() < self.endpoints[a].in_flight() {
                        true => b,
                        false => a,
                    },
                )
            }
            Balance::Load => candidates
                .iter()
                .copied()
                .min_by_key(|&i| (self.endpoints[i].load(), (i + turn) % candidates.len())),
            Balance::Prefix => self.by_prefix(prefix, &candidates),
        }
    }

    /// The prefix's endpoint, if it is a candidate and not loaded beyond
    /// `LOAD_BOUND` × the mean (+1); else the least-loaded candidate. A new
    /// prefix's endpoint is the one with the fewest prefixes, then the least loaded.
    fn by_prefix(&self, prefix: u64, candidates: &[usize]) -> Option<usize> {
        let loads: Vec<u64> = candidates
            .iter()
            .map(|&i| self.endpoints[i].load())
            .collect();
        let mean = loads.iter().sum::<u64>() as f64 / candidates.len() as f64;
        let least_loaded = candidates
            .iter()
            .zip(&loads)
            .min_by_key(|(_, load)| **load)
            .map(|(&i, _)| i);
        let mut affinity = self
            .affinity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if affinity.prefixes.len() != self.endpoints.len() {
            affinity.prefixes = vec![0; self.endpoints.len()];
        }
        let home = match affinity.home.get(&prefix) {
            Some(&home) if candidates.contains(&home) => home,
            _ => {
                let home = *candidates
                    .iter()
                    .zip(&loads)
                    .min_by_key(|(i, load)| (affinity.prefixes[**i], **load))
                    .map(|(i, _)| i)?;
                if affinity.home.len() >= MAX_PREFIXES {
                    affinity.home.clear();
                    affinity.prefixes.iter_mut().for_each(|n| *n = 0);
                }
                if let Some(old) = affinity.home.insert(prefix, home) {
                    affinity.prefixes[old] -= 1;
                }
                affinity.prefixes[home] += 1;
                return Some(home);
            }
        };
        match self.endpoints[home].load() as f64 > LOAD_BOUND * mean + 1.0 {
            true => least_loaded,
            false => Some(home),
        }
    }

    /// Jobs of this process running on the pool, and interactive requests waiting for room.
    pub fn occupancy(&self) -> (usize, usize) {
        (
            self.running.load(Ordering::Relaxed),
            self.lock_waiting().len(),
        )
    }

    /// Endpoints available now.
    pub fn healthy(&self) -> usize {
        self.endpoints.iter().filter(|e| e.available()).count()
    }

    /// Counts a job of this process on the pool until the guard drops.
    pub fn run(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(Some(self.clone()))
    }

    /// What the pool's available endpoints run at once (one endpoint's
    /// worth when none is available: a request still tries the one back soonest).
    pub fn capacity_now(&self) -> usize {
        self.healthy().max(1) * self.capacity as usize
    }

    fn has_room(&self) -> bool {
        self.running.load(Ordering::Relaxed) < self.capacity_now()
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, FairQueue<Waiter>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place on the pool for an interactive request of `tenant`: at once
    /// when the pool has room and nobody waits, else in weighted fair order
    /// among the tenants waiting. Dropping the future gives the place up.
    pub async fn enter(self: &Arc<Self>, tenant: &str, class: Priority) -> Running {
        let receiver = {
            let mut waiting = self.lock_waiting();
            if waiting.is_empty() && self.has_room() {
                self.wait_seconds[class.index()].observe(0.0);
                return self.run();
            }
            let (sender, receiver) = tokio::sync::oneshot::channel();
            waiting.push(tenant, class.weight(), (class, Instant::now(), sender));
            receiver
        };
        self.waiting_gauge[class.index()].inc();
        self.dispatch();
        match receiver.await {
            Ok(running) => running,
            // The pool went away (the fleet is shutting down): run anyway.
            Err(_) => self.run(),
        }
    }

    /// Starts waiting requests while the pool has room.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let next = {
                let mut waiting = self.lock_waiting();
                if !self.has_room() {
                    return;
                }
                match waiting.pop() {
                    Some(next) => next,
                    None => return,
                }
            };
            let (class, since, sender) = next;
            self.waiting_gauge[class.index()].dec();
            self.wait_seconds[class.index()].observe(since.elapsed().as_secs_f64());
            if let Err(running) = sender.send(self.run()) {
                // Its client left while it waited: the place goes to the next.
                running.give_back();
            }
        }
    }

    /// Whether interactive requests wait for room.
    pub fn has_waiting(&self) -> bool {
        !self.lock_waiting().is_empty()
    }

    /// Whether a batch line may start now: the pool's load (vLLM's running
    /// and waiting requests, or this process's jobs when it knows of more)
    /// leaves more than `headroom` of its available endpoints' capacity.
    pub fn has_batch_room(&self, headroom: f64) -> bool {
        let (endpoints, known) = self
            .endpoints
            .iter()
            .filter(|e| e.available())
            .fold((0u64, 0u64), |(n, load), e| (n + 1, load + e.load()));
        if self.has_waiting() {
            return false;
        }
        let load = known.max(self.running.load(Ordering::Relaxed) as u64);
        let capacity = (endpoints * self.capacity) as f64 * (1.0 - headroom);
        (load + 1) as f64 <= capacity.floor()
    }
}

/// A job of this process running on a pool; its end lets the next waiting
/// request start.
pub struct Running(Option<Arc<Pool>>);

impl Running {
    /// Gives the place back without starting anyone (the caller is already
    /// starting the waiting requests).
    fn give_back(mut self) {
        if let Some(pool) = self.0.take() {
            pool.running.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.running.fetch_sub(1, Ordering::Relaxed);
            pool.dispatch();
        }
    }
}

/// A request waiting for room: its class, since when, and where its place goes.
type Waiter = (Priority, Instant, tokio::sync::oneshot::Sender<Running>);

/// Every pool: one per `[[models]]` entry, and the single pool of
/// `upstream.urls` (named "") for requests of any other model.
pub struct Fleet {
    pools: HashMap<String, Arc<Pool>>,
    pub eject: Duration,
    pub max_eject: Duration,
    pub max_attempts: u32,
}

impl Fleet {
    pub fn new(config: &UpstreamConfig, models: &[ModelConfig], metrics: &FleetMetrics) -> Self {
        let epoch = Instant::now();
        let pool =
            |name: &str, urls: &[Url], balance: Balance, continue_streams: bool, capacity: u32| {
                let label = if name.is_empty() { "*" } else { name };
                let endpoints: Vec<Arc<Endpoint>> = urls
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
                            scraped_load: AtomicU64::new(0),
                            ended_since_scrape: AtomicU64::new(0),
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
                    affinity: Default::default(),
                    endpoints,
                    balance,
                    continue_streams,
                    capacity: u64::from(capacity),
                    running: AtomicUsize::new(0),
                    waiting: Default::default(),
                    waiting_gauge: Priority::ALL
                        .map(|class| metrics.waiting.with_label_values(&[class.name()])),
                    wait_seconds: Priority::ALL
                        .map(|class| metrics.wait_seconds.with_label_values(&[class.name()])),
                    next: AtomicUsize::new(0),
                })
            };
        let mut pools = HashMap::new();
        let capacity = config.capacity.get();
        pools.insert(
            String::new(),
            pool("", &config.urls, config.balance, true, capacity),
        );
        for model in models {
            pools.insert(
                model.name.clone(),
                pool(
                    &model.name,
                    &model.endpoints,
                    model.balance,
                    model.continue_streams,
                    model.capacity.map_or(capacity, NonZeroU32::get),
                ),
            );
        }
        Self {
            pools,
            eject: config.eject,
            max_eject: config.max_eject,
            max_attempts: config.max_attempts.get(),
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
    /// for as long as the fleet lives; for pools balanced by load or prefix,
    /// also reads vLLM's `/metrics`.
    pub fn check_health(self: &Arc<Self>, http: reqwest::Client, interval: Duration) {
        for pool in self.pools.values() {
            let scrape = matches!(pool.balance, Balance::Load | Balance::Prefix);
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
                        let timeout = interval.min(Duration::from_secs(2));
                        let answer = http.get(url).timeout(timeout).send().await;
                        let healthy = answer.is_ok_and(|r| r.status().is_success());
                        if healthy && scrape {
                            let mut url = endpoint.url.clone();
                            let path = format!("{}/metrics", url.path().trim_end_matches('/'));
                            url.set_path(&path);
                            // No page (or not vLLM's): this process's own count
                            // stands alone, rather than a load scraped long ago.
                            let scraped = match http.get(url).timeout(timeout).send().await {
                                Ok(response) if response.status().is_success() => {
                                    response.text().await.map_or(0, |text| vllm_load(&text))
                                }
                                _ => 0,
                            };
                            endpoint.scraped_load.store(scraped, Ordering::Relaxed);
                            endpoint.ended_since_scrape.store(0, Ordering::Relaxed);
                        }
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

/// Requests running and waiting, summed over the models of a vLLM `/metrics` page.
pub fn vllm_load(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("vllm:num_requests_running")
                || line.starts_with("vllm:num_requests_waiting")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        .max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllms_load_from_its_metrics() {
        let page = "# HELP vllm:num_requests_running x\nvllm:num_requests_running{model_name=\"m\"} 3.0\n\
                    vllm:num_requests_waiting{model_name=\"m\"} 2.0\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n";
        assert_eq!(vllm_load(page), 5);
    }

    fn pool(n: usize, balance: Balance) -> Pool {
        let registry =
            crate::observe::metrics::MetricsRegistry::new(crate::observe::metrics::Roles::WORKER);
        let metrics = FleetMetrics::new(&registry);
        let urls: Vec<Url> = (0..n)
            .map(|i| format!("http://replica-{i}:8000").parse().unwrap())
            .collect();
        let config = UpstreamConfig {
            urls,
            balance,
            ..UpstreamConfig::default()
        };
        let fleet = Fleet::new(&config, &[], &metrics);
        Arc::try_unwrap(fleet.pools.into_values().next().unwrap())
            .ok()
            .unwrap()
    }

    #[test]
    fn a_prefix_stays_on_its_endpoint_until_that_one_is_too_busy() {
        let pool = pool(4, Balance::Prefix);
        let home = pool.pick(42, &[]).unwrap();
        assert!((0..20).all(|_| pool.pick(42, &[]) == Some(home)));
        // New prefixes split evenly over the endpoints (42 is one of them).
        let mut per_endpoint = [0; 4];
        per_endpoint[home] += 1;
        for p in 1..20u64 {
            per_endpoint[pool.pick(p * 1000, &[]).unwrap()] += 1;
        }
        assert_eq!(per_endpoint, [5, 5, 5, 5]);
        // Loaded beyond the bound, its requests go elsewhere; the prefix stays.
        let busy: Vec<InFlight> = (0..6).map(|_| pool.endpoints[home].start()).collect();
        assert_ne!(pool.pick(42, &[]), Some(home));
        drop(busy);
        assert_eq!(pool.pick(42, &[]), Some(home));
        let _busy: Vec<InFlight> = (0..6).map(|_| pool.endpoints[home].start()).collect();
        // A tried endpoint is never picked again.
        let other = pool.pick(42, &[]).unwrap();
        assert_ne!(pool.pick(42, &[other]), Some(other));
    }

    #[test]
    fn least_outstanding_avoids_the_busy_endpoint() {
        let pool = pool(2, Balance::LeastOutstanding);
        let _busy: Vec<InFlight> = (0..5).map(|_| pool.endpoints[0].start()).collect();
        assert!((0..20).all(|_| pool.pick(0, &[]) == Some(1)));
        let load = self::pool(3, Balance::Load);
        load.endpoints[0].scraped_load.store(7, Ordering::Relaxed);
        load.endpoints[1].scraped_load.store(2, Ordering::Relaxed);
        load.endpoints[2].scraped_load.store(4, Ordering::Relaxed);
        assert!((0..10).all(|_| load.pick(0, &[]) == Some(1)));
    }
}
