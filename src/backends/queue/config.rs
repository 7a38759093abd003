//! `[queue]`: in-process channels or Kafka, and the waits that decide when a
//! request's worker is presumed lost. The Kafka settings are checked in
//! [`super::kafka::KafkaConfig`].

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::Deserialize;

use super::kafka::KafkaConfig;
use crate::settings::{Invalid, positive_millis, redact_url, scheme};

/// The `[queue]` section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// `memory://` (in-process channels) or `kafka://HOST:PORT[,HOST:PORT...]`.
    pub url: String,
    /// In-process queue: requests waiting for a worker before submitters wait.
    pub capacity: NonZeroUsize,
    /// Longest a request may wait for a worker to pick it up.
    #[serde(rename = "queue_timeout_ms", deserialize_with = "positive_millis")]
    pub queue_timeout: Duration,
    /// Longest a picked-up request may go without any sign of life from its worker.
    #[serde(rename = "worker_timeout_ms", deserialize_with = "positive_millis")]
    pub worker_timeout: Duration,
    /// How often a worker signals life on a request that produces no chunks.
    #[serde(rename = "heartbeat_ms", deserialize_with = "positive_millis")]
    pub heartbeat: Duration,
    /// Attempts for a request whose worker was lost before it sent anything.
    pub max_attempts: NonZeroU32,
    pub request_topic: String,
    pub response_topic: String,
    pub cancel_topic: String,
    /// Partitions of topics created at startup.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Identity of this edge on the response topic; empty means a random id per process.
    pub edge_id: String,
    /// Response-topic partition this edge reads; -1 derives it from the edge id.
    pub reply_partition: i32,
    /// Consumer group of the workers.
    pub worker_group: String,
    /// `retention.ms` of the topics sluice creates (not of topics that
    /// exist already): long enough for a request to wait out its attempts.
    #[serde(rename = "retention_ms", deserialize_with = "positive_millis")]
    pub retention: Duration,
    /// Response bytes a worker holds per edge while the broker is behind;
    /// beyond it the worker stops reading from vLLM until the broker catches up.
    pub max_outbox_bytes: usize,
    /// librdkafka settings for every producer (`"linger.ms" = 1`).
    pub producer: BTreeMap<String, serde_json::Value>,
    /// librdkafka settings for every consumer (`"fetch.wait.max.ms" = 5`).
    pub consumer: BTreeMap<String, serde_json::Value>,
}

impl Default for QueueSection {
    fn default() -> Self {
        Self {
            url: "memory://".into(),
            capacity: const { NonZeroUsize::new(1024).expect("not zero") },
            queue_timeout: Duration::from_secs(30),
            worker_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            max_attempts: const { NonZeroU32::new(3).expect("not zero") },
            request_topic: "sluice.requests".into(),
            response_topic: "sluice.responses".into(),
            cancel_topic: "sluice.cancels".into(),
            partitions: 16,
            replication_factor: 1,
            edge_id: String::new(),
            reply_partition: -1,
            worker_group: "sluice-workers".into(),
            retention: Duration::from_secs(600),
            max_outbox_bytes: 1 << 20,
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        }
    }
}

/// The queue, checked.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub backend: QueueBackend,
    pub queue_timeout: Duration,
    pub worker_timeout: Duration,
    pub heartbeat: Duration,
    pub max_attempts: NonZeroU32,
}

#[derive(Debug, Clone)]
pub enum QueueBackend {
    Memory { capacity: NonZeroUsize },
    Kafka(Box<KafkaConfig>),
}

impl QueueSection {
    pub fn validate(self) -> Result<QueueConfig, Invalid> {
        if self.heartbeat >= self.worker_timeout {
            return Err(Invalid::new(
                "queue.heartbeat_ms",
                "must be shorter than queue.worker_timeout_ms, or live workers would be presumed lost",
            ));
        }
        let backend = match scheme(&self.url) {
            Some("memory") => QueueBackend::Memory {
                capacity: self.capacity,
            },
            Some("kafka") => QueueBackend::Kafka(Box::new(KafkaConfig::from_section(&self)?)),
            _ => {
                return Err(Invalid::new(
                    "queue.url",
                    format!(
                        "`{}` must be memory:// or kafka://HOST:PORT[,HOST:PORT]",
                        redact_url(&self.url)
                    ),
                ));
            }
        };
        Ok(QueueConfig {
            backend,
            queue_timeout: self.queue_timeout,
            worker_timeout: self.worker_timeout,
            heartbeat: self.heartbeat,
            max_attempts: self.max_attempts,
        })
    }
}
