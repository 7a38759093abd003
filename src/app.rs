//! Wiring: builds every stage from the [`Config`], starts the background
//! tasks (worker, inference-log writer), and serves HTTP until shutdown.
//! [`run`] is what the binary and the tests share.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::cache::{self, Cache};
use crate::config::{Config, QueueBackend};
use crate::inference_log::InferenceLogger;
use crate::metrics::Metrics;
use crate::policy::{NoPolicy, Policy};
use crate::queue::{JobSource, MemoryQueue, Queue};
use crate::store::{self, Store};
use crate::upstream::UpstreamClient;
use crate::worker::Worker;

/// What every request handler shares.
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub store: Arc<dyn Store>,
    pub cache: Option<Arc<dyn Cache>>,
    pub queue: Arc<dyn Queue>,
    pub policy: Arc<dyn Policy>,
    pub metrics: Arc<Metrics>,
    pub inference_log: InferenceLogger,
}

/// A started gateway: backends connected, background tasks running, not yet serving HTTP.
pub struct Gateway {
    state: Arc<AppState>,
    worker_shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Connects the backends (failing with a message that names any that is
    /// unreachable) and starts the in-process worker if configured.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let store = store::open(&config.store).await?;
        metrics.backend_up.with_label_values(&["store"]).set(1);
        let cache = cache::open(&config.cache, metrics.clone()).await;
        if cache.is_some() {
            metrics.backend_up.with_label_values(&["cache"]).set(1);
        }
        let (inference_log, log_task) = InferenceLogger::start(store.clone(), config.store.log_buffer, metrics.clone());

        let worker_shutdown = CancellationToken::new();
        let mut tasks = vec![log_task];
        let queue: Arc<dyn Queue> = match &config.queue.backend {
            QueueBackend::Memory { capacity } => {
                let queue = Arc::new(MemoryQueue::new(*capacity, config.queue.queue_timeout));
                let upstream = Arc::new(UpstreamClient::new(&config.upstream)?);
                let worker = Arc::new(Worker::new(
                    upstream,
                    metrics.clone(),
                    config.worker.concurrency,
                    config.queue.queue_timeout,
                ));
                let source: Arc<dyn JobSource> = queue.clone();
                tasks.push(tokio::spawn(worker.run(source, worker_shutdown.clone(), config.server.shutdown_grace)));
                queue
            }
            QueueBackend::Kafka(_) => anyhow::bail!("the kafka:// queue is not available in this build"),
        };
        metrics.backend_up.with_label_values(&["queue"]).set(1);

        let state = Arc::new(AppState {
            auth: Authenticator::new(store.clone(), config.auth.cache_ttl),
            config,
            store,
            cache,
            queue,
            policy: Arc::new(NoPolicy),
            metrics,
            inference_log,
        });
        Ok(Self {
            state,
            worker_shutdown,
            tasks,
        })
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    /// Serves HTTP on `listener` until `shutdown` resolves, then drains
    /// in-flight requests (up to `server.shutdown_grace_ms`) and stops the worker.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let router = crate::http::router(self.state.clone());
        let grace = self.state.config.server.shutdown_grace;
        let stopping = CancellationToken::new();
        let signal = stopping.clone();
        let server = axum::serve(crate::http::nodelay(listener), router).with_graceful_shutdown(async move {
            shutdown.await;
            signal.cancel();
        });
        let server = tokio::spawn(async move { server.await });
        let mut server = server;
        tokio::select! {
            result = &mut server => result??,
            () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("shutdown grace period over; closing remaining connections");
                server.abort();
            }
        }
        self.worker_shutdown.cancel();
        let Gateway { state, tasks, .. } = self;
        drop(state);
        for task in tasks {
            let _ = tokio::time::timeout(grace, task).await;
        }
        Ok(())
    }
}

/// Starts a gateway from `config` and serves it on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Gateway::start(config).await?.serve(listener, shutdown).await
}

/// Runs a standalone worker (Kafka queue) with its own health and metrics listener.
pub async fn run_worker(_config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let _ = shutdown;
    anyhow::bail!(
        "`sluice worker` needs the kafka:// queue; with {} the in-process worker of `sluice serve` does the work",
        "memory://"
    )
}
