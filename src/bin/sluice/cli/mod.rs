//! The command line: `serve`, `worker`, `demo`, `keys`, `teams`, `audit`,
//! `migrate`, `config check`, `plugin check`. clap lives here, in the binary; every
//! command calls the library.

mod inspect;
mod tenants;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use inspect::{ConfigCommand, PluginCommand};
use sluice::config::Config;
use tenants::{KeysCommand, TeamsCommand};

#[derive(Parser)]
#[command(name = "sluice", version, about = "An LLM inference gateway for vLLM")]
struct Cli {
    /// Config file (default: ./gateway.toml when it exists). Every key can also
    /// be set with SLUICE_<SECTION>__<KEY> environment variables.
    #[arg(long, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway edge (and an in-process worker unless `worker.in_process = false`).
    Serve,
    /// Run a standalone worker for the Kafka queue.
    Worker,
    /// Run the gateway with a built-in simulated vLLM and print a curl command to try.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Delay between simulated tokens, in milliseconds.
        #[arg(long, default_value_t = 30)]
        token_delay_ms: u64,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage teams: groups of keys with limits of their own.
    Teams {
        #[command(subcommand)]
        command: TeamsCommand,
    },
    /// Changes to keys and teams, newest first: who, what, when, before and after.
    Audit {
        /// Only the changes of this key or team id.
        #[arg(long)]
        target: Option<String>,
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Check the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Work with WebAssembly plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

fn config_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| {
        Path::new("gateway.toml")
            .exists()
            .then(|| PathBuf::from("gateway.toml"))
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config_path(cli.config);
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sluice: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluice: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the gRPC trace exporter runs on it. Dropped before
    // it, so the last spans are exported while it still runs.
    let telemetry = {
        let _entered = runtime.enter();
        sluice::observe::telemetry::init(&config.log, &config.telemetry)
    };
    let grace = config.server.shutdown_grace;
    let result = runtime.block_on(execute(cli.command, config));
    drop(telemetry);
    // Background work still running (a Kafka client closing against an
    // unreachable broker) gets a moment, not a say in when the process ends.
    runtime.shutdown_timeout(grace.min(Duration::from_secs(5)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sluice: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let listener =
                sluice::edge::server::bind(config.server.listen, config.server.listen_backlog)
                    .map_err(|e| {
                        anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen)
                    })?;
            tracing::info!(listen = %config.server.listen, "sluice edge listening");
            sluice::app::run(config, listener, shutdown_signal()).await
        }
        Command::Worker => sluice::app::run_worker(config, shutdown_signal()).await,
        Command::Demo {
            listen,
            token_delay_ms,
        } => demo(config, listen, Duration::from_millis(token_delay_ms)).await,
        Command::Keys { command } => tenants::keys(command, &config).await,
        Command::Teams { command } => tenants::teams(command, &config).await,
        Command::Audit { target, limit } => tenants::audit(target, limit, &config).await,
        Command::Migrate => inspect::migrate(&config).await,
        Command::Plugin {
            command:
                PluginCommand::Check {
                    file,
                    plugin_config,
                },
        } => inspect::check_plugin(&config, file, plugin_config).await,
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            inspect::check_config(&config);
            Ok(())
        }
    }
}

#[cfg(feature = "demo")]
async fn demo(config: Config, listen: SocketAddr, token_delay: Duration) -> anyhow::Result<()> {
    crate::demo::run(
        config,
        crate::demo::DemoOptions {
            listen,
            token_delay,
        },
    )
    .await
}

#[cfg(not(feature = "demo"))]
async fn demo(_: Config, _: SocketAddr, _: Duration) -> anyhow::Result<()> {
    anyhow::bail!("this sluice was built without the `demo` feature")
}
