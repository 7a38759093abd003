//! The queue's metric families, on both sides: edges submit and read
//! responses, workers hold outboxes and keep their consumer group honest.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use crate::observe::metrics::{LATENCY_BUCKETS, MetricsRegistry, Roles};

pub struct QueueMetrics {
    pub first_chunk: Histogram,
    pub produce: Histogram,
    pub consume_delay: Histogram,
    pub messages_skipped: IntCounterVec,
    pub retries: IntCounter,
    pub orphans_cancelled: IntCounter,
    pub outbox_bytes: IntGauge,
    pub outbox_full: IntCounter,
    pub frames_too_large: IntCounter,
    pub group_rejoins: IntCounter,
    pub assigned_partitions: IntGauge,
    /// The registry's `sluice_backend_up` (reported as `queue`).
    pub backend_up: IntGaugeVec,
}

/// Why a queue message is skipped (the `reason` label).
const SKIP_REASONS: [&str; 5] = ["malformed", "stale", "expired", "cancelled", "version"];

impl QueueMetrics {
    /// The families; the skipped-message series of `topics` (Kafka's, when
    /// it is the queue) at 0.
    pub fn new(registry: &MetricsRegistry, topics: &[&str]) -> Self {
        let metrics = Self::families(registry);
        for topic in topics {
            for reason in SKIP_REASONS {
                metrics.messages_skipped.with_label_values(&[topic, reason]);
            }
        }
        metrics
    }

    fn families(registry: &MetricsRegistry) -> Self {
        Self {
            first_chunk: registry.histogram(
                Roles::EDGE,
                "sluice_queue_first_chunk_seconds",
                "Time from queue submission to the first chunk back from a worker",
                LATENCY_BUCKETS,
            ),
            produce: registry.histogram(
                Roles::ALL,
                "sluice_queue_produce_seconds",
                "Time to hand one message to the queue (Kafka: until acknowledged)",
                LATENCY_BUCKETS,
            ),
            consume_delay: registry.histogram(
                Roles::ALL,
                "sluice_queue_consume_delay_seconds",
                "Age of a queue message when consumed",
                LATENCY_BUCKETS,
            ),
            messages_skipped: registry.counter_vec(
                Roles::ALL,
                "sluice_queue_messages_skipped_total",
                "Queue messages skipped, by reason: malformed, stale, expired, cancelled, or version (a protocol version this build does not speak)",
                &["topic", "reason"],
            ),
            retries: registry.counter(
                Roles::EDGE,
                "sluice_queue_retries_total",
                "Requests resubmitted after their worker was lost before sending anything",
            ),
            orphans_cancelled: registry.counter(
                Roles::WORKER,
                "sluice_queue_orphans_cancelled_total",
                "Requests a worker cancelled because their edge went silent (died) for queue.worker_timeout_ms",
            ),
            outbox_bytes: registry.gauge(
                Roles::WORKER,
                "sluice_queue_outbox_bytes",
                "Response bytes a worker holds for edges, not yet handed to the broker",
            ),
            outbox_full: registry.counter(
                Roles::WORKER,
                "sluice_queue_outbox_full_total",
                "Times a job stopped reading from vLLM because its edge's outbox was full (queue.max_outbox_bytes): the broker is behind",
            ),
            frames_too_large: registry.counter(
                Roles::WORKER,
                "sluice_queue_frames_too_large_total",
                "Response chunks larger than the broker accepts in one message; their requests end with an error",
            ),
            group_rejoins: registry.counter(
                Roles::WORKER,
                "sluice_queue_group_rejoins_total",
                "Times a worker left and rejoined its consumer group because the group, though stable, left request partitions unread",
            ),
            assigned_partitions: registry.gauge(
                Roles::WORKER,
                "sluice_queue_assigned_partitions",
                "Request-topic partitions the consumer group assigns this worker (checked every 3 s); their sum over the workers should equal the topic's partitions",
            ),
            backend_up: registry.backend_up.clone(),
        }
    }
}
