//! Embeddings through sluice against the simulated vLLM called directly, in
//! one run: the latency a cache miss adds (at 1 and at 100 concurrent
//! clients, each sending requests back to back) and the requests per second
//! cache hits are served at. Each request embeds a batch of texts (32 by
//! default) as the OpenAI SDK asks for them (`encoding_format: "base64"`);
//! the simulator answers at once, so the numbers are the gateway's own cost.
//!
//!     cargo bench --bench embeddings
//!     cargo bench --bench embeddings -- --batch 32 --dimensions 384 --format float
//!
//! Other flags: --rounds N (requests per client; 2000 at one client, 40 at
//! 100), --hit-seconds N (5), --hit-clients N (32).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_simulator::{Simulator, SimulatorConfig};

struct Args {
    batch: usize,
    dimensions: usize,
    format: String,
    rounds: Option<usize>,
    hit_seconds: u64,
    hit_clients: usize,
}

impl Args {
    fn parse() -> Self {
        let mut args = Self {
            batch: 32,
            dimensions: 384,
            format: "base64".into(),
            rounds: None,
            hit_seconds: 5,
            hit_clients: 32,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().expect("a value after the flag");
            match flag.as_str() {
                "--batch" => args.batch = value().parse().expect("--batch N"),
                "--dimensions" => args.dimensions = value().parse().expect("--dimensions N"),
                "--format" => args.format = value(),
                "--rounds" => args.rounds = Some(value().parse().expect("--rounds N")),
                "--hit-seconds" => args.hit_seconds = value().parse().expect("--hit-seconds N"),
                "--hit-clients" => args.hit_clients = value().parse().expect("--hit-clients N"),
                // `cargo bench` passes --bench.
                _ => {}
            }
        }
        args
    }

    fn body(&self, n: u64) -> Value {
        let input: Vec<String> = (0..self.batch)
            .map(|i| format!("benchmark document {n}-{i}: a passage of a few words to embed"))
            .collect();
        json!({"model": "sim-llama", "input": input, "encoding_format": self.format})
    }
}

struct Target {
    url: String,
    key: Option<String>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

async fn one(client: &reqwest::Client, target: &Target, body: &Value) -> Duration {
    let mut request = client
        .post(format!("{}/v1/embeddings", target.url))
        .json(body);
    if let Some(key) = &target.key {
        request = request.bearer_auth(key);
    }
    let sent = Instant::now();
    let response = request.send().await.expect("request");
    assert!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    response.bytes().await.expect("body");
    sent.elapsed()
}

/// `clients` clients, each sending `rounds` unique requests back to back.
async fn misses(
    client: &reqwest::Client,
    target: &Arc<Target>,
    args: &Arc<Args>,
    clients: usize,
    rounds: usize,
) -> Vec<Duration> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, target, args) = (client.clone(), target.clone(), args.clone());
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let body = args.body(NEXT.fetch_add(1, Ordering::Relaxed));
                    times.push(one(&client, &target, &body).await);
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

fn main() {
    let args = Arc::new(Args::parse());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let sim = Simulator::start(SimulatorConfig {
            embedding_dimensions: args.dimensions,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = sluice::config::Config::default();
        config.store.url = format!("sqlite://{}", dir.path().join("bench.db").display()).into();
        config.upstream.urls = vec![sim.url().parse().unwrap()];
        config.log.level = "warn".into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gateway = sluice::Gateway::start(config).await.unwrap();
        let store = gateway.store();
        let key = sluice::tenancy::keys::create_key(store.as_ref(), "bench").await.unwrap();
        tokio::spawn(gateway.serve(listener, std::future::pending()));
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(512)
            .build()
            .unwrap();
        let direct = Arc::new(Target { url: sim.url(), key: None });
        let sluice = Arc::new(Target { url: format!("http://{addr}"), key: Some(key.secret) });
        let answer = client
            .post(format!("{}/v1/embeddings", sluice.url))
            .bearer_auth(sluice.key.as_deref().unwrap_or_default())
            .json(&args.body(u64::MAX))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        println!(
            "embeddings: {} inputs a request, {} dimensions, {} ({} bytes an answer)\n",
            args.batch,
            args.dimensions,
            args.format,
            answer.len()
        );
        println!("| clients | path | p50 (ms) | p99 (ms) | added p50 | added p99 |");
        println!("|---|---|---|---|---|---|");
        for clients in [1, 100] {
            let rounds = args.rounds.unwrap_or(if clients == 1 { 2000 } else { 40 });
            // Warm both paths' connections, then measure them alternately.
            misses(&client, &direct, &args, clients, 5).await;
            misses(&client, &sluice, &args, clients, 5).await;
            let d = misses(&client, &direct, &args, clients, rounds).await;
            let s = misses(&client, &sluice, &args, clients, rounds).await;
            let (dp50, dp99, sp50, sp99) = (quantile(&d, 0.5), quantile(&d, 0.99), quantile(&s, 0.5), quantile(&s, 0.99));
            println!("| {clients} | direct | {dp50:.3} | {dp99:.3} | | |");
            println!(
                "| {clients} | sluice (miss) | {sp50:.3} | {sp99:.3} | {:+.3} | {:+.3} |",
                sp50 - dp50,
                sp99 - dp99
            );
        }

        // Hits: one request, asked again and again by every client.
        let body = Arc::new(args.body(u64::MAX));
        let served = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(args.hit_seconds);
        let tasks: Vec<_> = (0..args.hit_clients)
            .map(|_| {
                let (client, target, body, served) = (client.clone(), sluice.clone(), body.clone(), served.clone());
                tokio::spawn(async move {
                    while Instant::now() < until {
                        one(&client, &target, &body).await;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let started = Instant::now();
        for task in tasks {
            task.await.unwrap();
        }
        let rate = served.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        let upstream_calls = sim.received().len();
        println!(
            "\ncache hits: {rate:.0} requests/s ({} clients; the simulator was called {upstream_calls} times in the whole run)",
            args.hit_clients
        );
    });
}
