//! Looking at what a gateway would run: `config check`, `plugin check`, `migrate`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use secrecy::ExposeSecret;
use sluice::config::Config;

#[derive(Subcommand)]
pub(super) enum PluginCommand {
    /// Validate a component against wit/plugin.wit and list the hooks it implements.
    Check {
        file: PathBuf,
        /// JSON handed to the plugin's `init` (its `[plugins.config]` table).
        #[arg(long, default_value = "{}")]
        plugin_config: String,
    },
}

#[derive(Subcommand)]
pub(super) enum ConfigCommand {
    /// Validate the configuration and print the effective backends.
    Check,
}

pub(super) async fn migrate(config: &Config) -> anyhow::Result<()> {
    sluice::backends::store::open(&config.store).await?;
    println!(
        "migrations applied to {}",
        sluice::config::redact_url(config.store.url.expose_secret())
    );
    Ok(())
}

pub(super) async fn check_plugin(
    config: &Config,
    file: PathBuf,
    plugin_config: String,
) -> anyhow::Result<()> {
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
    use sluice::plugins::RequestKind;
    let both = "/v1/completions, /v1/chat/completions, /v1/messages and /v1/responses";
    let request_routes = match (
        hooks.reads(RequestKind::Chat),
        hooks.reads(RequestKind::Pooling),
        hooks.reads(RequestKind::Conversation),
    ) {
        (true, true, true) => {
            "every route (generation, embeddings, rerank, score, classify, pooling, tokenize, the Messages and Responses APIs' conversations)"
        }
        (true, true, false) => {
            "every route but the Messages and Responses APIs (built against 0.3.0: on those it is skipped when fail-open, refuses when fail-closed)"
        }
        (true, false, _) => {
            "/v1/completions and /v1/chat/completions only (built against 0.2.0: on the other routes it is skipped when fail-open, refuses when fail-closed)"
        }
        (false, _, _) => {
            "/v1/completions only (built against 0.1.0: on the other routes it is skipped when fail-open, refuses when fail-closed)"
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
            "/v1/chat/completions, /v1/messages and /v1/responses",
        ),
    ] {
        match served {
            true => println!("  {hook} yes, on {routes}"),
            false => println!("  {hook} no"),
        }
    }
    Ok(())
}

pub(super) fn check_config(config: &Config) {
    println!("configuration is valid");
    println!("  listen:   {}", config.server.listen);
    println!(
        "  store:    {}",
        sluice::config::redact_url(config.store.url.expose_secret())
    );
    println!("  cache:    {}", describe_cache(config));
    println!("  queue:    {}", describe_queue(config));
    let urls = |urls: &[url::Url]| {
        urls.iter()
            .map(url::Url::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if config.models.is_empty() {
        println!(
            "  upstream: {} (every model; balance {})",
            urls(&config.upstream.urls),
            config.upstream.balance.name()
        );
    } else {
        println!("  upstream: not used ([[models]] lists the models)");
        for model in &config.models {
            let aliases = match model.aliases.is_empty() {
                true => String::new(),
                false => format!(" (aliases {})", model.aliases.join(", ")),
            };
            let served_as = model
                .upstream_model
                .as_deref()
                .map(|m| format!(", served as {m}"))
                .unwrap_or_default();
            println!(
                "  model:    {}{aliases}: {} (balance {}{served_as})",
                model.name,
                urls(&model.endpoints),
                model.balance.name()
            );
        }
    }
    println!(
        "  plugins:  {}",
        config
            .plugins
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
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
