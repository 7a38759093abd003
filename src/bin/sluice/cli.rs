//! The command line: `serve`, `worker`, `demo`, `keys`, `migrate`, `config check`, `plugin check`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use sluice::config::Config;

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

/// Limits given on the command line; a flag left out keeps the current value.
#[derive(clap::Args, Default)]
struct LimitFlags {
    /// Requests per minute (0: remove, the default applies).
    #[arg(long)]
    requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens per minute (0: remove).
    #[arg(long)]
    tokens_per_minute: Option<u64>,
    /// Requests running at once (0: remove).
    #[arg(long)]
    max_concurrent: Option<u64>,
    /// The models it may use, comma-separated ("" : any).
    #[arg(long)]
    models: Option<String>,
}

impl LimitFlags {
    fn patch(&self) -> sluice::tenancy::tenants::LimitsPatch {
        let number = |v: Option<u64>| v.map(|v| (v != 0).then_some(v));
        sluice::tenancy::tenants::LimitsPatch {
            requests_per_minute: number(self.requests_per_minute),
            tokens_per_minute: number(self.tokens_per_minute),
            max_concurrent: number(self.max_concurrent),
            models: self.models.as_ref().map(|list| {
                let models: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect();
                (!models.is_empty()).then_some(models)
            }),
        }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret once.
    Create {
        #[arg(long)]
        name: String,
        /// The team (id or name) whose limits it also counts against.
        #[arg(long)]
        team: Option<String>,
        /// When it stops working (RFC 3339, e.g. 2026-12-31T00:00:00Z).
        #[arg(long)]
        expires: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Change a key's limits, team or expiry; takes effect within a second.
    Limit {
        id_or_name: String,
        /// Move it to this team (id or name; "" : no team).
        #[arg(long)]
        team: Option<String>,
        /// New expiry (RFC 3339).
        #[arg(long)]
        expires: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        limits: LimitFlags,
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
enum TeamsCommand {
    /// Create a team.
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Change a team's limits.
    Limit {
        id_or_name: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// List teams and their limits.
    List,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective backends.
    Check,
}

/// Limits in one line: `60 requests/min, 10000 tokens/min, 4 at once, models a, b`.
fn describe_limits(limits: &sluice::tenancy::Limits) -> String {
    let mut parts = Vec::new();
    if let Some(n) = limits.requests_per_minute {
        parts.push(format!("{n} requests/min"));
    }
    if let Some(n) = limits.tokens_per_minute {
        parts.push(format!("{n} tokens/min"));
    }
    if let Some(n) = limits.max_concurrent {
        parts.push(format!("{n} at once"));
    }
    if let Some(models) = &limits.models {
        parts.push(format!("models {}", models.join(", ")));
    }
    match parts.is_empty() {
        true => "defaults".into(),
        false => parts.join(", "),
    }
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
        } => {
            #[cfg(feature = "demo")]
            {
                crate::demo::run(
                    config,
                    crate::demo::DemoOptions {
                        listen,
                        token_delay: Duration::from_millis(token_delay_ms),
                    },
                )
                .await
            }
            #[cfg(not(feature = "demo"))]
            {
                let _ = (config, listen, token_delay_ms);
                anyhow::bail!("this sluice was built without the `demo` feature")
            }
        }
        Command::Keys { command } => {
            let store = sluice::backends::store::open(&config.store).await?;
            match command {
                KeysCommand::Create {
                    name,
                    team,
                    expires,
                    limits,
                } => {
                    let patch = sluice::tenancy::tenants::KeyPatch {
                        limits: limits.patch(),
                        team: Some(team),
                        expires_at: Some(expires),
                    };
                    let key =
                        sluice::tenancy::tenants::create_key(store.as_ref(), &name, &patch).await?;
                    println!("created key {} ({})", key.id, key.name);
                    println!("secret (shown once, store it now): {}", key.secret);
                }
                KeysCommand::Limit {
                    id_or_name,
                    team,
                    expires,
                    limits,
                } => {
                    let patch = sluice::tenancy::tenants::KeyPatch {
                        limits: limits.patch(),
                        team: team.map(|t| (!t.is_empty()).then_some(t)),
                        expires_at: expires.map(Some),
                    };
                    let key =
                        sluice::tenancy::tenants::update_key(store.as_ref(), &id_or_name, &patch)
                            .await?;
                    println!(
                        "key {} ({}): {}",
                        key.id,
                        key.name,
                        describe_limits(&key.limits)
                    );
                }
                KeysCommand::List => {
                    println!(
                        "{:<18} {:<24} {:<21} {:<21} {:<18} limits",
                        "id", "name", "created", "revoked", "team"
                    );
                    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                            .unwrap_or_else(|| "-".into())
                    };
                    for key in store.list_keys().await? {
                        let mut limits = describe_limits(&key.limits);
                        if let Some(at) = key.expires_at {
                            limits.push_str(&format!(", expires {}", time(Some(at))));
                        }
                        println!(
                            "{:<18} {:<24} {:<21} {:<21} {:<18} {limits}",
                            key.id,
                            key.name,
                            time(Some(key.created_at)),
                            time(key.revoked_at),
                            key.team_id.as_deref().unwrap_or("-"),
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
        Command::Teams { command } => {
            let store = sluice::backends::store::open(&config.store).await?;
            match command {
                TeamsCommand::Create { name, limits } => {
                    let team = sluice::tenancy::tenants::create_team(
                        store.as_ref(),
                        &name,
                        &limits.patch(),
                    )
                    .await?;
                    println!(
                        "created team {} ({}): {}",
                        team.id,
                        team.name,
                        describe_limits(&team.limits)
                    );
                }
                TeamsCommand::Limit { id_or_name, limits } => {
                    let team = sluice::tenancy::tenants::update_team(
                        store.as_ref(),
                        &id_or_name,
                        &limits.patch(),
                    )
                    .await?;
                    println!(
                        "team {} ({}): {}",
                        team.id,
                        team.name,
                        describe_limits(&team.limits)
                    );
                }
                TeamsCommand::List => {
                    println!("{:<18} {:<24} limits", "id", "name");
                    for team in store.list_teams().await? {
                        println!(
                            "{:<18} {:<24} {}",
                            team.id,
                            team.name,
                            describe_limits(&team.limits)
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Migrate => {
            sluice::backends::store::open(&config.store).await?;
            println!(
                "migrations applied to {}",
                sluice::config::redact_url(config.store.url.expose_secret())
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
            let plugin = sluice::config::PluginConfig {
                name: file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: file.clone(),
                on_error: sluice::config::OnError::FailClosed,
                max_memory_bytes: 16 * 1024 * 1024,
                timeout: Duration::from_millis(100),
                keys: Vec::new(),
                config_json: plugin_config,
            };
            let hooks = sluice::plugins::check(&config.plugin_host, plugin).await?;
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
                    "on-request (request-hook):    ",
                    hooks.on_request,
                    request_routes,
                ),
                (
                    "cache-key (cache-key-hook):   ",
                    hooks.cache_key,
                    request_routes,
                ),
                ("on-token (token-hook):        ", hooks.on_token, both),
                ("on-tokens (token-batch-hook): ", hooks.on_tokens, both),
                (
                    "on-tool-call (tool-call-hook):",
                    hooks.on_tool_call,
                    "/v1/chat/completions",
                ),
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
                sluice::config::redact_url(config.store.url.expose_secret())
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
        sluice::config::CacheBackend::Disabled => "off".into(),
        sluice::config::CacheBackend::Memory => format!("memory (max {} bytes)", cache.max_bytes),
        sluice::config::CacheBackend::Redis => {
            sluice::config::redact_url(cache.url.expose_secret())
        }
    }
}

fn describe_queue(config: &Config) -> String {
    match &config.queue.backend {
        sluice::config::QueueBackend::Memory { capacity } => {
            format!("memory (capacity {capacity})")
        }
        sluice::config::QueueBackend::Kafka(kafka) => format!(
            "kafka {} ({} / {})",
            kafka.brokers, kafka.request_topic, kafka.response_topic
        ),
    }
}
