//! The command line: `serve`, `worker`, `demo`, `keys`, `migrate`, `config check`, `plugin check`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::config::Config;

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

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a component against wit/plugin.wit and list the hooks it implements.
    Check {
        file: PathBuf,
        /// JSON handed to the plugin's `init` (its `[plugins.config]` table).
        #[arg(long, default_value = "{}")]
        plugin_config: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret once.
    Create {
        #[arg(long)]
        name: String,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id or name; takes effect within a second.
    Revoke { id_or_name: String },
    /// Requests and tokens per key, from the inference log.
    Usage {
        /// Only count requests since this RFC 3339 time (e.g. 2026-01-31T00:00:00Z).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective backends.
    Check,
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
        crate::telemetry::init(&config.log, &config.telemetry)
    };
    let result = runtime.block_on(execute(cli.command, config));
    drop(telemetry);
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
                crate::http::server::bind(config.server.listen, config.server.listen_backlog)
                    .map_err(|e| {
                        anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen)
                    })?;
            tracing::info!(listen = %config.server.listen, "sluice edge listening");
            crate::app::run(config, listener, shutdown_signal()).await
        }
        Command::Worker => crate::app::run_worker(config, shutdown_signal()).await,
        Command::Demo {
            listen,
            token_delay_ms,
        } => {
            crate::demo::run(
                config,
                crate::demo::DemoOptions {
                    listen,
                    token_delay: Duration::from_millis(token_delay_ms),
                },
            )
            .await
        }
        Command::Keys { command } => {
            let store = crate::store::open(&config.store).await?;
            match command {
                KeysCommand::Create { name } => {
                    let key = crate::auth::create_key(store.as_ref(), &name).await?;
                    println!("created key {} ({})", key.id, key.name);
                    println!("secret (shown once, store it now): {}", key.secret);
                }
                KeysCommand::List => {
                    println!("{:<18} {:<24} {:<26} revoked", "id", "name", "created");
                    for key in store.list_keys().await? {
                        println!(
                            "{:<18} {:<24} {:<26} {}",
                            key.id,
                            key.name,
                            key.created_at
                                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            key.revoked_at
                                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                                .unwrap_or_else(|| "-".into())
                        );
                    }
                }
                KeysCommand::Revoke { id_or_name } => match store.revoke_key(&id_or_name).await? {
                    0 => anyhow::bail!("no active key with id or name `{id_or_name}`"),
                    n => println!("revoked {n} key(s); they stop working within a second"),
                },
                KeysCommand::Usage { since } => {
                    println!(
                        "{:<18} {:<24} {:>10} {:>10} {:>14} {:>18}",
                        "key id",
                        "name",
                        "requests",
                        "cache hits",
                        "prompt tokens",
                        "completion tokens"
                    );
                    for usage in store.key_usage(since).await? {
                        println!(
                            "{:<18} {:<24} {:>10} {:>10} {:>14} {:>18}",
                            usage.key_id,
                            usage.name.as_deref().unwrap_or("-"),
                            usage.requests,
                            usage.cache_hits,
                            usage.prompt_tokens,
                            usage.completion_tokens
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Migrate => {
            crate::store::open(&config.store).await?;
            println!(
                "migrations applied to {}",
                crate::config::redact_url(config.store.url.expose_secret())
            );
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Check {
                    file,
                    plugin_config,
                },
        } => {
            if let Err(err) = serde_json::from_str::<serde_json::Value>(&plugin_config) {
                anyhow::bail!("--plugin-config is not JSON: {err}");
            }
            let plugin = crate::config::PluginConfig {
                name: file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: file.clone(),
                on_error: crate::config::OnError::FailClosed,
                max_memory_bytes: 16 * 1024 * 1024,
                timeout: Duration::from_millis(100),
                keys: Vec::new(),
                config_json: plugin_config,
            };
            let hooks = crate::plugins::check(&config.plugin_host, plugin).await?;
            println!(
                "{}: a valid {} component",
                file.display(),
                hooks.version.package()
            );
            let both = "/v1/completions and /v1/chat/completions";
            let request_routes = match hooks.reads_chat() {
                true => both,
                false => {
                    "/v1/completions only (built against 0.1.0: on chat it is skipped when fail-open, refuses when fail-closed)"
                }
            };
            for (hook, served, routes) in [
                (
                    "on-request (request-hook):   ",
                    hooks.on_request,
                    request_routes,
                ),
                (
                    "cache-key (cache-key-hook):  ",
                    hooks.cache_key,
                    request_routes,
                ),
                ("on-token (token-hook):       ", hooks.on_token, both),
                ("on-tokens (token-batch-hook):", hooks.on_tokens, both),
            ] {
                match served {
                    true => println!("  {hook} yes, on {routes}"),
                    false => println!("  {hook} no"),
                }
            }
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            println!("configuration is valid");
            println!("  listen:   {}", config.server.listen);
            println!(
                "  store:    {}",
                crate::config::redact_url(config.store.url.expose_secret())
            );
            println!("  cache:    {}", describe_cache(&config));
            println!("  queue:    {}", describe_queue(&config));
            println!(
                "  upstream: {}",
                config
                    .upstream
                    .urls
                    .iter()
                    .map(|u| u.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "  plugins:  {}",
                config
                    .plugins
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
    }
}

fn describe_cache(config: &Config) -> String {
    let cache = &config.cache;
    match cache.backend() {
        crate::config::CacheBackend::Disabled => "off".into(),
        crate::config::CacheBackend::Memory => format!("memory (max {} bytes)", cache.max_bytes),
        crate::config::CacheBackend::Redis => crate::config::redact_url(cache.url.expose_secret()),
    }
}

fn describe_queue(config: &Config) -> String {
    match &config.queue.backend {
        crate::config::QueueBackend::Memory { capacity } => format!("memory (capacity {capacity})"),
        crate::config::QueueBackend::Kafka(kafka) => format!(
            "kafka {} ({} / {})",
            kafka.brokers, kafka.request_topic, kafka.response_topic
        ),
    }
}
