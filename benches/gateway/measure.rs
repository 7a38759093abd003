//! Streams through a path (the gateway or the simulator directly) and what is measured of them: time to first token, per-token delivery, cache hits, CPU.

use super::*;

pub(crate) struct Sample {
    pub(crate) ttft: Duration,
    pub(crate) token_latencies: Vec<Duration>,
}

pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) key: Option<String>,
}

pub(crate) static NEXT: AtomicU64 = AtomicU64::new(0);

pub(crate) async fn one_stream(
    client: &reqwest::Client,
    sim: &Simulator,
    target: &Target,
    args: &Args,
) -> Sample {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let body = args.body(&format!("benchmark prompt {n}"));
    let tokens = args.tokens;
    let route = args.route;
    let mut request = client
        .post(format!("{}{}", target.url, args.path()))
        .json(&body);
    let direct_id = format!("bench-{n}");
    request = match &target.key {
        Some(key) => request.bearer_auth(key),
        None => request.header("x-request-id", &direct_id),
    };
    let sent = Instant::now();
    let mut response = request.send().await.expect("request");
    assert!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .unwrap_or(direct_id);
    let mut parser = SseParser::new();
    let mut received = Vec::with_capacity(tokens as usize);
    'read: while let Ok(Some(bytes)) = response.chunk().await {
        let now = Instant::now();
        parser.push(&bytes);
        while let Some(event) = parser.next_event() {
            if event.is_done() {
                break 'read;
            }
            // Of Anthropic's and the Responses API's events, only the deltas carry tokens.
            let payload = event.chunk.payload_slice();
            let token = match route {
                Route::Messages => payload.starts_with(br#"{"type":"content_block_delta""#),
                Route::Responses => payload.ends_with(br#""type":"response.output_text.delta"}"#),
                Route::Completions | Route::Chat => true,
            };
            if token {
                received.push(now);
            }
        }
    }
    // A chat's role chunk leaves with its first token, in the same step.
    if args.route == Route::Chat {
        received.remove(0);
    }
    let emitted = sim.emit_times(&id);
    assert_eq!(received.len(), emitted.len(), "every token arrived");
    Sample {
        ttft: received[0] - sent,
        token_latencies: received
            .iter()
            .zip(&emitted)
            .map(|(r, e)| r.saturating_duration_since(*e))
            .collect(),
    }
}

/// `concurrency` clients, each streaming `per_client` completions back to back,
/// their starts staggered over one stream's duration: a steady state with
/// `concurrency` streams in flight, not one synchronized burst.
pub(crate) async fn measure(
    client: &reqwest::Client,
    sim: &Arc<Simulator>,
    target: &Arc<Target>,
    concurrency: usize,
    per_client: usize,
    args: &Arc<Args>,
    stream_time: Duration,
) -> (Vec<Duration>, Vec<Duration>) {
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let (client, sim, target, args) =
                (client.clone(), sim.clone(), target.clone(), args.clone());
            let stagger = stream_time.mul_f64(i as f64 / concurrency as f64);
            tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                let mut samples = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    samples.push(one_stream(&client, &sim, &target, &args).await);
                }
                samples
            })
        })
        .collect();
    let mut ttfts = Vec::new();
    let mut latencies = Vec::new();
    for task in tasks {
        for sample in task.await.expect("stream task") {
            ttfts.push(sample.ttft);
            latencies.extend(sample.token_latencies);
        }
    }
    ttfts.sort();
    latencies.sort();
    (ttfts, latencies)
}

pub(crate) fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

pub(crate) fn added(gateway: Duration, direct: Duration) -> String {
    format!(
        "{:+.3}",
        (gateway.as_secs_f64() - direct.as_secs_f64()) * 1000.0
    )
}

pub(crate) async fn cache_hit_rate(
    client: &reqwest::Client,
    target: &Arc<Target>,
    args: &Args,
    seconds: u64,
) -> (u64, f64) {
    let body = args.body("the cached prompt");
    let path = args.path();
    let send = move |client: reqwest::Client, target: Arc<Target>, body: serde_json::Value| async move {
        let response = client
            .post(format!("{}{path}", target.url))
            .bearer_auth(target.key.as_deref().unwrap_or_default())
            .json(&body)
            .send()
            .await
            .expect("request");
        assert!(response.status().is_success());
        let bytes = response.bytes().await.expect("body");
        // OpenAI's streams end with [DONE], Anthropic's with message_stop,
        // the Responses API's with response.completed.
        assert!(
            bytes.ends_with(b"data: [DONE]\n\n")
                || bytes.ends_with(b"data: {\"type\":\"message_stop\"}\n\n")
                || bytes.ends_with(b"\"type\":\"response.completed\"}\n\n")
        );
    };
    send(client.clone(), target.clone(), body.clone()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (client, target, body, done) =
                (client.clone(), target.clone(), body.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    send(client.clone(), target.clone(), body.clone()).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let started = Instant::now();
    for worker in workers {
        worker.await.expect("worker");
    }
    let done = done.load(Ordering::Relaxed);
    (done, done as f64 / started.elapsed().as_secs_f64())
}

/// User plus system CPU time of this process, in seconds.
pub(crate) fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of /proc/<pid>/stat (utime, stime), counted after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}
