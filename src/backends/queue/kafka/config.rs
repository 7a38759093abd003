//! The Kafka queue's settings, checked by librdkafka's rules: topic names,
//! partitions, and `[queue.producer]` / `[queue.consumer]` settings as the
//! strings librdkafka takes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backends::queue::QueueSection;
use crate::settings::Invalid;

/// The smallest outbox a worker may have per edge.
const MIN_OUTBOX_BYTES: usize = 4096;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub request_topic: String,
    pub response_topic: String,
    pub cancel_topic: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub edge_id: String,
    pub reply_partition: Option<i32>,
    pub worker_group: String,
    pub max_outbox_bytes: usize,
    /// The `retention.ms` of topics sluice creates.
    pub retention: Duration,
    /// The models this process's worker serves, as it announces them: the
    /// `[[models]]` names, or `*` (every model, one pool). Set from the fleet's
    /// sections when the whole config is checked.
    pub worker_models: Vec<String>,
    /// Largest response message the producer sends (its `message.max.bytes`).
    pub max_message_bytes: usize,
    pub producer: BTreeMap<String, String>,
    pub consumer: BTreeMap<String, String>,
}

impl KafkaConfig {
    pub(crate) fn from_section(q: &QueueSection) -> Result<Self, Invalid> {
        let brokers = q
            .url
            .trim_start_matches("kafka://")
            .trim_end_matches('/')
            .to_string();
        if brokers.is_empty() {
            return Err(Invalid::new(
                "queue.url",
                "kafka:// needs at least one HOST:PORT",
            ));
        }
        for (key, topic) in [
            ("queue.request_topic", &q.request_topic),
            ("queue.response_topic", &q.response_topic),
            ("queue.cancel_topic", &q.cancel_topic),
        ] {
            if topic.is_empty()
                || !topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(Invalid::new(
                    key,
                    format!("`{topic}` is not a valid Kafka topic name"),
                ));
            }
        }
        if q.partitions < 1 {
            return Err(Invalid::new("queue.partitions", "must be at least 1"));
        }
        let reply_partition = match q.reply_partition {
            -1 => None,
            p if p >= 0 && p < q.partitions => Some(p),
            p => {
                return Err(Invalid::new(
                    "queue.reply_partition",
                    format!(
                        "{p} is outside the response topic's 0..{} partitions",
                        q.partitions
                    ),
                ));
            }
        };
        let producer = settings("queue.producer", &q.producer)?;
        // librdkafka's own default; the broker's limit may be lower.
        let max_message_bytes = match producer.get("message.max.bytes") {
            None => 1_000_000,
            Some(value) => value.parse().map_err(|_| {
                Invalid::new(
                    "queue.producer.message.max.bytes",
                    format!("`{value}` is not a number of bytes"),
                )
            })?,
        };
        // A request may wait out every attempt before a worker takes it.
        let waits = q.queue_timeout.saturating_mul(q.max_attempts.get());
        if q.retention <= waits {
            return Err(Invalid::new(
                "queue.retention_ms",
                format!(
                    "{} ms is not longer than queue.queue_timeout_ms × queue.max_attempts ({} ms): requests would be deleted while they wait",
                    q.retention.as_millis(),
                    waits.as_millis()
                ),
            ));
        }
        if q.max_outbox_bytes < MIN_OUTBOX_BYTES {
            return Err(Invalid::new(
                "queue.max_outbox_bytes",
                format!("must be at least {MIN_OUTBOX_BYTES}"),
            ));
        }
        Ok(Self {
            brokers,
            max_outbox_bytes: q.max_outbox_bytes,
            retention: q.retention,
            worker_models: vec!["*".to_string()],
            max_message_bytes,
            partitions: q.partitions,
            replication_factor: q.replication_factor.max(1),
            edge_id: if q.edge_id.is_empty() {
                format!("edge-{}", uuid::Uuid::new_v4().simple())
            } else {
                q.edge_id.clone()
            },
            reply_partition,
            producer,
            consumer: settings("queue.consumer", &q.consumer)?,
            request_topic: q.request_topic.clone(),
            response_topic: q.response_topic.clone(),
            cancel_topic: q.cancel_topic.clone(),
            worker_group: q.worker_group.clone(),
        })
    }
}

/// librdkafka settings are strings; TOML may give numbers and booleans.
fn settings(
    key: &str,
    settings: &BTreeMap<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, Invalid> {
    settings
        .iter()
        .map(|(name, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(Invalid::new(
                        format!("{key}.{name}"),
                        "librdkafka settings are strings, numbers or booleans",
                    ));
                }
            };
            Ok((name.clone(), text))
        })
        .collect()
}
