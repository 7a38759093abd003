//! Kafka sessions that survive the loss of their brokers.
//!
//! librdkafka cannot follow a topic that is deleted and created again under
//! the same name, as the topics of a broker that restarted without its
//! storage are (confluentinc/librdkafka#4898: "it's still needed to restart
//! the clients"); the versions tried can crash the process when they meet
//! the new topic ids. So a session's clients are not kept past the loss of
//! their brokers: when every broker connection is lost, the session is
//! closed at once (its streams and jobs end with an error) and its clients
//! are destroyed (a consumer's close may still take a moment, and a broker
//! that is back by then may still hear from it: it commits nothing); once a
//! bootstrap broker accepts connections again, a new session is built
//! (creating the topics if they are gone). Meanwhile new requests get 503.
//! The outage is logged once when it starts, every [`SUMMARY_EVERY`] while
//! it lasts, and once when it ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::KafkaConfig;
use super::QueueError;
use crate::backends::queue::QueueConfig;
use crate::backends::queue::QueueMetrics;

const SUMMARY_EVERY: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Whether a session's brokers are gone: `reported` when a client reports
/// every broker connection down, `closed` once the supervisor has taken the
/// session out of service. A report closes the session even if a broker
/// answers again a moment later: a broker that restarted that quickly may
/// have come back without the topics, and only new clients are safe with
/// what it recreates (closing on reports alone, four processes came through
/// 36 restarts; checking first whether a bootstrap broker answered let one
/// crash in the first three).
#[derive(Default)]
pub struct BrokerLoss {
    reported: CancellationToken,
    closed: CancellationToken,
}

impl BrokerLoss {
    /// Whether the session was closed for the loss of its brokers.
    pub fn is_lost(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Notes an error a client returned: consumers report the loss of every
    /// broker as an error of `recv`, not always to their context.
    pub fn note(&self, error: &KafkaError) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.reported.cancel();
        }
    }

    /// Returns once the session is closed for the loss of its brokers.
    pub async fn wait(&self) {
        self.closed.cancelled().await;
    }
}

/// The context of a session's clients: reports the loss of every broker.
#[derive(Clone)]
pub struct Watched(pub Arc<BrokerLoss>);

impl ClientContext for Watched {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.note(&error);
        // Transient by nature (the client retries); an outage is logged by the session.
        tracing::debug!(%error, reason, "Kafka client error");
    }
}

impl ConsumerContext for Watched {
    /// A group member commits what it took before its partitions move to
    /// another member (offsets are not committed automatically: see
    /// `KafkaJobSource`). Not once its session is lost: the broker it would
    /// reach may be a new one, and the offsets are of the old topics.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Revoke(_)) && !self.0.is_lost() {
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
        }
    }
}

pub type Producer = FutureProducer<Watched>;
pub type Consumer = StreamConsumer<Watched>;

/// The next message of `consumer` (of `topic`), or `None` once the brokers
/// are lost; a read error is noted (it may tell of the loss), logged and
/// waited out.
pub async fn next_message<'c>(
    consumer: &'c Consumer,
    loss: &BrokerLoss,
    topic: &str,
) -> Option<rdkafka::message::BorrowedMessage<'c>> {
    loop {
        let received = tokio::select! {
            received = consumer.recv() => received,
            () = loss.wait() => return None,
        };
        match received {
            Ok(message) => return Some(message),
            Err(err) => {
                loss.note(&err);
                tracing::warn!(%err, topic, "error reading a queue topic");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// An edge's queue or a worker's job source, on one set of clients.
pub trait Session: Sized + Send + Sync + 'static {
    /// What the process is to the queue, for the log: `edge` or `worker`.
    const ROLE: &'static str;

    /// Creates missing topics and connects a new set of clients.
    fn connect(
        kafka: KafkaConfig,
        queue: QueueConfig,
        metrics: Arc<QueueMetrics>,
    ) -> impl Future<Output = Result<Self, QueueError>> + Send + 'static;

    fn loss(&self) -> &BrokerLoss;
    /// Ends the session's in-flight work: its brokers are gone.
    fn close(&self);
}

/// The current session, rebuilt after each loss of the brokers.
pub struct Reconnecting<S> {
    current: Arc<ArcSwapOption<S>>,
    reconnected: Arc<Notify>,
    supervisor: JoinHandle<()>,
}

impl<S> Drop for Reconnecting<S> {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl<S: Session> Reconnecting<S> {
    /// Connects the first session (failing as `connect` does: startup
    /// should say when the brokers are unreachable) and keeps one connected.
    pub async fn start(
        kafka: &KafkaConfig,
        queue: &QueueConfig,
        metrics: Arc<QueueMetrics>,
    ) -> Result<Self, QueueError> {
        let (kafka, queue) = (kafka.clone(), queue.clone());
        let brokers = bootstrap_addresses(&kafka.brokers);
        let connect = move || S::connect(kafka.clone(), queue.clone(), metrics.clone());
        let first = connect().await?;
        let current = Arc::new(ArcSwapOption::from_pointee(first));
        let reconnected = Arc::new(Notify::new());
        let supervisor = tokio::spawn(supervise(
            current.clone(),
            reconnected.clone(),
            brokers,
            S::ROLE,
            connect,
        ));
        Ok(Self {
            current,
            reconnected,
            supervisor,
        })
    }

    /// The connected session, if the brokers are there.
    pub fn current(&self) -> Option<Arc<S>> {
        self.current.load_full()
    }

    /// The connected session, waiting for one while the brokers are gone.
    pub async fn connected(&self) -> Arc<S> {
        loop {
            let reconnected = self.reconnected.notified();
            tokio::pin!(reconnected);
            reconnected.as_mut().enable();
            if let Some(session) = self.current() {
                return session;
            }
            reconnected.await;
        }
    }
}

/// What a request gets while the brokers are gone.
pub fn unreachable() -> QueueError {
    QueueError::Unavailable("the Kafka brokers are unreachable; reconnecting".into())
}

async fn supervise<S, F, Fut>(
    current: Arc<ArcSwapOption<S>>,
    reconnected: Arc<Notify>,
    bootstrap: Vec<String>,
    what: &'static str,
    connect: F,
) where
    S: Session,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, QueueError>> + Send + 'static,
{
    loop {
        let Some(session) = current.load_full() else {
            return;
        };
        let loss = session.loss();
        loss.reported.cancelled().await;
        loss.closed.cancel();
        current.store(None);
        session.close();
        // Destroying clients waits for their threads; not on the runtime.
        drop(tokio::task::spawn_blocking(move || drop(session)));
        let lost_at = Instant::now();
        tracing::warn!(
            "lost every Kafka broker: this {what}'s clients are closed, and new ones are made when a broker answers (requests get 503 meanwhile)"
        );
        let (mut backoff, mut attempts, mut next_summary) =
            (Duration::from_millis(250), 0u32, lost_at + SUMMARY_EVERY);
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let result = match accepts_connections(&bootstrap).await {
                true => {
                    attempts += 1;
                    connect().await
                }
                false => Err(QueueError::Unavailable(
                    "no bootstrap broker accepts connections".into(),
                )),
            };
            match result {
                Ok(session) => {
                    current.store(Some(Arc::new(session)));
                    reconnected.notify_waiters();
                    tracing::warn!(
                        down_for = ?lost_at.elapsed(),
                        attempts,
                        "Kafka reachable again: this {what} is connected"
                    );
                    break;
                }
                Err(err) if Instant::now() >= next_summary => {
                    next_summary += SUMMARY_EVERY;
                    tracing::warn!(%err, down_for = ?lost_at.elapsed(), attempts, "Kafka still unreachable");
                }
                Err(err) => tracing::debug!(%err, "Kafka still unreachable"),
            }
        }
    }
}

fn bootstrap_addresses(brokers: &str) -> Vec<String> {
    brokers
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(String::from)
        .collect()
}

/// Whether any bootstrap broker accepts a TCP connection: a cheap probe
/// before building clients, which wait far longer to give up.
async fn accepts_connections(bootstrap: &[String]) -> bool {
    for address in bootstrap {
        let attempt = tokio::net::TcpStream::connect(address.as_str());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
            return true;
        }
    }
    false
}
