//! Production mode against real PostgreSQL, Redis and Kafka (tansu in CI):
//! each test gets its own database, Redis key prefix and Kafka topics.
//! [`backends`]: the store, the cache and their outages; [`workers`]: edges
//! and workers through Kafka, and losing either; [`stalled_client`]: a
//! client that stops reading a flood of chunks (on a broker of its own);
//! [`routes`]: embeddings and the tokenizer through Kafka; [`brokers`]: the
//! broker itself misbehaving, slow, restarted or sent garbage; [`batch`]: the
//! Batch API across edges and workers, with both killed mid-batch.

macro_rules! services {
    () => {
        match Services::fresh().await {
            Some(services) => services,
            None => return,
        }
    };
}

mod backends;
mod batch;
mod brokers;
mod resume;
mod routes;
mod stalled_client;
mod workers;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::services::{Services, config_from_toml, free_port, merge_toml, start_redis};
use crate::common::*;
use futures::future::join_all;
use serde_json::{Value, json};
use sluice_simulator::{Simulator, SimulatorConfig};

/// A standalone worker and an edge-only gateway, each on a runtime of its own
/// (as if separate processes), plus a key for the edge.
pub(super) async fn edge_and_worker(
    services: &Services,
    sim: &Simulator,
    key_name: &str,
) -> (Isolated, Isolated, String, String) {
    edge_and_worker_with(services, sim, key_name, "").await
}

/// As [`edge_and_worker`], with `queue_overrides` (TOML) merged into both configs.
pub(super) async fn edge_and_worker_with(
    services: &Services,
    sim: &Simulator,
    key_name: &str,
    queue_overrides: &str,
) -> (Isolated, Isolated, String, String) {
    let queue = merge_toml(&services.kafka_queue(false), queue_overrides);
    let worker = Isolated::new("worker");
    worker
        .start_worker(services.config(&sim.url(), &queue))
        .await;
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(services.config(&sim.url(), &queue)).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), key_name)
        .await
        .unwrap()
        .secret;
    (edge, worker, url, key)
}

pub(super) async fn stream_from(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
) -> Vec<String> {
    let response = http
        .post(format!("{url}/v1/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().await.unwrap_or_default()
    );
    sse_events(response).await
}

/// A tansu process of a test's own, killed (SIGKILL) by `kill` or when dropped,
/// so a failing test leaves no broker behind.
pub(super) struct Broker(std::process::Child);

impl Broker {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(super) fn start_tansu(port: u16) -> Broker {
    start_tansu_advertising(port, port)
}

/// A tansu listening on `port` that tells clients to connect to `advertised`.
pub(super) fn start_tansu_advertising(port: u16, advertised: u16) -> Broker {
    let home = std::env::var("HOME").unwrap_or_default();
    let binary = [format!("{home}/.cargo/bin/tansu"), "tansu".to_string()]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists() || b == "tansu")
        .unwrap();
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{advertised}");
    let child = std::process::Command::new(binary)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tansu runs (scripts/test.sh installs it)");
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Broker(child)
}

/// Streams whole and in order: `max_tokens` text chunks, no error, `[DONE]`.
pub(super) fn assert_complete(events: &[String], max_tokens: usize) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| e.contains("\"error\"")),
        "{events:?}"
    );
    assert_eq!(texts_of_stream(events), max_tokens, "{events:?}");
}

pub(super) fn texts_of_stream(events: &[String]) -> usize {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v["choices"][0]["text"].is_string())
        .count()
}

/// A key made with `sluice keys create` on `config`; returns its secret.
pub(super) fn create_key_with_cli(config: &std::path::Path, name: &str) -> String {
    let created = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(config)
        .args(["keys", "create", "--name", name])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&created.stdout);
    stdout
        .split_whitespace()
        .find(|w| w.starts_with("sk-sluice-"))
        .unwrap_or_else(|| panic!("no key in {stdout}"))
        .to_string()
}

/// `sluice` with `args`, as a process of its own (killed when dropped),
/// logging to `log`.
pub(super) fn sluice_process(
    config: &std::path::Path,
    args: &[&str],
    log: &std::path::Path,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The last lines of the logs at `paths`, for a failure message.
pub(super) fn log_tails(paths: &[&std::path::Path]) -> String {
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- {}\n{}",
                path.display(),
                lines[lines.len().saturating_sub(30)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Relays TCP connections to `upstream`, passing at most `bytes_per_second`
/// from each client to the broker: a broker that takes data slowly.
pub(super) async fn slow_proxy(
    listener: tokio::net::TcpListener,
    upstream: u16,
    bytes_per_second: f64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            let mut buf = vec![0u8; 1024];
            while let Ok(n) = client_read.read(&mut buf).await {
                if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / bytes_per_second)).await;
            }
        });
    }
}
