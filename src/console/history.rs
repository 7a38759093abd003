//! The overview's live figures: every few seconds, the gateway's own
//! counters (the families `/metrics` exposes) are read and turned into
//! rates for the interval: requests per second, time to first token p50
//! and p99, error rate, cache hit ratio, tokens per second. The last hour
//! is kept in memory, a bounded ring; nothing is stored, so a restart
//! starts an empty chart. Nothing here runs on the request path.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::proto::MetricFamily;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::MetricsRegistry;

/// Seconds between samples.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: an hour's worth.
pub const KEPT: usize = 720;

/// One interval's figures (`None`: nothing to compute it from).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// Unix seconds at the end of the interval.
    pub t: i64,
    pub requests_per_s: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// Share of requests answered 5xx.
    pub error_rate: Option<f64>,
    /// Share of cache lookups that hit.
    pub cache_hit_ratio: Option<f64>,
    pub tokens_per_s: f64,
}

/// The counters' totals at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    requests: f64,
    errors: f64,
    hits: f64,
    lookups: f64,
    tokens: f64,
    /// Time to first token: (upper bound, cumulative count), ascending.
    ttft: Vec<(f64, f64)>,
}

#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl History {
    /// Samples `registry` every [`INTERVAL`] until `stop`.
    pub fn start(registry: Arc<MetricsRegistry>, stop: CancellationToken) -> Arc<Self> {
        let history = Arc::new(Self::default());
        let sampler = history.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(INTERVAL);
            let mut last: Option<(Instant, Totals)> = None;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = stop.cancelled() => return,
                }
                let now = Instant::now();
                let totals = totals(&registry.gather());
                if let Some((then, previous)) = &last {
                    let seconds = now.duration_since(*then).as_secs_f64();
                    sampler.push(sample(
                        previous,
                        &totals,
                        seconds,
                        chrono::Utc::now().timestamp(),
                    ));
                }
                last = Some((now, totals));
            }
        });
        history
    }

    fn push(&self, sample: Sample) {
        let mut samples = lock(&self.samples);
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).iter().cloned().collect()
    }
}

fn label<'a>(metric: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    metric
        .label
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

fn totals(families: &[MetricFamily]) -> Totals {
    let mut totals = Totals::default();
    for family in families {
        let metrics = &family.metric;
        match family.name() {
            "sluice_requests_total" => {
                for m in metrics {
                    let value = m.counter.value();
                    totals.requests += value;
                    if label(m, "status") == "5xx" {
                        totals.errors += value;
                    }
                }
            }
            "sluice_cache_lookups_total" => {
                for m in metrics {
                    let value = m.counter.value();
                    match label(m, "result") {
                        "hit" => {
                            totals.hits += value;
                            totals.lookups += value;
                        }
                        "miss" => totals.lookups += value,
                        _ => {}
                    }
                }
            }
            "sluice_prompt_tokens_total" | "sluice_completion_tokens_total" => {
                totals.tokens += metrics.iter().map(|m| m.counter.value()).sum::<f64>();
            }
            "sluice_time_to_first_token_seconds" => {
                for m in metrics {
                    let buckets = &m.histogram.bucket;
                    if totals.ttft.is_empty() {
                        totals.ttft = buckets.iter().map(|b| (b.upper_bound(), 0.0)).collect();
                    }
                    for (sum, bucket) in totals.ttft.iter_mut().zip(buckets) {
                        sum.1 += bucket.cumulative_count() as f64;
                    }
                }
            }
            _ => {}
        }
    }
    totals
}

/// The `q` quantile of the observations between two cumulative histograms,
/// interpolated linearly within its bucket, in milliseconds.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .enumerate()
        .map(|(i, (bound, count))| (*bound, count - before.get(i).map_or(0.0, |b| b.1)))
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, cumulative) in counts {
        if cumulative >= rank {
            let within = cumulative - lower.1;
            let share = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some((lower.0 + (bound - lower.0) * share) * 1000.0);
        }
        lower = (bound, cumulative);
    }
    // Past the largest bound: the largest bound is all that is known.
    Some(lower.0 * 1000.0)
}

fn sample(before: &Totals, after: &Totals, seconds: f64, t: i64) -> Sample {
    let delta = |a: f64, b: f64| (a - b).max(0.0);
    let requests = delta(after.requests, before.requests);
    let lookups = delta(after.lookups, before.lookups);
    Sample {
        t,
        requests_per_s: requests / seconds,
        ttft_p50_ms: quantile(&before.ttft, &after.ttft, 0.5),
        ttft_p99_ms: quantile(&before.ttft, &after.ttft, 0.99),
        error_rate: (requests > 0.0).then(|| delta(after.errors, before.errors) / requests),
        cache_hit_ratio: (lookups > 0.0).then(|| delta(after.hits, before.hits) / lookups),
        tokens_per_s: delta(after.tokens, before.tokens) / seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_quantiles_come_from_the_interval_alone() {
        let before = Totals {
            requests: 100.0,
            errors: 10.0,
            hits: 5.0,
            lookups: 10.0,
            tokens: 1000.0,
            ttft: vec![(0.01, 50.0), (0.1, 100.0), (1.0, 100.0)],
        };
        // 100 more requests in 10 s: 90 under 10 ms, 10 between 100 ms and 1 s.
        let after = Totals {
            requests: 200.0,
            errors: 15.0,
            hits: 35.0,
            lookups: 50.0,
            tokens: 3000.0,
            ttft: vec![(0.01, 140.0), (0.1, 190.0), (1.0, 200.0)],
        };
        let s = sample(&before, &after, 10.0, 0);
        assert_eq!(s.requests_per_s, 10.0);
        assert_eq!(s.error_rate, Some(0.05));
        assert_eq!(s.cache_hit_ratio, Some(0.75));
        assert_eq!(s.tokens_per_s, 200.0);
        let p50 = s.ttft_p50_ms.unwrap();
        assert!(p50 > 0.0 && p50 <= 10.0, "{p50}");
        let p99 = s.ttft_p99_ms.unwrap();
        assert!(p99 > 100.0 && p99 <= 1000.0, "{p99}");
        // An idle interval: no rates to divide.
        let idle = sample(&after, &after, 5.0, 0);
        assert_eq!((idle.error_rate, idle.ttft_p50_ms), (None, None));
    }
}
