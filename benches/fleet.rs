//! Fleet benchmark: balancing modes on four simulated vLLM replicas with
//! prefix caching.
//!
//! Each replica holds a prefix cache of `--cache-blocks` blocks of 16 words
//! (least recently used evicted) and prefills uncached prompt words at
//! `--prefill-us` each. The workload is chats, each with one of 20 system
//! prompts of 200 words and a fresh user message, from 16 clients at once.
//! For each balancing mode (fresh replicas, cold caches, same workload) it
//! reports the prefix-cache hit ratio (cached / looked-up prompt tokens,
//! from the replicas), its share of the ideal (every prefix always on the
//! replica that has it), TTFT p50/p99, and the busiest replica's requests
//! against the mean.
//!
//!     cargo bench --bench fleet
//!     cargo bench --bench fleet -- --requests 800 --cache-blocks 80

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::config::{Balance, Config, ModelConfig};
use sluice_simulator::{Simulator, SimulatorConfig};

const SYSTEM_PROMPTS: usize = 20;
const SYSTEM_WORDS: usize = 200;
const USER_WORDS: usize = 20;
const REPLICAS: usize = 4;
const CLIENTS: usize = 16;

struct Args {
    requests: usize,
    cache_blocks: usize,
    prefill: Duration,
}

fn args() -> Args {
    let mut args = Args {
        requests: 800,
        cache_blocks: 80,
        prefill: Duration::from_micros(100),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--requests" => args.requests = value().parse().unwrap_or(args.requests),
            "--cache-blocks" => args.cache_blocks = value().parse().unwrap_or(args.cache_blocks),
            "--prefill-us" => args.prefill = Duration::from_micros(value().parse().unwrap_or(100)),
            _ => {}
        }
    }
    args
}

/// `n` words, the first naming `seed` (so that texts of two seeds differ from the start).
fn words(seed: usize, n: usize) -> String {
    const WORDS: &[&str] = &[
        "river", "stone", "light", "valley", "north", "bridge", "quiet", "harbor", "silver",
        "field", "morning", "tide", "lantern", "mill", "gate", "wind",
    ];
    std::iter::once(format!("text-{seed}"))
        .chain((1..n).map(|i| WORDS[(seed * 31 + i * 7 + i / 3) % WORDS.len()].to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Outcome {
    ttft: Vec<Duration>,
    per_replica: Vec<usize>,
    queried: u64,
    hits: u64,
}

async fn run(mode: Balance, args: &Args) -> Outcome {
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(
            Simulator::start(SimulatorConfig {
                token_delay: Duration::from_millis(5),
                first_token_delay: Duration::from_millis(10),
                prefill_per_token: args.prefill,
                prefix_cache_blocks: args.cache_blocks,
                ..SimulatorConfig::default()
            })
            .await
            .expect("replica"),
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default();
    config.store.url = format!("sqlite://{}", dir.path().join("bench.db").display()).into();
    config.cache.url = "off".to_string().into();
    config.log.level = "warn".into();
    config.worker.concurrency = std::num::NonZeroUsize::new(512).expect("not zero");
    config.upstream.health_interval = Duration::from_millis(200);
    config.models = vec![ModelConfig {
        name: "sim-llama".into(),
        aliases: Vec::new(),
        endpoints: replicas
            .iter()
            .map(|r| r.url().parse().expect("url"))
            .collect(),
        upstream_model: None,
        balance: mode,
        continue_streams: true,
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let gateway = sluice::Gateway::start(config).await.expect("gateway");
    let key = sluice::tenancy::keys::create_key(gateway.store().as_ref(), "bench")
        .await
        .expect("key")
        .secret;
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    // Let the first scrape of vLLM's metrics happen.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = args.requests;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, key, next) = (client.clone(), url.clone(), key.clone(), next.clone());
            tokio::spawn(async move {
                let mut ttfts = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return ttfts;
                    }
                    // Which system prompt: spread pseudo-randomly, not in turn
                    // (a turn of 20 over 4 replicas would let round robin split them by chance).
                    let prompt = (i.wrapping_mul(2_654_435_761) >> 7) % SYSTEM_PROMPTS;
                    let body = json!({"model": "sim-llama", "max_tokens": 8, "stream": true, "messages": [
                        {"role": "system", "content": words(prompt, SYSTEM_WORDS)},
                        {"role": "user", "content": format!("question {i} {}", words(1000 + i, USER_WORDS - 2))},
                    ]});
                    let sent = Instant::now();
                    let mut response = client
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                        .expect("request");
                    assert!(response.status().is_success(), "{}", response.status());
                    let mut first = None;
                    while let Ok(Some(_)) = response.chunk().await {
                        first.get_or_insert_with(|| sent.elapsed());
                    }
                    ttfts.push(first.unwrap_or_default());
                }
            })
        })
        .collect();
    let mut ttft = Vec::new();
    for task in tasks {
        ttft.extend(task.await.expect("client"));
    }
    ttft.sort();
    let per_replica = replicas.iter().map(|r| r.received().len()).collect();
    let (queried, hits) = replicas
        .iter()
        .map(|r| r.prefix_cache_tokens())
        .fold((0, 0), |(q, h), (rq, rh)| (q + rq, h + rh));
    Outcome {
        ttft,
        per_replica,
        queried,
        hits,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        // The simulator renders a chat as "<system> …\n<user> …": the system
        // prompt's whole 16-word blocks are what a replica can have cached.
        let prompt_words = (1 + SYSTEM_WORDS + 1 + USER_WORDS) as f64;
        let cacheable = ((1 + SYSTEM_WORDS) / 16 * 16) as f64;
        let n = args.requests as f64;
        let ideal = (n - SYSTEM_PROMPTS as f64) * cacheable / (n * prompt_words);
        println!(
            "sluice fleet benchmark: {REPLICAS} replicas, {} requests from {CLIENTS} clients, {SYSTEM_PROMPTS} system prompts of {SYSTEM_WORDS} words, prefix cache {} blocks of 16 words per replica, prefill {} µs per uncached word\n",
            args.requests,
            args.cache_blocks,
            args.prefill.as_micros()
        );
        println!("ideal prefix-cache hit ratio: {:.1} %\n", ideal * 100.0);
        println!("| balance | hit ratio | of ideal | TTFT p50 (ms) | TTFT p99 (ms) | busiest replica / mean | requests per replica |");
        println!("|---|---|---|---|---|---|---|");
        for (name, mode) in [
            ("round_robin", Balance::RoundRobin),
            ("least_outstanding", Balance::LeastOutstanding),
            ("load", Balance::Load),
            ("prefix", Balance::Prefix),
        ] {
            let outcome = run(mode, &args).await;
            let ratio = outcome.hits as f64 / outcome.queried.max(1) as f64;
            let mean = outcome.per_replica.iter().sum::<usize>() as f64 / REPLICAS as f64;
            let max = *outcome.per_replica.iter().max().unwrap_or(&0) as f64;
            println!(
                "| {name} | {:.1} % | {:.0} % | {:.2} | {:.2} | {:.2} | {:?} |",
                ratio * 100.0,
                ratio / ideal * 100.0,
                pct(&outcome.ttft, 0.5),
                pct(&outcome.ttft, 0.99),
                max / mean,
                outcome.per_replica
            );
        }
        println!(
            "\nprefill model: a request that finds its system prompt cached skips {:.1} ms of prefill",
            cacheable * args.prefill.as_secs_f64() * 1000.0
        );
    });
}
