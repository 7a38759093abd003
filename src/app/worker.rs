//! `sluice worker`: a worker of its own on the Kafka queue, with its own
//! `/health` and `/metrics` listener.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{BACKEND_CHECK_EVERY, report};
use crate::backends::queue::kafka::ReconnectingJobSource;
use crate::backends::queue::{JobSource, QueueBackend, QueueMetrics};
use crate::config::Config;
use crate::fleet::FleetMetrics;
use crate::observe::metrics::{MetricsRegistry, Roles};
use crate::observe::outage::Outage;

/// A standalone worker on the Kafka queue: started, not yet stopped.
pub struct StandaloneWorker {
    pub metrics: Arc<MetricsRegistry>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    /// The Kafka client, held here so that it is dropped here, off the
    /// runtime: closing it blocks while the broker is unreachable.
    source: Arc<dyn JobSource>,
    grace: std::time::Duration,
}

impl StandaloneWorker {
    /// Joins the worker group and starts taking requests.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let QueueBackend::Kafka(kafka) = &config.queue.backend else {
            anyhow::bail!(
                "`sluice worker` needs the kafka:// queue; with memory:// the in-process worker of `sluice serve` does the work"
            );
        };
        let registry = Arc::new(MetricsRegistry::new(Roles::WORKER));
        let queue_metrics = Arc::new(QueueMetrics::new(
            &registry,
            &super::gateway::kafka_topics(config),
        ));
        let fleet_metrics = Arc::new(FleetMetrics::new(&registry));
        let source: Arc<dyn JobSource> =
            Arc::new(ReconnectingJobSource::start(kafka, &config.queue, queue_metrics).await?);
        registry.backend_up.with_label_values(&["queue"]).set(1);
        let shutdown = CancellationToken::new();
        // Keeps the queue's gauge current; logs an outage once at each end.
        let (watched, gauge, stop) = (source.clone(), registry.clone(), shutdown.clone());
        tokio::spawn(async move {
            let outage = Outage::default();
            let mut ticks = tokio::time::interval(BACKEND_CHECK_EVERY);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = stop.cancelled() => return,
                }
                let result = crate::edge::ops::check(watched.ping()).await;
                gauge
                    .backend_up
                    .with_label_values(&["queue"])
                    .set(i64::from(result.is_ok()));
                report(&outage, "queue", &result);
            }
        });
        let redis = config.responses_redis();
        if redis.is_none() {
            tracing::warn!(
                "the map of stored responses is in this process (no responses.url or limits.url in Redis): edges cannot see which replica holds a stored response, so Responses API follow-ups through this worker will fail"
            );
        }
        let affinity = crate::backends::affinity::open(&config.responses, redis).await;
        let task = super::gateway::spawn_worker(
            config,
            None,
            source.clone(),
            fleet_metrics,
            affinity,
            shutdown.clone(),
        )?;
        Ok(Self {
            metrics: registry,
            shutdown,
            task,
            source,
            grace: config.server.shutdown_grace,
        })
    }

    /// Stops taking requests and waits for running ones, within the grace
    /// period, whether or not the broker answers.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let grace = self.grace + std::time::Duration::from_secs(1);
        let _ = tokio::time::timeout(grace, self.task).await;
        // Closing the Kafka client waits for the broker; the process may exit first.
        let source = self.source;
        drop(tokio::task::spawn_blocking(move || drop(source)));
    }
}

/// Runs a standalone worker with its own `/health` and `/metrics` listener until `shutdown`.
pub async fn run_worker(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let worker = StandaloneWorker::start(&config).await?;
    let listener = TcpListener::bind(config.worker.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (worker.listen): {e}",
            config.worker.listen
        )
    })?;
    tracing::info!(listen = %config.worker.listen, "sluice worker running; metrics and health on this address");
    let router = crate::edge::worker_router(worker.metrics.clone());
    axum::serve(crate::edge::nodelay(listener), router)
        .with_graceful_shutdown(shutdown)
        .await?;
    worker.stop().await;
    Ok(())
}
