//! The Prometheus registry every subsystem registers its own metric families
//! on (one registry per gateway instance: tests run several in one process),
//! and which families a process exposes: an edge's, a worker's, or both.
//! Names and units follow Prometheus conventions, and every label has a
//! small, bounded set of values.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 0.5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Per-token and per-call buckets from 1 µs to 1 s.
pub const FINE_BUCKETS: &[f64] = &[
    0.000_001, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Which metrics a process exposes: an edge's, a worker's, or both (an edge
/// with its worker in process). Every family exists either way; only those
/// of the process's roles are registered, so a standalone worker's
/// `/metrics` shows only what a worker measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub edge: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Self = Self {
        edge: true,
        worker: true,
    };
    pub const EDGE: Self = Self {
        edge: true,
        worker: false,
    };
    pub const WORKER: Self = Self {
        edge: false,
        worker: true,
    };

    fn overlaps(self, other: Roles) -> bool {
        (self.edge && other.edge) || (self.worker && other.worker)
    }
}

/// A process's registry. Subsystems make their families with its
/// constructors, naming the roles that measure them.
pub struct MetricsRegistry {
    registry: Registry,
    roles: Roles,
    /// `sluice_backend_up`: set by whoever checks a backend (the gateway, the limiter, the cache).
    pub backend_up: IntGaugeVec,
}

impl MetricsRegistry {
    /// The registry of a process with `roles`, with the standard `process_*`
    /// metrics (CPU, memory, open file descriptors, start time).
    pub fn new(roles: Roles) -> Self {
        let registry = Registry::new();
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let backend_up = IntGaugeVec::new(
            Opts::new(
                "sluice_backend_up",
                "1 when the backend (store, cache, queue, limits) answered its last check",
            ),
            &["backend"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(backend_up.clone()))
            .expect("registered once");
        Self {
            registry,
            roles,
            backend_up,
        }
    }

    pub fn roles(&self) -> Roles {
        self.roles
    }

    /// Registers `metric` if the process has one of the roles `of`.
    pub fn add<M: Collector + Clone + 'static>(&self, of: Roles, metric: M) -> M {
        if of.overlaps(self.roles) {
            self.registry
                .register(Box::new(metric.clone()))
                .expect("each metric family is registered once");
        }
        metric
    }

    pub fn counter_vec(&self, of: Roles, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(
            of,
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
        )
    }

    pub fn counter(&self, of: Roles, name: &str, help: &str) -> IntCounter {
        self.add(of, IntCounter::new(name, help).expect("valid metric"))
    }

    pub fn histogram_vec(
        &self,
        of: Roles,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(of, HistogramVec::new(opts, labels).expect("valid metric"))
    }

    pub fn histogram(&self, of: Roles, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(of, Histogram::with_opts(opts).expect("valid metric"))
    }

    pub fn gauge(&self, of: Roles, name: &str, help: &str) -> IntGauge {
        self.add(of, IntGauge::new(name, help).expect("valid metric"))
    }

    pub fn gauge_vec(&self, of: Roles, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(
            of,
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
        )
    }

    /// Every registered family's current values (the console samples them).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every registered family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new(Roles::ALL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_exposes_its_own_metrics_and_the_process_metrics() {
        let worker = MetricsRegistry::new(Roles::WORKER);
        let inflight = worker.gauge(Roles::WORKER, "sluice_worker_inflight_requests", "-");
        let requests = worker.counter_vec(Roles::EDGE, "sluice_requests_total", "-", &["r"]);
        inflight.set(1);
        requests.with_label_values(&["x"]).inc();
        let text = worker.render();
        assert!(text.contains("sluice_worker_inflight_requests 1"), "{text}");
        assert!(!text.contains("sluice_requests_total"), "{text}");
        assert!(text.contains("process_open_fds"), "{text}");
        assert!(text.contains("process_start_time_seconds"), "{text}");

        let edge = MetricsRegistry::new(Roles::EDGE);
        let requests = edge.counter_vec(Roles::EDGE, "sluice_requests_total", "-", &["r"]);
        requests.with_label_values(&["x"]).inc();
        let _ = edge.gauge(Roles::WORKER, "sluice_worker_inflight_requests", "-");
        let text = edge.render();
        assert!(text.contains("sluice_requests_total"), "{text}");
        assert!(!text.contains("sluice_worker_inflight_requests"), "{text}");
    }
}
