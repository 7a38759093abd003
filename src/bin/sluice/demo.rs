//! `sluice demo`: the gateway in embedded mode with a simulated vLLM in the
//! same process, a fresh demo key, and ready-to-paste `curl` commands and an
//! OpenAI SDK snippet.

use std::net::SocketAddr;
use std::time::Duration;

use sluice::app::Gateway;
use sluice::config::{Config, StoreConfig};
use sluice_simulator::{Simulator, SimulatorConfig};

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub token_delay: Duration,
}

pub async fn run(mut config: Config, options: DemoOptions) -> anyhow::Result<()> {
    let simulator = Simulator::start(SimulatorConfig {
        token_delay: options.token_delay,
        ..SimulatorConfig::default()
    })
    .await?;
    let db = std::env::temp_dir().join(format!("sluice-demo-{}.db", std::process::id()));
    config.store = StoreConfig {
        url: format!("sqlite://{}", db.display()).into(),
        ..config.store
    };
    config.upstream.urls = vec![simulator.url().parse()?];
    config.server.listen = options.listen;

    let listener = sluice::edge::server::bind(options.listen, config.server.listen_backlog)
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot listen on {}: {err} (pick another address with --listen)",
                options.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let gateway = Gateway::start(config).await?;
    let key = sluice::tenancy::keys::create_key(gateway.store().as_ref(), "demo").await?;

    println!(
        "sluice demo: gateway on http://{addr}, simulated vLLM on {}",
        simulator.url()
    );
    println!("demo API key (shown once): {}", key.secret);
    println!();
    println!("Stream a completion:");
    println!();
    println!("  curl -N http://{addr}/v1/completions \\");
    println!("    -H 'Authorization: Bearer {}' \\", key.secret);
    println!("    -H 'Content-Type: application/json' \\");
    println!(
        "    -d '{{\"model\": \"sim-llama\", \"prompt\": \"Once upon a time\", \"max_tokens\": 24, \"temperature\": 0, \"stream\": true}}'"
    );
    println!();
    println!("Stream a chat:");
    println!();
    println!("  curl -N http://{addr}/v1/chat/completions \\");
    println!("    -H 'Authorization: Bearer {}' \\", key.secret);
    println!("    -H 'Content-Type: application/json' \\");
    println!(
        "    -d '{{\"model\": \"sim-llama\", \"messages\": [{{\"role\": \"user\", \"content\": \"Tell me about the river\"}}], \"max_tokens\": 24, \"temperature\": 0, \"stream\": true}}'"
    );
    println!();
    println!("Embed two texts (rerank, score, classify and tokenize work the same way):");
    println!();
    println!("  curl http://{addr}/v1/embeddings \\");
    println!("    -H 'Authorization: Bearer {}' \\", key.secret);
    println!("    -H 'Content-Type: application/json' \\");
    println!(
        "    -d '{{\"model\": \"sim-llama\", \"input\": [\"the river\", \"the sea\"], \"dimensions\": 8}}'"
    );
    println!();
    println!("Or with the OpenAI Python SDK (pip install openai):");
    println!();
    println!("  from openai import OpenAI");
    println!(
        "  client = OpenAI(base_url=\"http://{addr}/v1\", api_key=\"{}\")",
        key.secret
    );
    println!("  for chunk in client.chat.completions.create(model=\"sim-llama\", stream=True,");
    println!(
        "          messages=[{{\"role\": \"user\", \"content\": \"Tell me about the river\"}}]):"
    );
    println!("      print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)");
    println!();
    println!(
        "Run a request twice: the second answer streams from the cache (requests that sample, without temperature 0 or a seed, are not cached). Metrics: http://{addr}/metrics. Ctrl-C stops."
    );

    let store = gateway.store();
    gateway
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Closed first, so SQLite leaves no write-ahead log behind; then the
    // database and whatever files SQLite kept beside it.
    store.close().await;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = db.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    drop(simulator);
    Ok(())
}
