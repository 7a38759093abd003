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
//!
//! With `--failover`, it measures instead how long a stream waits when its
//! replica dies mid-answer: 50 greedy chat streams over two replicas, the
//! first killed once every stream has had 20 chunks; for each stream that
//! was on it, the time from the kill to its next chunk reaching the client
//! (continued on the other replica), against the streams that were not.
//!
//!     cargo bench --bench fleet -- --failover

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
    failover: bool,
    requests: usize,
    cache_blocks: usize,
    prefill: Duration,
}

fn args() -> Args {
    let mut args = Args {
        failover: false,
        requests: 800,
        cache_blocks: 80,
        prefill: Duration::from_micros(100),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--failover" => args.failover = true,
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

/// A gateway with no cache in front of `replicas` (one model, `balance`),
/// customized; its URL, a key, and the folder of its database.
async fn start_gateway(
    replicas: &[Simulator],
    balance: Balance,
    customize: impl FnOnce(&mut Config),
) -> (String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default();
    config.store.url = format!("sqlite://{}", dir.path().join("bench.db").display()).into();
    config.cache.url = "off".to_string().into();
    config.log.level = "error".into();
    config.models = vec![ModelConfig {
        name: "sim-llama".into(),
        aliases: Vec::new(),
        endpoints: replicas
            .iter()
            .map(|r| r.url().parse().expect("url"))
            .collect(),
        upstream_model: None,
        balance,
        continue_streams: true,
        capacity: None,
    }];
    customize(&mut config);
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
    (url, key, dir)
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
    let (url, key, _dir) = start_gateway(&replicas, mode, |config| {
        config.worker.concurrency = std::num::NonZeroUsize::new(512).expect("not zero");
        config.upstream.health_interval = Duration::from_millis(200);
    })
    .await;
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
    match sorted.len() {
        0 => f64::NAN,
        n => sorted[((n as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0,
    }
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        if args.failover {
            return failover().await;
        }
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

/// Streams, rounds and the chunk at which the replica dies, for `--failover`.
const FAILOVER_STREAMS: usize = 50;
const FAILOVER_ROUNDS: usize = 5;
const KILL_AFTER_CHUNKS: usize = 20;

async fn failover() {
    println!(
        "sluice failover benchmark: {FAILOVER_STREAMS} greedy chat streams of 200 tokens over 2 replicas (10 ms per token), the first replica killed after {KILL_AFTER_CHUNKS} chunks of every stream; {FAILOVER_ROUNDS} rounds\n"
    );
    let (mut continued, mut undisturbed) = (Vec::new(), Vec::new());
    for _ in 0..FAILOVER_ROUNDS {
        let (c, u) = failover_round().await;
        continued.extend(c);
        undisturbed.extend(u);
    }
    continued.sort();
    undisturbed.sort();
    println!("| streams | count | kill to next chunk p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---|---|---|---|");
    for (name, gaps) in [
        ("on the killed replica (continued)", &continued),
        ("on the other replica", &undisturbed),
    ] {
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            gaps.len(),
            pct(gaps, 0.5),
            pct(gaps, 0.99),
            pct(gaps, 1.0)
        );
    }
}

/// One round: the gaps from the kill to the next chunk, for the streams on
/// the killed replica and for the others.
async fn failover_round() -> (Vec<Duration>, Vec<Duration>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let config = SimulatorConfig {
            token_delay: Duration::from_millis(10),
            first_token_delay: Duration::from_millis(20),
            ..SimulatorConfig::default()
        };
        replicas.push(Simulator::start(config).await.expect("replica"));
    }
    let (url, key, _dir) = start_gateway(&replicas, Balance::RoundRobin, |_| {}).await;
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let ready = Arc::new(AtomicUsize::new(0));
    let all_ready = Arc::new(tokio::sync::Notify::new());
    let streams: Vec<_> = (0..FAILOVER_STREAMS)
        .map(|i| {
            let body = json!({"model": "sim-llama", "max_tokens": 200, "ignore_eos": true,
                "temperature": 0, "stream": true,
                "messages": [{"role": "user", "content": format!("story {i}")}]});
            let request = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body);
            let (ready, all_ready) = (ready.clone(), all_ready.clone());
            tokio::spawn(async move {
                let mut response = request.send().await.expect("request");
                let id = response
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let (mut arrivals, mut chunks) = (Vec::new(), 0);
                while let Ok(Some(bytes)) = response.chunk().await {
                    arrivals.push(Instant::now());
                    let before = chunks;
                    chunks += bytes.windows(6).filter(|w| w == b"data: ").count();
                    if before < KILL_AFTER_CHUNKS
                        && chunks >= KILL_AFTER_CHUNKS
                        && ready.fetch_add(1, Ordering::SeqCst) + 1 == FAILOVER_STREAMS
                    {
                        all_ready.notify_one();
                    }
                }
                (id, arrivals)
            })
        })
        .collect();
    all_ready.notified().await;
    let killed_at = Instant::now();
    replicas[0].kill();
    let on_killed: std::collections::HashSet<String> = replicas[0]
        .received()
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let (mut continued, mut undisturbed) = (Vec::new(), Vec::new());
    for stream in streams {
        let (id, arrivals) = stream.await.expect("client");
        let Some(next) = arrivals.iter().find(|at| **at > killed_at) else {
            continue;
        };
        let gap = *next - killed_at;
        match on_killed.contains(&id) {
            true => continued.push(gap),
            false => undisturbed.push(gap),
        }
    }
    (continued, undisturbed)
}
