//! Plugin benchmark: the cost of the on-token hook per token with one and
//! with four plugins, of instantiating a plugin per request, and end-to-end
//! streams per second with every example plugin enabled against none.
//!
//!     scripts/build-plugins.sh && cargo bench --bench plugins

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::config::{Config, OnError, PluginConfig};
use sluice::observe::metrics::MetricsRegistry;
use sluice::pipeline::filter_chain::{FilterChain, Filtered};
use sluice::pipeline::policy::{Policy, RequestContext};
use sluice::plugins::PluginHost;
use sluice::protocol::{Chunk, InferenceRequest, Route};
use sluice::tenancy::Identity;
use sluice_simulator::{Simulator, SimulatorConfig};

fn wasm(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/wasm")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-plugins.sh",
        path.display()
    );
    path
}

fn plugin(name: &str, file: &str, config: serde_json::Value) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        path: wasm(file),
        on_error: OnError::FailClosed,
        max_memory_bytes: 16 << 20,
        // Valgrind runs guests ~50 times slower (BENCH_PLUGIN_TIMEOUT_MS=5000).
        timeout: Duration::from_millis(
            std::env::var("BENCH_PLUGIN_TIMEOUT_MS")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(50),
        ),
        keys: Vec::new(),
        config_json: config.to_string(),
    }
}

fn all_plugins() -> Vec<PluginConfig> {
    vec![
        plugin("pii", "pii_redactor", json!({})),
        plugin(
            "guard",
            "prompt_guard",
            json!({"block": ["ignore previous instructions"]}),
        ),
        plugin("normalizer", "cache_key_normalizer", json!({})),
        plugin("censor", "token_censor", json!({"words": ["darn", "heck"]})),
    ]
}

fn ctx() -> RequestContext {
    RequestContext {
        request_id: "bench".into(),
        identity: Identity::unlimited("key_bench", "bench"),
        route: "/v1/completions",
        transport: "sse",
        trace: opentelemetry::Context::new(),
        lane: Default::default(),
    }
}

fn chunk(i: usize) -> Chunk {
    let body = json!({"id": "cmpl-bench", "object": "text_completion", "created": 1, "model": "sim-llama",
        "choices": [{"index": 0, "text": format!(" word{}", i % 50), "logprobs": null, "finish_reason": null, "stop_reason": null, "prompt_token_ids": null, "token_ids": null}],
        "usage": null});
    Chunk::from_payload(body.to_string().as_bytes())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn micros(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e6)
}

/// No file watching; a smaller instance pool when asked, so valgrind can map
/// it (BENCH_MAX_INSTANCES=64).
fn bench_plugin_host(config: &mut Config) {
    config.plugin_host.watch = false;
    if let Some(n) = std::env::var("BENCH_MAX_INSTANCES")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        config.plugin_host.max_instances = n;
    }
}

async fn host(plugins: Vec<PluginConfig>) -> Arc<PluginHost> {
    let mut config = Config {
        plugins,
        ..Default::default()
    };
    bench_plugin_host(&mut config);
    let registry = MetricsRegistry::default();
    let metrics = Arc::new(sluice::plugins::PluginFamilies::new(&registry));
    PluginHost::start(config.plugin_setup(), metrics)
        .await
        .expect("plugins load")
}

/// Median time to filter one chunk through `n` censor plugins.
async fn per_chunk(n: usize) -> Duration {
    let plugins = (0..n)
        .map(|i| {
            plugin(
                &format!("censor{i}"),
                "token_censor",
                json!({"words": ["darn", "heck"]}),
            )
        })
        .collect();
    let host = host(plugins).await;
    let chunks: Vec<Chunk> = (0..64).map(chunk).collect();
    let mut samples = Vec::new();
    for _ in 0..200 {
        let mut chain = FilterChain::new(host.token_filters(&ctx()));
        for c in &chunks {
            let started = Instant::now();
            let out = chain.apply(c.clone()).await.expect("filters");
            samples.push(started.elapsed());
            assert!(matches!(out, Filtered::Chunk(_)));
        }
    }
    median(samples)
}

async fn streams_per_second(plugins: Vec<PluginConfig>, hits: bool, seconds: u64) -> f64 {
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(1),
        first_token_delay: Duration::from_millis(1),
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    let dir = tempfile::tempdir().expect("dir");
    let mut config = Config::default();
    config.store.url = format!("sqlite://{}", dir.path().join("b.db").display()).into();
    config.upstream.urls = vec![sim.url().parse().expect("url")];
    config.plugins = plugins;
    bench_plugin_host(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/v1/completions",
        listener.local_addr().expect("addr")
    );
    let gateway = sluice::Gateway::start(config).await.expect("gateway");
    let key = sluice::tenancy::keys::create_key(gateway.store().as_ref(), "bench")
        .await
        .expect("key")
        .secret;
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let next = Arc::new(AtomicU64::new(0));
    let run = |seconds: u64| {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let workers: Vec<_> = (0..32)
            .map(|_| {
                let (client, url, key, next) = (client.clone(), url.clone(), key.clone(), next.clone());
                tokio::spawn(async move {
                    let mut done = 0u64;
                    while Instant::now() < deadline {
                        let n = if hits { 0 } else { next.fetch_add(1, Ordering::Relaxed) };
                        let body = json!({"model": "sim-llama", "prompt": format!("Write to jane@example.com about item {n}"), "max_tokens": 32, "stream": true});
                        let response = client.post(&url).bearer_auth(&key).json(&body).send().await.expect("send");
                        assert!(response.status().is_success(), "{}", response.status());
                        let bytes = response.bytes().await.expect("body");
                        assert!(bytes.ends_with(b"data: [DONE]\n\n"));
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        async move {
            let started = Instant::now();
            let mut total = 0;
            for w in workers {
                total += w.await.expect("worker");
            }
            (total, total as f64 / started.elapsed().as_secs_f64())
        }
    };
    run(1).await; // warm up (and fill the cache)
    let (streams, per_second) = run(seconds).await;
    if std::env::var_os("BENCH_ONLY_HITS").is_some() {
        println!("{streams} streams");
    }
    per_second
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if let Ok(which) = std::env::var("BENCH_ONLY_HITS") {
            let plugins: Vec<PluginConfig> = all_plugins().into_iter().filter(|p| which == "all" || which.split(',').any(|w| w == p.name)).collect();
            let seconds = std::env::var("BENCH_HIT_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
            let with = streams_per_second(plugins, true, seconds).await;
            println!("hits with {which}: {with:.0}/s");
            return;
        }
        let none = per_chunk(0).await;
        let one = per_chunk(1).await;
        let four = per_chunk(4).await;
        println!("on-token hook, median per chunk (one token):");
        println!("| plugins | per chunk (µs) | added by plugins (µs) | per plugin (µs) |");
        println!("|---|---|---|---|");
        println!("| 0 | {} | - | - |", micros(none));
        println!("| 1 | {} | {} | {} |", micros(one), micros(one - none), micros(one - none));
        println!("| 4 | {} | {} | {} |", micros(four), micros(four - none), micros((four - none) / 4));

        let host = host(all_plugins()).await;
        println!("\nper-request instantiation (fresh store, instantiate, init), median:");
        let mut samples: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
        for _ in 0..500 {
            for (name, took) in host.time_instantiation().await {
                samples.entry(name).or_default().push(took);
            }
        }
        for (name, times) in samples {
            println!("  {:<10} {} µs", name, micros(median(times)));
        }
        let mut samples = Vec::new();
        let body = br#"{"model":"sim-llama","prompt":"Write to jane@example.com","max_tokens":32}"#;
        for _ in 0..500 {
            let mut request = InferenceRequest::parse(Route::Completions, body).expect("request");
            let started = Instant::now();
            // As the pipeline runs them: both hooks in one phase, sharing one conversion of the request.
            let _ = host.admit(&ctx(), &mut request, true).await.expect("on-request and cache-key");
            samples.push(started.elapsed());
        }
        println!("  all request hooks of the 4 example plugins (on-request ×2, cache-key): {} µs", micros(median(samples)));

        for (label, hits) in [("cache misses (simulated vLLM, 1 ms/token)", false), ("cache hits", true)] {
            let without = streams_per_second(Vec::new(), hits, 5).await;
            let with = streams_per_second(all_plugins(), hits, 5).await;
            println!(
                "\nend to end, {label}, 32 clients, 32-token streams: {without:.0} streams/s without plugins, {with:.0} with all four ({:.0}%)",
                with / without * 100.0
            );
        }
    });
}
