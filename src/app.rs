//! Wiring: builds every stage from the [`Config`], starts the background
//! tasks (worker, inference-log writer), and serves HTTP until shutdown.
//! [`run`] is what the binary and the tests share.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backends::cache;
use crate::backends::queue::kafka::{ReconnectingJobSource, ReconnectingQueue};
use crate::backends::queue::{JobSource, MemoryQueue, Queue};
use crate::backends::store::inference_log::InferenceLogger;
use crate::backends::store::{self, Store};
use crate::config::{Config, QueueBackend};
use crate::fleet::upstream::UpstreamClient;
use crate::fleet::worker::Worker;
use crate::observe::metrics::{Metrics, Roles};
use crate::pipeline::policy::{NoPolicy, Policy};
use crate::plugins::PluginHost;
use crate::tenancy::auth::Authenticator;

pub use crate::pipeline::state::AppState;

use crate::observe::outage::{Outage, Transition};

/// Logs a backend's outage once when it starts and once when it ends.
fn report(outage: &Outage, backend: &'static str, result: &Result<(), String>) {
    match (outage.observe(result.is_ok()), result) {
        (Some(Transition::Started), Err(err)) => {
            tracing::warn!(backend, %err, "backend unavailable")
        }
        (Some(Transition::Ended), _) => tracing::info!(backend, "backend is back"),
        _ => {}
    }
}

/// How often backends are checked in the background.
const BACKEND_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A started gateway: backends connected, background tasks running, not yet serving HTTP.
pub struct Gateway {
    state: Arc<AppState>,
    worker_shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The admin API's listener, bound at start when `admin.listen` is set.
    admin: Option<TcpListener>,
}

impl Gateway {
    /// Connects the backends (failing with a message that names any that is
    /// unreachable) and starts the in-process worker if configured.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let in_process_worker =
            config.worker.in_process || matches!(config.queue.backend, QueueBackend::Memory { .. });
        let metrics = Arc::new(Metrics::new(if in_process_worker {
            Roles::ALL
        } else {
            Roles::EDGE
        }));
        let store = store::open(&config.store).await?;
        metrics.backend_up.with_label_values(&["store"]).set(1);
        let cache = cache::open(&config.cache, metrics.clone()).await;
        if cache.is_some() {
            metrics.backend_up.with_label_values(&["cache"]).set(1);
        }
        let (inference_log, log_task) =
            InferenceLogger::start(store.clone(), config.store.log_buffer, metrics.clone());

        let worker_shutdown = CancellationToken::new();
        let mut tasks = vec![log_task];
        // The in-process worker's upstream client: its fleet's health is part of `/ready`.
        let upstream = match in_process_worker {
            true => Some(Arc::new(UpstreamClient::new(
                &config.upstream,
                &config.models,
                &metrics,
            )?)),
            false => None,
        };
        let queue: Arc<dyn Queue> = match &config.queue.backend {
            QueueBackend::Memory { capacity } => {
                let queue = Arc::new(MemoryQueue::new(*capacity, config.queue.queue_timeout));
                let source: Arc<dyn JobSource> = queue.clone();
                tasks.push(spawn_worker(
                    &config,
                    upstream.clone(),
                    source,
                    metrics.clone(),
                    worker_shutdown.clone(),
                )?);
                queue
            }
            QueueBackend::Kafka(kafka) => {
                let queue = ReconnectingQueue::start(kafka, &config.queue, metrics.clone()).await?;
                if config.worker.in_process {
                    let source =
                        ReconnectingJobSource::start(kafka, &config.queue, metrics.clone()).await?;
                    tasks.push(spawn_worker(
                        &config,
                        upstream.clone(),
                        Arc::new(source),
                        metrics.clone(),
                        worker_shutdown.clone(),
                    )?);
                }
                Arc::new(queue)
            }
        };
        metrics.backend_up.with_label_values(&["queue"]).set(1);

        // With a config file to watch, the plugin host runs even with no plugins yet,
        // so plugins added to the file later are picked up.
        let watching = config.plugin_host.watch && config.source.is_some();
        let policy: Arc<dyn Policy> = if config.plugins.is_empty() && !watching {
            Arc::new(NoPolicy)
        } else {
            PluginHost::start(&config, metrics.clone()).await?
        };
        let state = Arc::new(AppState {
            auth: Authenticator::new(
                store.clone(),
                &config.auth,
                config.limits.default.clone(),
                metrics.clone(),
            ),
            limiter: crate::tenancy::limits::Limiter::new(&config.limits, metrics.clone()).await,
            fleet: upstream.as_ref().map(|u| u.fleet().clone()),
            models: crate::pipeline::models::ModelCatalog::new(&config.upstream, &config.models)?,
            config,
            store,
            cache,
            queue,
            policy,
            metrics,
            inference_log,
            ws_sockets: Default::default(),
        });
        let admin =
            match state.config.admin.listen {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|err| {
                    anyhow::anyhow!("cannot listen on {addr} (admin.listen): {err}")
                })?),
                None => None,
            };
        tasks.push(Self::monitor_backends(
            state.clone(),
            worker_shutdown.clone(),
        ));
        Ok(Self {
            state,
            worker_shutdown,
            tasks,
            admin,
        })
    }

    /// Keeps `sluice_backend_up` current and logs each backend's outage once
    /// when it starts and once when it ends, until `stop`.
    fn monitor_backends(state: Arc<AppState>, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let (store, queue) = (Outage::default(), Outage::default());
            let mut ticks = tokio::time::interval(BACKEND_CHECK_EVERY);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = stop.cancelled() => return,
                }
                let checks = crate::edge::ops::check_backends(&state).await;
                report(&store, "store", &checks.store);
                report(&queue, "queue", &checks.queue);
            }
        })
    }

    /// Where the admin API listens, if it does.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    /// Serves HTTP on `listener` until `shutdown` resolves, then drains
    /// in-flight requests (up to `server.shutdown_grace_ms`) and stops the worker.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let router = crate::edge::router(self.state.clone());
        let server = &self.state.config.server;
        let grace = server.shutdown_grace;
        let descriptors = crate::edge::server::raise_descriptor_limit();
        let limits = crate::edge::server::ConnectionLimits {
            max_connections: server
                .max_connections
                .unwrap_or_else(|| crate::edge::server::default_max_connections(descriptors)),
            header_timeout: server.header_timeout,
        };
        tracing::info!(
            open_files = descriptors,
            max_connections = limits.max_connections,
            concurrent_streams = self.state.config.worker.concurrency,
            "stream capacity: connections up to max_connections, upstream streams per worker up to worker.concurrency"
        );
        let admin_shutdown = CancellationToken::new();
        let admin_router =
            crate::edge::admin::router(self.state.store.clone(), &self.state.config.admin);
        let admin_task = self.admin.zip(admin_router).map(|(listener, router)| {
            let stop = admin_shutdown.clone();
            tracing::info!(listen = ?listener.local_addr().ok(), "admin API listening");
            tokio::spawn(async move {
                let served = axum::serve(crate::edge::nodelay(listener), router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(err) = served {
                    tracing::error!(%err, "the admin API stopped");
                }
            })
        });
        crate::edge::server::serve(listener, router, limits, shutdown, grace).await;
        admin_shutdown.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
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
    Gateway::start(config)
        .await?
        .serve(listener, shutdown)
        .await
}

fn spawn_worker(
    config: &Config,
    upstream: Option<Arc<UpstreamClient>>,
    source: Arc<dyn JobSource>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let upstream = match upstream {
        Some(upstream) => upstream,
        None => Arc::new(UpstreamClient::new(
            &config.upstream,
            &config.models,
            &metrics,
        )?),
    };
    let worker = Arc::new(Worker::new(
        upstream,
        metrics,
        config.worker.concurrency,
        config.queue.queue_timeout,
    ));
    Ok(tokio::spawn(worker.run(
        source,
        shutdown,
        config.server.shutdown_grace,
    )))
}

/// A standalone worker on the Kafka queue: started, not yet stopped.
pub struct StandaloneWorker {
    pub metrics: Arc<Metrics>,
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
        let metrics = Arc::new(Metrics::new(Roles::WORKER));
        let source: Arc<dyn JobSource> =
            Arc::new(ReconnectingJobSource::start(kafka, &config.queue, metrics.clone()).await?);
        metrics.backend_up.with_label_values(&["queue"]).set(1);
        let shutdown = CancellationToken::new();
        // Keeps the queue's gauge current; logs an outage once at each end.
        let (watched, gauge, stop) = (source.clone(), metrics.clone(), shutdown.clone());
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
        let task = spawn_worker(
            config,
            None,
            source.clone(),
            metrics.clone(),
            shutdown.clone(),
        )?;
        Ok(Self {
            metrics,
            shutdown,
            task,
            source,
            grace: config.server.shutdown_grace,
        })
    }

    /// Stops taking requests and waits for running ones (up to the grace period).
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
