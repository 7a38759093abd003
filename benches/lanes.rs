//! Lanes benchmark: interactive traffic, a batch and fair shares on one
//! fleet of two simulated vLLM replicas with a capacity model (each runs
//! `--seqs` sequences at once, more wait; every token, the first too, slows
//! by `1 + 0.5 × running / seqs`). Embedded mode, one process.
//!
//! First, interactive load at half the fleet's capacity (closed-loop
//! streaming clients, one per seat of half the fleet), alone, then with a
//! `--lines`-line batch submitted: time to first token p50/p99 each way,
//! and the ratio. Second, the batch's lines per second against the ideal:
//! the seats the interactive load leaves, over a line's mean duration at
//! that load. Third, two keys flooding the fleet at 4 × its capacity, one
//! with three times the other's clients: each key's share of the completions.
//!
//! ```sh
//! cargo bench --bench lanes
//! cargo bench --bench lanes -- --seqs 16 --lines 5000 --secs 15 --token-ms 5
//! ```
//!
//! (`--token-ms`: the replicas' time per token, twice that to the first.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::config::{Balance, Config, ModelConfig};
use sluice_simulator::{Simulator, SimulatorConfig};

const MODEL: &str = "sim-llama";
const REPLICAS: usize = 2;

struct Args {
    seqs: usize,
    lines: usize,
    secs: u64,
    token: Duration,
}

fn args() -> Args {
    let mut args = Args {
        seqs: 16,
        lines: 5000,
        secs: 15,
        token: Duration::from_millis(5),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--seqs" => args.seqs = value().parse().unwrap_or(args.seqs),
            "--lines" => args.lines = value().parse().unwrap_or(args.lines),
            "--secs" => args.secs = value().parse().unwrap_or(args.secs),
            "--token-ms" => args.token = Duration::from_millis(value().parse().unwrap_or(5)),
            _ => {}
        }
    }
    args
}

struct Fleet {
    url: String,
    keys: Vec<String>,
    http: reqwest::Client,
    _replicas: Vec<Simulator>,
    _dir: tempfile::TempDir,
}

async fn fleet(seqs: usize, token: Duration) -> Fleet {
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(
            Simulator::start(SimulatorConfig {
                token_delay: token,
                first_token_delay: token * 2,
                max_num_seqs: seqs,
                load_slowdown: 0.5,
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
    config.log.level = "error".into();
    config.upstream.health_interval = Duration::from_millis(100);
    config.upstream.capacity = std::num::NonZeroU32::new(seqs as u32).expect("seqs > 0");
    config.batch.poll = Duration::from_millis(50);
    config.models = vec![ModelConfig {
        name: MODEL.into(),
        aliases: Vec::new(),
        endpoints: replicas
            .iter()
            .map(|r| r.url().parse().expect("url"))
            .collect(),
        upstream_model: None,
        balance: Balance::Load,
        continue_streams: true,
        capacity: None,
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let gateway = sluice::Gateway::start(config).await.expect("gateway");
    let mut keys = Vec::new();
    for name in ["interactive", "batch", "flood-a", "flood-b"] {
        let key = sluice::tenancy::keys::create_key(gateway.store().as_ref(), name)
            .await
            .expect("key");
        keys.push(key.secret);
    }
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    Fleet {
        url,
        keys,
        http: reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .expect("client"),
        _replicas: replicas,
        _dir: dir,
    }
}

/// `clients` closed-loop streaming clients of `key` until `stop`: each
/// request's time to first token, and when it ended.
async fn clients(
    fleet: &Fleet,
    key: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(Duration, Instant)> {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (http, url, key, stop) = (fleet.http.clone(), fleet.url.clone(), key.to_string(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let body = json!({"model": MODEL, "prompt": format!("client {c} asks {i}"), "max_tokens": 16, "ignore_eos": true, "stream": true});
                    let sent = Instant::now();
                    let Ok(mut response) = http.post(format!("{url}/v1/completions")).bearer_auth(&key).json(&body).send().await else { continue };
                    let mut first = None;
                    while let Ok(Some(_)) = response.chunk().await {
                        first.get_or_insert_with(|| sent.elapsed());
                    }
                    if let Some(first) = first {
                        seen.push((first, Instant::now()));
                    }
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client"));
    }
    all
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn ttfts(seen: &[(Duration, Instant)]) -> Vec<Duration> {
    let mut ttft: Vec<Duration> = seen.iter().map(|(t, _)| *t).collect();
    ttft.sort();
    ttft
}

/// Uploads and starts a batch of `lines` completions; its id.
async fn submit_batch(fleet: &Fleet, lines: usize) -> String {
    let content: String = (0..lines)
        .map(|i| format!("{}\n", json!({"custom_id": format!("l{i}"), "method": "POST", "url": "/v1/completions", "body": {"model": MODEL, "prompt": format!("line {i}"), "max_tokens": 16, "ignore_eos": true}})))
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(content.into_bytes()).file_name("lines.jsonl"),
        );
    let key = &fleet.keys[1];
    let file: Value = fleet
        .http
        .post(format!("{}/v1/files", fleet.url))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("file");
    let batch: Value = fleet
        .http
        .post(format!("{}/v1/batches", fleet.url))
        .bearer_auth(key)
        .json(&json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}))
        .send()
        .await
        .expect("batch")
        .json()
        .await
        .expect("batch");
    batch["id"].as_str().expect("id").to_string()
}

async fn batch_state(fleet: &Fleet, id: &str) -> Value {
    fleet
        .http
        .get(format!("{}/v1/batches/{id}", fleet.url))
        .bearer_auth(&fleet.keys[1])
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("batch")
}

#[tokio::main]
async fn main() {
    let args = args();
    let capacity = REPLICAS * args.seqs;
    let interactive = capacity / 2;
    let window = Duration::from_secs(args.secs);
    println!(
        "two replicas of {} sequences ({capacity} in all), {:?} per token; interactive load: {interactive} streaming clients",
        args.seqs, args.token
    );

    // 1 and 2: interactive alone, then with the batch.
    let fleet = fleet(args.seqs, args.token).await;
    let stop = Arc::new(AtomicBool::new(false));
    let alone = {
        let stop2 = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            stop2.store(true, Ordering::Relaxed);
        });
        clients(&fleet, &fleet.keys[0], interactive, stop).await
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let key = fleet.keys[0].clone();
        let stop = stop.clone();
        let fleet = &fleet;
        async move { clients(fleet, &key, interactive, stop).await }
    };
    let batch = async {
        // Interactive clients first reach their steady state.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let id = submit_batch(&fleet, args.lines).await;
        let ended = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let state = batch_state(&fleet, &id).await;
            if state["status"] == "completed" || state["status"] == "failed" {
                break state;
            }
        };
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        (ended, started, took)
    };
    let (with_batch, (ended, batch_started, batch_took)) = tokio::join!(load, batch);
    let during: Vec<_> = with_batch
        .into_iter()
        .filter(|(_, at)| {
            *at > batch_started + Duration::from_secs(1) && *at < batch_started + batch_took
        })
        .collect();
    let (a, b) = (ttfts(&alone), ttfts(&during));
    println!(
        "\n| interactive load | requests | TTFT p50 (ms) | TTFT p99 (ms) |\n|---|---|---|---|"
    );
    println!(
        "| alone | {} | {:.1} | {:.1} |",
        a.len(),
        percentile(&a, 0.5),
        percentile(&a, 0.99)
    );
    println!(
        "| with the batch running | {} | {:.1} | {:.1} |",
        b.len(),
        percentile(&b, 0.5),
        percentile(&b, 0.99)
    );
    println!(
        "| ratio | | {:.2} × | {:.2} × |",
        percentile(&b, 0.5) / percentile(&a, 0.5),
        percentile(&b, 0.99) / percentile(&a, 0.99)
    );

    // The ideal: the seats interactive traffic leaves, each turning over at
    // the mean duration of a request of the same size under this load.
    let counts = &ended["request_counts"];
    let done = counts["completed"].as_f64().unwrap_or(0.0);
    let rate = done / batch_took.as_secs_f64();
    let mean_duration = {
        // A closed-loop client's requests end back to back: its duration is the gap.
        let seconds = batch_took.as_secs_f64() - 1.0;
        interactive as f64 * seconds / during.len().max(1) as f64
    };
    let left = (capacity - interactive) as f64;
    let ideal = left / mean_duration;
    println!(
        "\n| batch | lines | completed | failed | took (s) | lines/s | ideal lines/s ({left} seats ÷ {:.0} ms) | share of ideal |\n|---|---|---|---|---|---|---|---|",
        mean_duration * 1000.0
    );
    println!(
        "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} % |",
        ended["status"],
        args.lines,
        done,
        counts["failed"],
        batch_took.as_secs_f64(),
        rate,
        ideal,
        100.0 * rate / ideal
    );

    // 3: two keys flooding at 4 × capacity, 3:1 clients.
    let flood = 4 * capacity;
    let (many, few) = (flood * 3 / 4, flood / 4);
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(window).await;
        stopper.store(true, Ordering::Relaxed);
    });
    let started = Instant::now();
    let (a, b) = tokio::join!(
        clients(&fleet, &fleet.keys[2], many, stop.clone()),
        clients(&fleet, &fleet.keys[3], few, stop.clone())
    );
    // Completions in the steady window (after the first second, before the stop).
    let steady = |seen: &[(Duration, Instant)]| {
        seen.iter()
            .filter(|(_, at)| *at > started + Duration::from_secs(1) && *at <= started + window)
            .count()
    };
    let (na, nb) = (steady(&a), steady(&b));
    let total = (na + nb).max(1) as f64;
    println!("\n| flooding key | clients | completions | share |\n|---|---|---|---|");
    println!("| A | {many} | {na} | {:.1} % |", 100.0 * na as f64 / total);
    println!("| B | {few} | {nb} | {:.1} % |", 100.0 * nb as f64 / total);
}
