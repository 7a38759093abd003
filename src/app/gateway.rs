//! The gateway: every stage built from its section of the config, the
//! in-process worker when there is one, and the edge serving until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{BACKEND_CHECK_EVERY, report};
use crate::backends::affinity::{self, AffinityMap};
use crate::backends::cache::{self, CacheMetrics};
use crate::backends::queue::kafka::{ReconnectingJobSource, ReconnectingQueue};
use crate::backends::queue::{JobSource, MemoryQueue, Queue, QueueBackend, QueueMetrics};
use crate::backends::replay;
use crate::backends::store::inference_log::InferenceLogger;
use crate::backends::store::{self, Store};
use crate::batch::Batches;
use crate::batch::runner::{BatchMetrics, Runner};
use crate::config::Config;
use crate::edge::Edge;
use crate::fleet::FleetMetrics;
use crate::fleet::upstream::UpstreamClient;
use crate::fleet::worker::Worker;
use crate::observe::metrics::{MetricsRegistry, Roles};
use crate::observe::outage::Outage;
use crate::pipeline::RequestMetrics;
use crate::pipeline::models::ModelCatalog;
use crate::pipeline::policy::{NoPolicy, Policy};
use crate::pipeline::resumable::{ResumeMetrics, Resumption};
use crate::pipeline::state::{PipelineSettings, Stages};
use crate::plugins::{PluginFamilies, PluginHost};
use crate::tenancy::TenancyMetrics;
use crate::tenancy::auth::Authenticator;
use crate::tenancy::limits::Limiter;

/// A started gateway: backends connected, background tasks running, not yet serving HTTP.
pub struct Gateway {
    edge: Arc<Edge>,
    config: Arc<Config>,
    worker_shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The admin API's listener, bound at start when `admin.listen` is set.
    admin: Option<TcpListener>,
    /// The plugin host, when one runs (the console shows what it loaded).
    plugins: Option<Arc<PluginHost>>,
}

impl Gateway {
    /// Connects the backends (failing with a message that names any that is
    /// unreachable) and starts the in-process worker if configured.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let in_process_worker =
            config.worker.in_process || matches!(config.queue.backend, QueueBackend::Memory { .. });
        let registry = Arc::new(MetricsRegistry::new(if in_process_worker {
            Roles::ALL
        } else {
            Roles::EDGE
        }));
        let request_metrics = Arc::new(RequestMetrics::new(&registry, &known_models(&config)));
        let cache_metrics = Arc::new(CacheMetrics::new(&registry));
        let queue_metrics = Arc::new(QueueMetrics::new(&registry, &kafka_topics(&config)));
        let tenancy_metrics = Arc::new(TenancyMetrics::new(&registry));
        let fleet_metrics = Arc::new(FleetMetrics::new(&registry));
        let plugin_metrics = Arc::new(PluginFamilies::new(&registry));

        let store = store::open(&config.store).await?;
        registry.backend_up.with_label_values(&["store"]).set(1);
        let cache = cache::open(&config.cache, cache_metrics.clone()).await;
        if cache.is_some() {
            registry.backend_up.with_label_values(&["cache"]).set(1);
        }
        if config.limits.redis_url().is_some() {
            registry.backend_up.with_label_values(&["limits"]).set(1);
        }
        let affinity = affinity::open(&config.responses, config.responses_redis()).await;
        let resumption = match config.resume.enabled {
            true => Some(Arc::new(Resumption {
                log: replay::open(&config.resume, config.resume_redis()).await,
                grace: config.resume.grace,
                metrics: ResumeMetrics::new(&registry),
            })),
            false => None,
        };
        let (inference_log, log_task) =
            InferenceLogger::start(store.clone(), config.store.log_buffer.get(), &registry);

        let worker_shutdown = CancellationToken::new();
        let mut tasks = vec![log_task];
        // The in-process worker's upstream client: its fleet's health is part of `/ready`.
        let upstream = match in_process_worker {
            true => Some(Arc::new(UpstreamClient::new(
                &config.upstream,
                &config.models,
                &fleet_metrics,
            )?)),
            false => None,
        };
        let queue: Arc<dyn Queue> = match &config.queue.backend {
            QueueBackend::Memory { capacity } => {
                let queue = Arc::new(MemoryQueue::new(capacity.get(), config.queue.queue_timeout));
                let source: Arc<dyn JobSource> = queue.clone();
                tasks.push(spawn_worker(
                    &config,
                    upstream.clone(),
                    source,
                    fleet_metrics.clone(),
                    affinity.clone(),
                    worker_shutdown.clone(),
                )?);
                queue
            }
            QueueBackend::Kafka(kafka) => {
                let queue =
                    ReconnectingQueue::start(kafka, &config.queue, queue_metrics.clone()).await?;
                if config.worker.in_process {
                    let source =
                        ReconnectingJobSource::start(kafka, &config.queue, queue_metrics.clone())
                            .await?;
                    tasks.push(spawn_worker(
                        &config,
                        upstream.clone(),
                        Arc::new(source),
                        fleet_metrics.clone(),
                        affinity.clone(),
                        worker_shutdown.clone(),
                    )?);
                }
                Arc::new(queue)
            }
        };
        registry.backend_up.with_label_values(&["queue"]).set(1);

        // With a config file to watch, the plugin host runs even with no plugins yet,
        // so plugins added to the file later are picked up.
        let watching = config.plugin_host.watch && config.source.is_some();
        let plugins = match config.plugins.is_empty() && !watching {
            true => None,
            false => Some(PluginHost::start(config.plugin_setup(), plugin_metrics).await?),
        };
        let policy: Arc<dyn Policy> = match &plugins {
            Some(host) => host.clone(),
            None => Arc::new(NoPolicy),
        };
        let stages = Arc::new(Stages {
            settings: PipelineSettings {
                max_n: config.server.max_n.get(),
                max_prompts: config.server.max_prompts.get(),
                cache_scope: config.cache.scope,
                cache_sampled: config.cache.sampled,
                background_poll: config.responses.background_poll,
                background_ttl: config.responses.ttl,
            },
            auth: Authenticator::new(
                store.clone(),
                &config.auth,
                config.limits.default.clone(),
                tenancy_metrics.clone(),
            ),
            limiter: Limiter::new(&config.limits, tenancy_metrics.clone()).await,
            policy,
            models: ModelCatalog::new(&config.upstream, &config.models)?,
            cache,
            queue,
            store,
            inference_log,
            fleet: upstream.as_ref().map(|u| u.fleet().clone()),
            affinity,
            resumption,
            registry: registry.clone(),
            metrics: request_metrics,
            cache_metrics,
            queue_metrics,
            tenancy_metrics,
        });
        let mut edge = Edge::new(
            stages.clone(),
            config.server.clone(),
            config.cors.clone(),
            config.auth.cache_ttl,
        );
        if config.batch.enabled {
            let batches_registry = registry;
            let batches = Arc::new(Batches::new(
                stages.store.clone(),
                stages,
                config.batch.clone(),
            ));
            let runner = Runner::new(batches.clone(), BatchMetrics::new(&batches_registry));
            tasks.push(tokio::spawn(runner.run(worker_shutdown.clone())));
            edge.batches = Some(batches);
        }
        let edge = Arc::new(edge);
        let admin =
            match config.admin.listen {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|err| {
                    anyhow::anyhow!("cannot listen on {addr} (admin.listen): {err}")
                })?),
                None => None,
            };
        tasks.push(monitor_backends(
            edge.stages.clone(),
            worker_shutdown.clone(),
        ));
        Ok(Self {
            edge,
            config,
            worker_shutdown,
            tasks,
            admin,
            plugins,
        })
    }

    /// Where the admin API listens, if it does.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.edge.stages.store.clone()
    }

    /// Serves HTTP on `listener` until `shutdown` resolves, then drains
    /// in-flight requests (up to `server.shutdown_grace_ms`) and stops the worker.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let router = crate::edge::router(self.edge.clone());
        let server = &self.config.server;
        let grace = server.shutdown_grace;
        let descriptors = crate::edge::server::raise_descriptor_limit();
        let limits = crate::edge::server::ConnectionLimits {
            max_connections: server.max_connections.map_or_else(
                || crate::edge::server::default_max_connections(descriptors),
                |n| n.get(),
            ),
            header_timeout: server.header_timeout,
        };
        tracing::info!(
            open_files = descriptors,
            max_connections = limits.max_connections,
            concurrent_streams = self.config.worker.concurrency,
            "stream capacity: connections up to max_connections, upstream streams per worker up to worker.concurrency"
        );
        let admin_shutdown = CancellationToken::new();
        let admin_router = self.admin.as_ref().and_then(|_| {
            let api =
                crate::edge::admin::router(self.edge.stages.store.clone(), &self.config.admin)?;
            let console = crate::console::router(
                self.edge.clone(),
                self.plugins.clone(),
                &self.config.admin,
                &self.config.console,
                admin_shutdown.clone(),
            );
            Some(match console {
                Some(console) => console.merge(api),
                None => api,
            })
        });
        let admin_task = self.admin.zip(admin_router).map(|(listener, router)| {
            let stop = admin_shutdown.clone();
            tracing::info!(
                listen = ?listener.local_addr().ok(),
                console = self.config.console.enabled,
                "admin API listening"
            );
            tokio::spawn(async move {
                let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
                let served = axum::serve(crate::edge::nodelay(listener), service)
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
        let Gateway { edge, tasks, .. } = self;
        drop(edge);
        for task in tasks {
            let _ = tokio::time::timeout(grace, task).await;
        }
        Ok(())
    }
}

/// The models whose token counters exist from startup: `[[models]]`, or `upstream.models`.
fn known_models(config: &Config) -> Vec<String> {
    match config.models.is_empty() {
        true => config.upstream.models.clone(),
        false => config.models.iter().map(|m| m.name.clone()).collect(),
    }
}

/// The Kafka topics, when Kafka is the queue (their skipped-message counters exist from startup).
pub(super) fn kafka_topics(config: &Config) -> Vec<&str> {
    match &config.queue.backend {
        QueueBackend::Kafka(kafka) => vec![
            kafka.request_topic.as_str(),
            kafka.response_topic.as_str(),
            kafka.cancel_topic.as_str(),
        ],
        QueueBackend::Memory { .. } => Vec::new(),
    }
}

/// Keeps `sluice_backend_up` current and logs each backend's outage once
/// when it starts and once when it ends, until `stop`.
fn monitor_backends(stages: Arc<Stages>, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (store, queue) = (Outage::default(), Outage::default());
        let mut ticks = tokio::time::interval(BACKEND_CHECK_EVERY);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            let checks = crate::edge::ops::check_backends(&stages).await;
            report(&store, "store", &checks.store);
            report(&queue, "queue", &checks.queue);
        }
    })
}

/// Starts a worker on `source`, with `upstream` as its client (or a new one).
pub(super) fn spawn_worker(
    config: &Config,
    upstream: Option<Arc<UpstreamClient>>,
    source: Arc<dyn JobSource>,
    metrics: Arc<FleetMetrics>,
    affinity: Arc<dyn AffinityMap>,
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
    let worker = Arc::new(
        Worker::new(
            upstream,
            metrics,
            config.worker.concurrency.get(),
            config.queue.queue_timeout,
            affinity,
        )
        .with_batch_headroom(config.upstream.batch_headroom)
        .with_vllm_priority(config.upstream.priority_scheduling),
    );
    Ok(tokio::spawn(worker.run(
        source,
        shutdown,
        config.server.shutdown_grace,
    )))
}
