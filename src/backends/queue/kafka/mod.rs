//! The Kafka queue (rdkafka): edges and workers on any number of machines,
//! talking over a request topic, a response topic (one reply partition per
//! edge) and a cancel topic. The protocol (topics, headers, frames, versions,
//! delivery rules) is described in one place, `docs/design.md` ("The Kafka
//! protocol"); `edge` and `worker` implement its two sides, `frames`
//! its payload, `reconnect` the sessions rebuilt after a lost broker.

mod config;
mod edge;
mod frames;
mod live_workers;
mod reconnect;
mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use reconnect::{BrokerLoss, Consumer as WatchedConsumer, Producer, Watched};

use super::QueueError;

pub use config::KafkaConfig;
pub use edge::{KafkaQueue, ReconnectingQueue};
pub use reconnect::Reconnecting;
pub use worker::{KafkaJobSource, ReconnectingJobSource};

const H_KIND: &str = "sluice-kind";
const H_REQUEST: &str = "sluice-request";
const H_EDGE: &str = "sluice-edge";
const H_REPLY_PARTITION: &str = "sluice-reply-partition";
const H_ATTEMPT: &str = "sluice-attempt";
const H_SUBMITTED: &str = "sluice-submitted-ms";
/// The upstream path of a request; absent means `/v1/completions`.
const H_ROUTE: &str = "sluice-route";
/// The model whose endpoints serve a request; absent means the single pool.
const H_MODEL: &str = "sluice-model";
/// A hash of the prompt's start (hex), for prefix-affine routing.
const H_PREFIX: &str = "sluice-prefix";
/// `1` when the client gets nothing before the whole answer (absent: it streams).
const H_BUFFERED: &str = "sluice-buffered";
/// The body's `content-type` when it is not JSON (a multipart upload); absent means JSON.
const H_CONTENT_TYPE: &str = "sluice-content-type";
/// The stored response a request must run beside (`QueuedRequest::pinned_to`).
const H_PINNED_TO: &str = "sluice-pinned-to";
/// The id a request's answer is stored under (`QueuedRequest::stores`).
const H_STORES: &str = "sluice-stores";
const H_WORKER: &str = "sluice-worker";
/// `batch` on a batch line (absent: interactive): it is never expired for
/// its time in the queue, since the batch runner paces what it submits.
const H_LANE: &str = "sluice-lane";
/// Whose share of a full pool a request takes (`QueuedRequest::tenant`).
const H_TENANT: &str = "sluice-tenant";
/// Its priority class (`high`, `low`; absent: normal).
const H_PRIORITY: &str = "sluice-priority";
/// The queue protocol's version, on every message: what the message's
/// headers and frames mean. Absent means 1 (the version before it was sent).
const H_PROTOCOL: &str = "sluice-protocol";
/// Trace-context headers carried through unchanged.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The version of the queue protocol this build speaks (see `H_PROTOCOL`).
/// A worker answers a request in the request's version; edges and workers
/// skip, log and count (`sluice_queue_messages_skipped_total{reason="version"}`)
/// messages of a version they do not speak.
pub const PROTOCOL_VERSION: u32 = 1;
/// The version as the header carries it.
const PROTOCOL_VERSION_TEXT: &str = "1";

const KIND_REQUEST: &str = "request";
const KIND_CANCEL: &str = "cancel";
/// An edge's sign of life on the cancel topic: workers cancel the requests
/// of an edge silent for `queue.worker_timeout_ms` (it died; nobody reads
/// their answers).
const KIND_EDGE_ALIVE: &str = "edge-alive";
/// A response message: a batch of [`frames`].
const KIND_FRAMES: &str = "frames";
/// A worker's sign of life on the cancel topic, every `queue.heartbeat_ms`,
/// naming the models it serves: an edge answers 503 at once for a model no
/// live worker serves, instead of waiting out every attempt.
const KIND_WORKER_ALIVE: &str = "worker-alive";
/// The models a worker serves, comma-separated; `*` for every model (one pool).
const H_MODELS: &str = "sluice-models";
/// How long startup waits for the brokers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Client configuration and topics
// ---------------------------------------------------------------------------

/// A client's settings: the brokers, sluice's `defaults` for this kind of
/// client, then the configured `overrides` (`[queue.producer]` or `[queue.consumer]`).
pub fn client_config(
    kafka: &KafkaConfig,
    defaults: &[(&str, &str)],
    overrides: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    // librdkafka leaves Nagle's algorithm on by default; a chunk must not wait for it.
    config.set("socket.nagle.disable", "true");
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in overrides {
        config.set(key, value);
    }
    config
}

/// The settings of sluice's producers (edges' and workers' alike).
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    client_config(
        kafka,
        &[
            ("linger.ms", "1"),
            ("enable.idempotence", "true"),
            ("message.timeout.ms", "30000"),
        ],
        &kafka.producer,
    )
}

fn producer(kafka: &KafkaConfig, loss: &Arc<BrokerLoss>) -> Result<Producer, QueueError> {
    producer_config(kafka)
        .create_with_context(Watched(loss.clone()))
        .map_err(|e| unavailable(kafka, e))
}

fn unavailable(kafka: &KafkaConfig, err: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(format!("Kafka at kafka://{}: {err}", kafka.brokers))
}

/// The three topics as sluice creates them: with `retention.ms` set to
/// `retention` (a message is worthless seconds after its request ends; the
/// broker's default keeps it for a week).
fn new_topics<'a>(kafka: &'a KafkaConfig, retention: &'a str) -> [NewTopic<'a>; 3] {
    [
        (&kafka.request_topic, kafka.partitions),
        (&kafka.response_topic, kafka.partitions),
        (&kafka.cancel_topic, 1),
    ]
    .map(|(name, partitions)| {
        let replication = TopicReplication::Fixed(kafka.replication_factor);
        NewTopic::new(name, partitions, replication).set("retention.ms", retention)
    })
}

/// Creates the three topics when missing; returns the response topic's partition count.
async fn ensure_topics(kafka: &KafkaConfig) -> Result<i32, QueueError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, &[], &BTreeMap::new())
        .create()
        .map_err(|e| unavailable(kafka, e))?;
    let retention = kafka.retention.as_millis().to_string();
    let topics = new_topics(kafka, &retention);
    let options = AdminOptions::new()
        .request_timeout(Some(CONNECT_TIMEOUT))
        .operation_timeout(Some(CONNECT_TIMEOUT));
    let results = tokio::time::timeout(CONNECT_TIMEOUT, admin.create_topics(&topics, &options))
        .await
        .map_err(|_| unavailable(kafka, format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unavailable(kafka, e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(unavailable(
                    kafka,
                    format!("cannot create topic {topic}: {code}"),
                ));
            }
        }
    }
    partition_count(kafka, &kafka.response_topic).await
}

/// Whether the brokers answer a metadata request for `topic` through an
/// existing client (no new connection per check).
async fn reachable(
    producer: &Producer,
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<(), QueueError> {
    let (producer, topic, kafka) = (producer.clone(), topic.to_string(), kafka.clone());
    tokio::task::spawn_blocking(move || {
        let metadata = rdkafka::producer::Producer::client(&producer)
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .map_err(|e| unavailable(&kafka, e))?;
        match metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && !t.partitions().is_empty())
        {
            true => Ok(()),
            false => Err(unavailable(
                &kafka,
                format!("topic {topic} has no partitions"),
            )),
        }
    })
    .await
    .map_err(|e| QueueError::Unavailable(e.to_string()))?
}

async fn partition_count(kafka: &KafkaConfig, topic: &str) -> Result<i32, QueueError> {
    let consumer: StreamConsumer =
        client_config(kafka, &[("group.id", "sluice-metadata")], &BTreeMap::new())
            .create()
            .map_err(|e| unavailable(kafka, e))?;
    let topic = topic.to_string();
    let kafka_for_err = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map_err(|e| unavailable(&kafka_for_err, e))?;
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len());
            if partitions > 0 {
                return Ok(partitions as i32);
            }
            if std::time::Instant::now() > deadline {
                return Err(unavailable(
                    &kafka_for_err,
                    format!("topic {topic} has no partitions"),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .map_err(|e| QueueError::Unavailable(e.to_string()))?
}

/// A consumer reading `topic` partitions from their current end, without a
/// consumer group. `settings` are applied last (after the configured ones).
async fn tail_consumer(
    kafka: &KafkaConfig,
    loss: &Arc<BrokerLoss>,
    group: &str,
    topic: &str,
    partitions: Vec<i32>,
    settings: &[(&str, &str)],
) -> Result<WatchedConsumer, QueueError> {
    let mut config = client_config(
        kafka,
        &[
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
        ],
        &kafka.consumer,
    );
    for (key, value) in settings {
        config.set(*key, *value);
    }
    let consumer: WatchedConsumer = config
        .create_with_context(Watched(loss.clone()))
        .map_err(|e| unavailable(kafka, e))?;
    let consumer = Arc::new(consumer);
    let blocking = consumer.clone();
    let topic_name = topic.to_string();
    let kafka_for_err = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let (_, high) = blocking
                .fetch_watermarks(&topic_name, partition, CONNECT_TIMEOUT)
                .map_err(|e| unavailable(&kafka_for_err, e))?;
            assignment
                .add_partition_offset(&topic_name, partition, Offset::Offset(high))
                .map_err(|e| unavailable(&kafka_for_err, e))?;
        }
        blocking
            .assign(&assignment)
            .map_err(|e| unavailable(&kafka_for_err, e))
    })
    .await
    .map_err(|e| QueueError::Unavailable(e.to_string()))??;
    Arc::try_unwrap(consumer).map_err(|_| QueueError::Unavailable("consumer still shared".into()))
}

// ---------------------------------------------------------------------------
// Message headers
// ---------------------------------------------------------------------------

/// A message's headers: `pairs`, and the protocol version.
fn headers(pairs: &[(&str, &str)]) -> OwnedHeaders {
    let versioned = OwnedHeaders::new_with_capacity(pairs.len() + 1).insert(Header {
        key: H_PROTOCOL,
        value: Some(PROTOCOL_VERSION_TEXT.as_bytes()),
    });
    pairs.iter().fold(versioned, |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    })
}

/// Whether this build speaks the protocol version of a received message.
/// One it does not is logged, once per version; the caller counts it as
/// skipped (`reason="version"`).
struct VersionCheck {
    topic: String,
    reported: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl VersionCheck {
    fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_string(),
            reported: Default::default(),
        }
    }

    fn speaks(&self, headers: &ReadHeaders<'_>) -> bool {
        let version = headers.str(H_PROTOCOL).unwrap_or(PROTOCOL_VERSION_TEXT);
        if version == PROTOCOL_VERSION_TEXT {
            return true;
        }
        let first = self
            .reported
            .lock()
            .map(|mut seen| seen.insert(version.to_string()))
            .unwrap_or(false);
        if first {
            tracing::warn!(
                topic = %self.topic,
                version,
                speaks = PROTOCOL_VERSION,
                "skipping queue messages of a protocol version this sluice does not speak; upgrade the workers before the edges"
            );
        }
        false
    }
}

/// The headers of a received message, by name.
struct ReadHeaders<'a>(Vec<(&'a str, &'a [u8])>);

impl<'a> ReadHeaders<'a> {
    fn of(message: &'a impl Message) -> Self {
        Self(
            message
                .headers()
                .map(|h| {
                    h.iter()
                        .filter_map(|h| h.value.map(|v| (h.key, v)))
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    fn str(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .find(|(key, _)| *key == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn num<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.str(name).and_then(|v| v.parse().ok())
    }

    fn trace_context(&self) -> Vec<(String, String)> {
        TRACE_HEADERS
            .iter()
            .filter_map(|name| self.str(name).map(|v| (name.to_string(), v.to_string())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_created_with_a_short_retention() {
        let section = crate::backends::queue::QueueSection {
            url: "kafka://k:9092".into(),
            retention: Duration::from_secs(120),
            ..Default::default()
        };
        let crate::backends::queue::QueueBackend::Kafka(kafka) =
            section.validate().unwrap().backend
        else {
            panic!("not kafka")
        };
        let retention = kafka.retention.as_millis().to_string();
        for topic in new_topics(&kafka, &retention) {
            assert_eq!(topic.config, [("retention.ms", "120000")], "{}", topic.name);
        }
    }
}
