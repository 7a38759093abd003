//! The Kafka broker baselines: chunk bursts, and a replay of sluice's own response traffic, each through a bare rdkafka producer and consumer.

use super::*;

/// Messages for a bare producer to send: when (from the start) and what.
pub(crate) struct Schedule {
    pub(crate) name: String,
    /// Single-message batches the partition holds before the measured messages
    /// (tansu's memory storage lists every stored batch on each fetch, so a
    /// partition's history is part of what a hop costs).
    pub(crate) history: i64,
    pub(crate) messages: Vec<(Duration, Vec<u8>)>,
}

impl Schedule {
    /// `streams` chunk-sized messages (~250 bytes) every `every`, `ticks` times,
    /// on a fresh partition: one burst per token step.
    pub(crate) fn chunk_bursts(streams: usize, ticks: usize, every: Duration) -> Self {
        let messages = (0..ticks)
            .flat_map(|tick| (0..streams).map(move |_| (every * tick as u32, vec![b'x'; 250])))
            .collect();
        Self {
            name: format!("chunk bursts ({streams} per tick)"),
            history: 0,
            messages,
        }
    }

    /// Sluice's own response messages of a phase (their sizes, in order), sent
    /// evenly over the phase's duration, on a partition with the same history.
    pub(crate) fn replay(traffic: &Traffic) -> Self {
        let count = traffic.payload_sizes.len().max(1) as u32;
        let messages = traffic
            .payload_sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                (
                    traffic.duration * i as u32 / count,
                    vec![b'x'; (*size).max(8)],
                )
            })
            .collect();
        Self {
            name: "sluice's response traffic".into(),
            history: traffic.history,
            messages,
        }
    }
}

/// What the edge's reply partition received during one measured phase.
pub(crate) struct Traffic {
    pub(crate) history: i64,
    pub(crate) payload_sizes: Vec<usize>,
    pub(crate) duration: Duration,
}

/// The high watermark of the edge's reply partition (0, as the benchmark configures it).
pub(crate) async fn reply_watermark(kafka: &sluice::config::KafkaConfig) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = sluice::backends::queue::kafka::client_config(
        kafka,
        &[("group.id", "bench-watermarks")],
        &Default::default(),
    )
    .create()
    .expect("consumer");
    let topic = kafka.response_topic.clone();
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .expect("watermarks")
            .1
    })
    .await
    .expect("watermark task")
}

/// A consumer (sluice's consumer settings) of partition 0 of `topic`, from offset `from`.
pub(crate) fn partition_reader(
    kafka: &sluice::config::KafkaConfig,
    group: &str,
    topic: &str,
    from: i64,
) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::StreamConsumer =
        sluice::backends::queue::kafka::client_config(
            kafka,
            &[("group.id", group), ("enable.auto.commit", "false")],
            &kafka.consumer,
        )
        .create()
        .expect("consumer");
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, rdkafka::Offset::Offset(from))
        .expect("partition");
    consumer.assign(&assignment).expect("assign");
    consumer
}

/// The payload sizes of the reply partition's messages `from..to`.
pub(crate) async fn read_traffic(
    kafka: &sluice::config::KafkaConfig,
    from: i64,
    to: i64,
) -> Vec<usize> {
    use rdkafka::message::Message;
    let consumer = partition_reader(kafka, "bench-traffic", &kafka.response_topic, from);
    let mut sizes = Vec::new();
    while let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await
    {
        if message.offset() >= to {
            break;
        }
        sizes.push(message.payload_len());
        if message.offset() == to - 1 {
            break;
        }
    }
    sizes
}

/// Produce-to-consume latency of a bare producer and consumer through the
/// broker, with sluice's client settings, sending `schedule`. The produce side
/// is one producer (as one worker process), the consume side one consumer (as
/// one edge), on a topic of one partition of its own.
pub(crate) async fn broker_hop(
    kafka: &sluice::config::KafkaConfig,
    schedule: Schedule,
) -> Vec<Duration> {
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    static TOPICS: AtomicU64 = AtomicU64::new(0);
    let topic = format!(
        "bench.baseline.{}.{}",
        std::process::id(),
        TOPICS.fetch_add(1, Ordering::Relaxed)
    );
    let admin: rdkafka::admin::AdminClient<_> =
        sluice::backends::queue::kafka::client_config(kafka, &[], &Default::default())
            .create()
            .expect("admin");
    let new_topic =
        rdkafka::admin::NewTopic::new(&topic, 1, rdkafka::admin::TopicReplication::Fixed(1));
    let _ = admin
        .create_topics([&new_topic], &rdkafka::admin::AdminOptions::new())
        .await;
    // Sluice's producer defaults, then the configured settings, as its workers use them.
    let producer: FutureProducer = sluice::backends::queue::kafka::producer_config(kafka)
        .create()
        .expect("producer");
    for _ in 0..schedule.history {
        let record = FutureRecord::to(&topic)
            .key("history")
            .payload(&[0u8; 250][..]);
        match producer.send_result(record) {
            Ok(delivery) => drop(delivery.await),
            Err((err, _)) => eprintln!("baseline produce failed: {err}"),
        }
    }
    let group = format!("bench-baseline-{}", std::process::id());
    let consumer = partition_reader(kafka, &group, &topic, schedule.history);
    let epoch = Instant::now();
    let total = schedule.messages.len();
    let warmed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen_warm = warmed.clone();
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            let Ok(Ok(message)) =
                tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await
            else {
                break;
            };
            let now = epoch.elapsed().as_nanos() as u64;
            if message.key() == Some(b"warm-up".as_slice()) {
                seen_warm.store(true, Ordering::Relaxed);
                continue;
            }
            if let Some(payload) = message.payload().filter(|p| p.len() >= 8) {
                let sent = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
            }
        }
        latencies
    });
    // Until the consumer reads from its partition (a first fetch can take a
    // while), warm-up messages, not counted.
    let warm = Instant::now();
    loop {
        let record = FutureRecord::to(&topic)
            .key("warm-up")
            .payload(&[0u8; 4][..]);
        let _ = producer.send_result(record);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if warmed.load(Ordering::Relaxed) || warm.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let start = tokio::time::Instant::now();
    for (i, (at, mut payload)) in schedule.messages.into_iter().enumerate() {
        tokio::time::sleep_until(start + at).await;
        payload[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        let key = format!("message-{}", i % 100);
        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
        if let Err((err, _)) = producer.send_result(record) {
            eprintln!("baseline produce failed: {err}");
        }
    }
    let mut latencies = receiver.await.expect("receiver");
    latencies.sort();
    latencies
}
