//! The check that a stable consumer group leaves this worker its share of
//! request partitions, and the rejoin that heals a broker which does not.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;

use super::super::KafkaConfig;
use super::super::reconnect::Consumer;
use super::WorkerShared;

/// How often a worker checks that its consumer group reads every request partition.
const GROUP_CHECK_EVERY: Duration = Duration::from_secs(3);

/// Rejoins the consumer group when, though stable, it leaves this worker
/// fewer request partitions than its share: a broker that dropped a dead
/// member without starting a new generation (tansu 0.6 does, when the member
/// was killed rather than stopped) leaves that member's partitions unread
/// until the group rebalances, and leaving and joining again makes it
/// rebalance. Two checks in a row must agree, so a rebalance under way is
/// not mistaken for it. On Apache Kafka the check never fires.
pub(super) async fn watch_group(consumer: std::sync::Weak<Consumer>, shared: Arc<WorkerShared>) {
    let mut ticker = tokio::time::interval(GROUP_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut short_before = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shared.loss.wait() => return,
        }
        let (weak, kafka) = (consumer.clone(), shared.kafka.clone());
        let rejoin_if_short = short_before;
        // The lookups and the rejoin block, and if the session was dropped
        // meanwhile, the consumer is destroyed here: all off the runtime.
        let checked = tokio::task::spawn_blocking(move || {
            let consumer = weak.upgrade()?;
            let held = consumer.assignment().map_or(0, |list| list.count());
            let shortfall = share_shortfall(&consumer, &kafka, held);
            let rejoined = (shortfall.is_some() && rejoin_if_short).then(|| {
                consumer.unsubscribe();
                consumer.subscribe(&[&kafka.request_topic])
            });
            Some((held, shortfall, rejoined))
        })
        .await;
        let Ok(Some((held, shortfall, rejoined))) = checked else {
            return;
        };
        shared.metrics.assigned_partitions.set(held as i64);
        short_before = shortfall.is_some() && rejoined.is_none();
        if let (Some(short), Some(subscribed)) = (shortfall, rejoined) {
            tracing::warn!(
                held = short.held,
                share = short.share,
                members = short.members,
                partitions = short.partitions,
                "the worker group is stable but leaves request partitions unread; rejoined it so that it rebalances"
            );
            shared.metrics.group_rejoins.inc();
            if let Err(err) = subscribed {
                tracing::warn!(%err, "could not subscribe to the request topic again");
            }
        }
    }
}

/// A worker holding fewer request partitions than a stable group's share.
struct Shortfall {
    held: usize,
    share: usize,
    members: usize,
    partitions: usize,
}

fn share_shortfall(consumer: &Consumer, kafka: &KafkaConfig, held: usize) -> Option<Shortfall> {
    let timeout = Duration::from_secs(2);
    let groups = consumer
        .fetch_group_list(Some(&kafka.worker_group), timeout)
        .ok()?;
    let group = groups
        .groups()
        .iter()
        .find(|g| g.name() == kafka.worker_group && g.state() == "Stable")?;
    let members = group.members().len();
    let metadata = consumer
        .fetch_metadata(Some(&kafka.request_topic), timeout)
        .ok()?;
    let partitions = metadata.topics().first()?.partitions().len();
    let share = partitions / members.max(1);
    (members > 0 && held < share).then_some(Shortfall {
        held,
        share,
        members,
        partitions,
    })
}
