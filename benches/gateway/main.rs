//! Load benchmark: what sluice adds on top of calling vLLM directly.
//!
//! Starts the simulated vLLM (fixed per-token delay) and a gateway in front of
//! it, then streams the same completions both ways at 1 and at 100 concurrent
//! streams in flight (steady state: each client streams back to back, starts
//! staggered) and reports:
//! - time to first token (TTFT), from sending the request to the first chunk;
//! - per-token delivery latency: from the moment the simulator emitted a chunk
//!   to the moment the client read it;
//! - the difference between the two paths (what the gateway adds);
//! - cache-hit streams per second.
//!
//! Every request has a unique prompt, so latency runs are cache misses.
//!
//!     cargo bench --bench gateway                          # embedded mode
//!     cargo bench --bench gateway -- --queue kafka://127.0.0.1:9092
//!     cargo bench --bench gateway -- --route chat          # /v1/chat/completions
//!     cargo bench --bench gateway -- --route messages      # /v1/messages (Anthropic's events)
//!     cargo bench --bench gateway -- --route responses     # /v1/responses (its typed events)
//!     cargo bench --bench gateway -- --resume-ab           # resumable streams on against off
//!     cargo bench --bench gateway -- --limits redis://127.0.0.1:6379
//!
//! With a Kafka queue it also measures two broker baselines, each a bare
//! rdkafka producer and consumer through the same broker with the same client
//! settings, and prints sluice's added per-token latency next to each one's
//! produce-to-consume latency, with their ratio:
//! - *chunk bursts*: a chunk-sized message per stream every token step, on a
//!   fresh partition;
//! - *sluice's response traffic*: the messages the edge's reply partition
//!   received during the phase (their sizes, their number, over the phase's
//!   duration, evenly spaced), on a partition first filled with as many
//!   batches as the reply partition held when the phase began. tansu's memory
//!   storage lists every batch of a partition on each fetch that returns data,
//!   so a hop costs more the longer a partition's history.
//!
//! `--hop-prefills 0,2000,5000` measures only the chunk-burst hop, on
//! partitions first filled with that many batches. `--worker-processes N` runs
//! the Kafka workers as N `sluice worker` processes of their own, as
//! production does, instead of in the edge's process.
//!
//! `--limits URL` counts per-key limits there (`limits.url`) and measures,
//! at 100 streams in the same run, a key whose limits are checked (and
//! settled) on every request against a key without limits.
//!
//! `--telemetry` turns on trace export (every request sampled, to a local
//! OTLP sink) and JSON request logs (to stderr: run with `2>/dev/null`), to
//! measure what observability costs; `--hits-only` runs only the cache-hit part.
//!
//! Other flags: --tokens N (32), --token-delay-ms N (10), --rounds N (5 streams per client;
//! 50 at one stream), --hit-seconds N (5).

mod kafka;
mod measure;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::config::Config;
use sluice::protocol::sse::SseParser;
use sluice_simulator::{Simulator, SimulatorConfig};

use kafka::*;
use measure::*;

struct Args {
    /// Export traces (to a local sink) and log every request as JSON (to stderr).
    telemetry: bool,
    /// Only measure cache-hit throughput.
    hits_only: bool,
    queue: String,
    tokens: u32,
    token_delay_ms: u64,
    rounds: usize,
    hit_seconds: u64,
    /// The route streamed: completions, chat, Anthropic's messages or OpenAI's responses.
    route: Route,
    /// `limits.url`: measure a limited key against an unlimited one.
    limits: Option<String>,
    /// Kafka workers as separate `sluice worker` processes (0: in the edge's process).
    worker_processes: usize,
    /// Only the broker hop, on partitions first filled with each of these batch counts.
    hop_prefills: Vec<usize>,
    /// Compare resumable streams on and off, two gateways side by side.
    resume_ab: bool,
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Route {
    Completions,
    Chat,
    Messages,
    Responses,
}

impl Args {
    fn path(&self) -> &'static str {
        match self.route {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Messages => "/v1/messages",
            Route::Responses => "/v1/responses",
        }
    }

    /// A streamed request for `prompt` on the benchmarked route.
    /// (Greedy: a sampled request is not cached, and the cache-hit run needs hits.)
    fn body(&self, prompt: &str) -> serde_json::Value {
        match self.route {
            Route::Chat | Route::Messages => {
                json!({"model": "sim-llama", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.tokens, "temperature": 0, "stream": true})
            }
            Route::Completions => json!({"model": "sim-llama", "prompt": prompt,
                "max_tokens": self.tokens, "temperature": 0, "stream": true}),
            // Not stored: a stored response is never cached.
            Route::Responses => json!({"model": "sim-llama", "input": prompt, "store": false,
                "max_output_tokens": self.tokens, "temperature": 0, "stream": true}),
        }
    }
}

fn args() -> Args {
    let mut args = Args {
        telemetry: false,
        hits_only: false,
        queue: "memory://".into(),
        tokens: 32,
        token_delay_ms: 10,
        rounds: 5,
        hit_seconds: 5,
        route: Route::Completions,
        limits: None,
        worker_processes: 0,
        hop_prefills: Vec::new(),
        resume_ab: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--queue" => args.queue = value(),
            "--tokens" => args.tokens = value().parse().unwrap_or(args.tokens),
            "--token-delay-ms" => {
                args.token_delay_ms = value().parse().unwrap_or(args.token_delay_ms)
            }
            "--rounds" => args.rounds = value().parse().unwrap_or(args.rounds),
            "--hit-seconds" => args.hit_seconds = value().parse().unwrap_or(args.hit_seconds),
            "--telemetry" => args.telemetry = true,
            "--hits-only" => args.hits_only = true,
            "--route" => {
                args.route = match value().as_str() {
                    "chat" => Route::Chat,
                    "messages" => Route::Messages,
                    "responses" => Route::Responses,
                    _ => Route::Completions,
                }
            }
            "--limits" => args.limits = Some(value()),
            "--resume-ab" => args.resume_ab = true,
            "--worker-processes" => args.worker_processes = value().parse().unwrap_or(0),
            "--hop-prefills" => {
                args.hop_prefills = value().split(',').filter_map(|n| n.parse().ok()).collect()
            }
            _ => {}
        }
    }
    args
}

/// The benchmark's `gateway.toml`.
fn gateway_toml(args: &Args, upstream: &str, db: &std::path::Path) -> String {
    format!(
        r#"
        [store]
        url = "sqlite://{db}"
        [cache]
        url = "memory://"
        [queue]
        url = "{queue}"
        request_topic = "bench.requests.{run}"
        response_topic = "bench.responses.{run}"
        cancel_topic = "bench.cancels.{run}"
        worker_group = "bench-workers.{run}"
        partitions = 4
        reply_partition = 0
        [queue.producer]
        "linger.ms" = 0
        [queue.consumer]
        "fetch.wait.max.ms" = 0
        "fetch.error.backoff.ms" = 1
        [worker]
        concurrency = 512
        in_process = {in_process}
        [upstream]
        urls = ["{upstream}"]
        [limits]
        url = "{limits}"
        key_prefix = "bench-{run}:"
        [log]
        level = "{level}"
        "#,
        limits = args.limits.as_deref().unwrap_or("memory://"),
        db = db.display(),
        queue = args.queue,
        run = std::process::id(),
        level = if args.telemetry { "info" } else { "warn" },
        in_process = args.worker_processes == 0,
    )
}

fn gateway_config(args: &Args, upstream: &str, db: &std::path::Path) -> Config {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, gateway_toml(args, upstream, db)).expect("write config");
    // SLUICE_* environment variables override these settings (e.g. librdkafka tuning).
    Config::load(Some(&path)).expect("valid bench config")
}

fn main() {
    let args = Arc::new(args());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        if !args.hop_prefills.is_empty() {
            let dir = tempfile::tempdir().expect("temp dir");
            let config = gateway_config(&args, "http://127.0.0.1:1", &dir.path().join("unused.db"));
            let sluice::config::QueueBackend::Kafka(kafka) = &config.queue.backend else {
                panic!("--hop-prefills needs --queue kafka://...");
            };
            println!("| prefilled batches | streams | hop p50 (ms) | hop p99 (ms) |");
            println!("|---|---|---|---|");
            for prefill in &args.hop_prefills {
                for streams in [1usize, 100] {
                    let ticks = args.tokens as usize * if streams == 1 { 50 } else { 5 };
                    let mut schedule = Schedule::chunk_bursts(streams, ticks, Duration::from_millis(args.token_delay_ms));
                    schedule.history = *prefill as i64;
                    let hop = broker_hop(kafka, schedule).await;
                    println!("| {prefill} | {streams} | {} | {} |", ms(pct(&hop, 0.5)), ms(pct(&hop, 0.99)));
                }
            }
            return;
        }
        let _telemetry = if args.telemetry {
            let sink = axum::Router::new().route("/v1/traces", axum::routing::post(|| async { "" }));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
            let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
            tokio::spawn(async move { axum::serve(listener, sink).await });
            let (mut log, mut telemetry) = (Config::default().log, Config::default().telemetry);
            log.format = sluice::config::LogFormat::Json;
            telemetry.otlp_endpoint = Some(endpoint);
            Some(sluice::observe::telemetry::init(&log, &telemetry))
        } else {
            None
        };
        let sim = Arc::new(
            Simulator::start(SimulatorConfig {
                token_delay: Duration::from_millis(args.token_delay_ms),
                first_token_delay: Duration::from_millis(20),
                record_emit_times: true,
                ..SimulatorConfig::default()
            })
            .await
            .expect("simulator"),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let config = gateway_config(&args, &sim.url(), &dir.path().join("bench.db"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let gateway = sluice::Gateway::start(config).await.expect("gateway");
        let store = gateway.store();
        let key = sluice::tenancy::keys::create_key(store.as_ref(), "bench").await.expect("key");
        tokio::spawn(gateway.serve(listener, std::future::pending()));
        // Separate worker processes, on the same configuration (killed with the benchmark).
        let config_path = dir.path().join("bench.toml");
        std::fs::write(&config_path, gateway_toml(&args, &sim.url(), &dir.path().join("bench.db")))
            .expect("write config");
        let _workers: Vec<tokio::process::Child> = (0..args.worker_processes)
            .map(|_| {
                tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
                    .arg("--config")
                    .arg(&config_path)
                    .arg("worker")
                    .env("SLUICE_WORKER__LISTEN", "127.0.0.1:0")
                    .stdout(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("sluice worker")
            })
            .collect();

        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(512)
            .build()
            .expect("client");
        let direct = Arc::new(Target { url: sim.url(), key: None });
        let through = Arc::new(Target { url: format!("http://{addr}"), key: Some(key.secret) });
        if args.limits.is_some() {
            // Limits no request reaches, so every one is checked and settled and admitted.
            let patch: sluice::tenancy::tenants::KeyPatch = serde_json::from_value(json!({"limits": {
                "requests_per_minute": 1_000_000_000u64, "tokens_per_minute": 1_000_000_000_000u64,
                "max_concurrent": 100_000}})).expect("patch");
            let limited_key = sluice::tenancy::tenants::create_key(store.as_ref(), &sluice::tenancy::audit::Actor::cli(), "bench-limited", &patch, None)
                .await
                .expect("limited key");
            let limited = Arc::new(Target { url: through.url.clone(), key: Some(limited_key.secret) });
            let stream_time = Duration::from_millis(20 + args.token_delay_ms * u64::from(args.tokens));
            measure(&client, &sim, &through, 100, 1, &args, stream_time).await;
            measure(&client, &sim, &limited, 100, 1, &args, stream_time).await;
            println!(
                "sluice limits benchmark: limits.url {}, 100 streams, {} rounds\n",
                args.limits.as_deref().unwrap_or_default(),
                args.rounds
            );
            println!("| key | TTFT p50 (ms) | TTFT p99 (ms) | per-token p50 (ms) | per-token p99 (ms) |");
            println!("|---|---|---|---|---|");
            let mut rows = Vec::new();
            for (name, target) in [("no limits", &through), ("limits checked", &limited)] {
                let (ttft, tok) = measure(&client, &sim, target, 100, args.rounds, &args, stream_time).await;
                println!(
                    "| {name} | {} | {} | {} | {} |",
                    ms(pct(&ttft, 0.5)),
                    ms(pct(&ttft, 0.99)),
                    ms(pct(&tok, 0.5)),
                    ms(pct(&tok, 0.99))
                );
                rows.push(ttft);
            }
            println!(
                "\nadded by the limit check: TTFT p50 {} ms, p99 {} ms",
                added(pct(&rows[1], 0.5), pct(&rows[0], 0.5)),
                added(pct(&rows[1], 0.99), pct(&rows[0], 0.99))
            );
            return;
        }

        if args.resume_ab {
            // The same gateway with streams not resumable, on topics of its own.
            let toml = gateway_toml(&args, &sim.url(), &dir.path().join("off.db"))
                .replace("bench.", "bench-off.")
                .replace("bench-workers.", "bench-off-workers.")
                + "\n[resume]\nenabled = false\n";
            let path = dir.path().join("off.toml");
            std::fs::write(&path, toml).expect("write config");
            let config = Config::load(Some(&path)).expect("valid bench config");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let off_addr = listener.local_addr().expect("addr");
            let gateway = sluice::Gateway::start(config).await.expect("gateway");
            let off_key = sluice::tenancy::keys::create_key(gateway.store().as_ref(), "bench").await.expect("key");
            tokio::spawn(gateway.serve(listener, std::future::pending()));
            let off = Arc::new(Target { url: format!("http://{off_addr}"), key: Some(off_key.secret) });
            let stream_time = Duration::from_millis(20 + args.token_delay_ms * u64::from(args.tokens));
            for target in [&direct, &through, &off] {
                measure(&client, &sim, target, 100, 1, &args, stream_time).await;
            }
            println!(
                "sluice resumable streams on and off: {}, queue {}, {} tokens per stream, {} ms per token, {} rounds x 3 alternations\n",
                args.path(), args.queue, args.tokens, args.token_delay_ms, args.rounds
            );
            println!("| streams | resumable | TTFT p50 (ms) | TTFT p99 (ms) | per-token p50 (ms) | per-token p99 (ms) | added per-token p50 / p99 (ms) |");
            println!("|---|---|---|---|---|---|---|");
            for concurrency in [1usize, 100] {
                let rounds = if concurrency == 1 { args.rounds * 10 } else { args.rounds };
                let mut runs: [(Vec<Duration>, Vec<Duration>); 3] = Default::default();
                for _ in 0..3 {
                    for (i, target) in [&direct, &through, &off].into_iter().enumerate() {
                        let (ttft, tok) = measure(&client, &sim, target, concurrency, rounds, &args, stream_time).await;
                        runs[i].0.extend(ttft);
                        runs[i].1.extend(tok);
                    }
                }
                for run in &mut runs {
                    run.0.sort();
                    run.1.sort();
                }
                let added_tok = |i: usize, p: f64| pct(&runs[i].1, p).as_secs_f64() * 1000.0 - pct(&runs[0].1, p).as_secs_f64() * 1000.0;
                for (i, name) in [(0, "direct"), (1, "on"), (2, "off")] {
                    println!(
                        "| {concurrency} | {name} | {} | {} | {} | {} | {:+.3} / {:+.3} |",
                        ms(pct(&runs[i].0, 0.5)),
                        ms(pct(&runs[i].0, 0.99)),
                        ms(pct(&runs[i].1, 0.5)),
                        ms(pct(&runs[i].1, 0.99)),
                        added_tok(i, 0.5),
                        added_tok(i, 0.99),
                    );
                }
                let ratio = |p: f64| pct(&runs[1].1, p).as_secs_f64() / pct(&runs[2].1, p).as_secs_f64();
                println!(
                    "| {concurrency} | on / off | | | {:.2} x | {:.2} x | |",
                    ratio(0.5),
                    ratio(0.99)
                );
            }
            return;
        }

        if args.hits_only {
            let cpu_before = process_cpu_seconds();
            let (streams, rate) = cache_hit_rate(&client, &through, &args, args.hit_seconds).await;
            let cpu_us = (process_cpu_seconds() - cpu_before) / streams as f64 * 1e6;
            println!(
                "cache-hit streams per second (telemetry {}): {rate:.0}; process CPU per stream (client included): {cpu_us:.1} µs; {streams} streams",
                if args.telemetry { "on" } else { "off" }
            );
            return;
        }
        let stream_time = Duration::from_millis(20 + args.token_delay_ms * u64::from(args.tokens));
        // Warm up connections on both paths.
        measure(&client, &sim, &direct, 100, 1, &args, stream_time).await;
        measure(&client, &sim, &through, 100, 1, &args, stream_time).await;

        println!(
            "sluice benchmark: {}, queue {} (workers: {}), {} tokens per stream, {} ms per token, {} rounds\n",
            args.path(),
            args.queue,
            match args.worker_processes {
                0 => "in the edge's process".to_string(),
                n => format!("{n} processes"),
            },
            args.tokens,
            args.token_delay_ms,
            args.rounds
        );
        println!("| streams | metric | direct p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 |");
        println!("|---|---|---|---|---|---|---|---|");
        let kafka = match gateway_config(&args, &sim.url(), &dir.path().join("unused.db")).queue.backend {
            sluice::config::QueueBackend::Kafka(kafka) => Some(kafka),
            _ => None,
        };
        // Per concurrency, for the broker baselines: added per-token latency
        // (ms, p50 and p99) and the response traffic the phase produced.
        let mut kafka_added: Vec<(usize, (f64, f64), Option<Traffic>)> = Vec::new();
        for concurrency in [1usize, 100] {
            let rounds = if concurrency == 1 { args.rounds * 10 } else { args.rounds };
            let (d_ttft, d_tok) = measure(&client, &sim, &direct, concurrency, rounds, &args, stream_time).await;
            let history = match &kafka {
                Some(kafka) => reply_watermark(kafka).await,
                None => 0,
            };
            let phase = Instant::now();
            let (g_ttft, g_tok) = measure(&client, &sim, &through, concurrency, rounds, &args, stream_time).await;
            let duration = phase.elapsed();
            let traffic = match &kafka {
                Some(kafka) => {
                    let end = reply_watermark(kafka).await;
                    Some(Traffic { history, payload_sizes: read_traffic(kafka, history, end).await, duration })
                }
                None => None,
            };
            let millis = |d: Duration| d.as_secs_f64() * 1000.0;
            kafka_added.push((
                concurrency,
                (
                    millis(pct(&g_tok, 0.5)) - millis(pct(&d_tok, 0.5)),
                    millis(pct(&g_tok, 0.99)) - millis(pct(&d_tok, 0.99)),
                ),
                traffic,
            ));
            for (name, d, g) in [("TTFT (ms)", &d_ttft, &g_ttft), ("per-token (ms)", &d_tok, &g_tok)] {
                println!(
                    "| {concurrency} | {name} | {} | {} | {} | {} | {} | {} |",
                    ms(pct(d, 0.5)),
                    ms(pct(g, 0.5)),
                    added(pct(g, 0.5), pct(d, 0.5)),
                    ms(pct(d, 0.99)),
                    ms(pct(g, 0.99)),
                    added(pct(g, 0.99), pct(d, 0.99)),
                );
            }
        }
        if let Some(kafka) = &kafka {
            println!("\nbroker baselines: a bare producer and consumer through the same broker, same client settings\n");
            println!("| streams | baseline | messages/s | partition history (batches) | hop p50 (ms) | hop p99 (ms) | sluice added per-token p50 / p99 (ms) | ratio p50 | ratio p99 |");
            println!("|---|---|---|---|---|---|---|---|---|");
            for (concurrency, added, traffic) in kafka_added {
                let ticks = (args.tokens as usize * if concurrency == 1 { 50 } else { 5 }).max(1);
                let mut schedules = vec![Schedule::chunk_bursts(concurrency, ticks, Duration::from_millis(args.token_delay_ms))];
                schedules.extend(traffic.as_ref().map(Schedule::replay));
                for schedule in schedules {
                    let (name, history) = (schedule.name.clone(), schedule.history);
                    let rate = schedule.messages.len() as f64
                        / schedule.messages.last().map_or(1.0, |(at, _)| at.as_secs_f64().max(0.001));
                    let hop = broker_hop(kafka, schedule).await;
                    if hop.is_empty() {
                        println!("| {concurrency} | {name} | no messages came back |");
                        continue;
                    }
                    let (h50, h99) = (pct(&hop, 0.5), pct(&hop, 0.99));
                    println!(
                        "| {concurrency} | {name} | {rate:.0} | {history} | {} | {} | {:.3} / {:.3} | {:.2} | {:.2} |",
                        ms(h50),
                        ms(h99),
                        added.0,
                        added.1,
                        added.0 / (h50.as_secs_f64() * 1000.0),
                        added.1 / (h99.as_secs_f64() * 1000.0),
                    );
                }
            }
        }
        if std::env::var_os("BENCH_SHOW_QUEUE_METRICS").is_some() {
            let metrics = client.get(format!("{}/metrics", through.url)).send().await.expect("metrics").text().await.expect("text");
            for line in metrics.lines().filter(|l| l.starts_with("sluice_queue_")) {
                println!("{line}");
            }
        }
        let (_, rate) = cache_hit_rate(&client, &through, &args, args.hit_seconds).await;
        println!("\ncache-hit streams per second ({} chunks each, 32 clients): {rate:.0}", args.tokens);
    });
}
