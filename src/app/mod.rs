//! Wiring: builds every stage from the [`Config`] (each from its own
//! section), starts the background tasks (worker, inference-log writer,
//! backend checks), and serves until shutdown. [`run`] is what the binary and
//! the tests share; [`StandaloneWorker`] is `sluice worker`.

mod gateway;
mod worker;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::observe::outage::{Outage, Transition};

pub use gateway::Gateway;
pub use worker::{StandaloneWorker, run_worker};

/// How often backends are checked in the background.
const BACKEND_CHECK_EVERY: Duration = Duration::from_secs(5);

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
