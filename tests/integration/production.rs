//! Production mode against real PostgreSQL, Redis and Kafka (tansu in CI):
//! each test gets its own database, Redis key prefix and Kafka topics.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::services::{Services, config_from_toml, free_port, merge_toml, start_redis};
use crate::common::*;
use futures::future::join_all;
use serde_json::{Value, json};
use sluice_simulator::{Simulator, SimulatorConfig};

macro_rules! services {
    () => {
        match Services::fresh().await {
            Some(services) => services,
            None => return,
        }
    };
}

/// A standalone worker and an edge-only gateway, each on a runtime of its own
/// (as if separate processes), plus a key for the edge.
async fn edge_and_worker(
    services: &Services,
    sim: &Simulator,
    key_name: &str,
) -> (Isolated, Isolated, String, String) {
    edge_and_worker_with(services, sim, key_name, "").await
}

/// As [`edge_and_worker`], with `queue_overrides` (TOML) merged into both configs.
async fn edge_and_worker_with(
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

async fn stream_from(http: &reqwest::Client, url: &str, key: &str, body: &Value) -> Vec<String> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_keys_revocations_and_inference_logs() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(&sim.url(), "");
    let gw = TestGateway::start_config(sim, config).await;
    let response = gw
        .post(&json!({"model": MODEL, "prompt": "stored in postgres", "max_tokens": 5}))
        .await;
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = eventually(Duration::from_secs(3), || async {
        gw.store.inferences_for(&id).await.unwrap().pop()
    })
    .await
    .expect("inference row in PostgreSQL");
    assert_eq!(
        (row.key_id.as_str(), row.completion_tokens, row.status),
        (gw.key_id.as_str(), 5, 200)
    );

    // The rows really are in PostgreSQL, under the documented schema.
    let pool = sqlx::PgPool::connect(&services.postgres).await.unwrap();
    let (count,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM inference_logs WHERE request_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(count, 1);
    let (hash,): (String,) = sqlx::query_as("SELECT key_hash FROM api_keys WHERE id = $1")
        .bind(&gw.key_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(hash, gw.key, "only the hash is stored");
    assert_eq!(hash, sluice::tenancy::keys::hash_secret(&gw.key));

    let keys = gw.store.list_keys().await.unwrap();
    assert!(
        keys.iter()
            .any(|k| k.id == gw.key_id && k.revoked_at.is_none())
    );
    let usage = gw.store.key_usage(None).await.unwrap();
    assert!(
        usage
            .iter()
            .any(|u| u.key_id == gw.key_id && u.completion_tokens == 5)
    );

    assert_eq!(gw.store.revoke_key(&gw.key_id).await.unwrap(), 1);
    let refused = eventually(Duration::from_secs(2), || async {
        (gw.post(&json!({"model": MODEL, "prompt": "x", "max_tokens": 1}))
            .await
            .status()
            == 401)
            .then_some(())
    })
    .await;
    assert!(refused.is_some(), "revoked key refused");
    pool.close().await;
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_serves_edge_b_what_edge_a_computed() {
    let services = services!();
    let sim_a = Simulator::start(sim_config()).await.unwrap();
    let sim_b = Simulator::start(sim_config()).await.unwrap();
    let config_a = services.config(&sim_a.url(), "");
    let config_b = services.config(&sim_b.url(), "");
    let edge_a = TestGateway::start_config(sim_a, config_a).await;
    let edge_b = TestGateway::start_config(sim_b, config_b).await;

    let body =
        json!({"model": MODEL, "prompt": "shared through redis", "max_tokens": 6, "stream": true});
    let from_a = sse_events(edge_a.post(&body).await).await;
    // The same client (key), now through edge B: entries are scoped per key.
    let from_b = eventually(Duration::from_secs(3), || async {
        let response = edge_b
            .http
            .post(edge_b.completions_url())
            .bearer_auth(&edge_a.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let events = sse_events(response).await;
        (edge_b.sim.received().is_empty()).then_some(events)
    })
    .await
    .expect("edge B answered from the cache without calling its upstream");
    assert_eq!(
        ids_blanked(&from_a),
        ids_blanked(&from_b),
        "same chunks, same boundaries"
    );
    assert_eq!(edge_a.sim.received().len(), 1);
    assert!(
        edge_b
            .metrics()
            .await
            .contains(r#"sluice_cache_lookups_total{result="hit"} 1"#)
    );
    edge_a.stop().await;
    edge_b.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_chat_through_kafka_and_two_workers_matches_the_upstream() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let worker_config = || services.config(&sim.url(), &services.kafka_queue(false));
    let (worker_1, worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    worker_1.start_worker(worker_config()).await;
    worker_2.start_worker(worker_config()).await;
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(worker_config()).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "chat-sdk")
        .await
        .unwrap()
        .secret;
    assert_openai_chat_matches_upstream(&python, &url, &sim.url(), &key).await;
    // The conversation travelled through Kafka to the upstream's chat route.
    assert!(
        sim.received()
            .iter()
            .any(|r| r.body["messages"][0]["role"] == "user" && r.body["stream"] == true)
    );
    for rt in [edge, worker_1, worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}

/// A tansu broker of this test's own on `port` (to kill with SIGKILL).
/// A tansu process of a test's own, killed (SIGKILL) by `kill` or when dropped,
/// so a failing test leaves no broker behind.
struct Broker(std::process::Child);

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

fn start_tansu(port: u16) -> Broker {
    start_tansu_advertising(port, port)
}

/// A tansu listening on `port` that tells clients to connect to `advertised`.
fn start_tansu_advertising(port: u16, advertised: u16) -> Broker {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_edges_requests_are_cancelled_on_the_worker() {
    let services = services!();
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(50),
        ..sim_config()
    })
    .await
    .unwrap();
    let worker = Isolated::new("worker");
    worker
        .start_worker(services.config(&sim.url(), &services.kafka_queue(false)))
        .await;
    // The edge is a process of its own, to be killed with SIGKILL: it sends no cancellation.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let edge_toml = merge_toml(
        &services.kafka_queue(false),
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\nurl = \"sqlite://{}\"\n[cache]\nurl = \"off\"\n[upstream]\nurls = [\"{}\"]\n[log]\nlevel = \"warn\"\n",
            dir.path().join("edge.db").display(),
            sim.url()
        ),
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, edge_toml).unwrap();
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let secret = create_key_with_cli(&config, "orphans");
    let mut edge = tokio::process::Command::new(sluice)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(20), || async {
        reqwest::get(format!("{url}/health")).await.ok().map(|_| ())
    })
    .await;
    assert!(up.is_some(), "the edge started");
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .bearer_auth(&secret)
        .json(
            &json!({"model": MODEL, "prompt": "a long answer", "max_tokens": 400, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let mut reader = SseReader::new(response);
    assert!(reader.next().await.is_some(), "streaming");
    edge.start_kill().unwrap();
    edge.wait().await.unwrap();
    // The worker notices the edge's silence (queue.worker_timeout_ms = 1.5 s)
    // and drops the upstream request, long before the 20 s answer would end.
    assert!(
        sim.wait_for_abort(&id, Duration::from_secs(8)).await,
        "vLLM kept generating for a dead edge"
    );
    worker.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exits_within_its_grace_period_while_the_broker_is_down() {
    let Some(_services) = Services::fresh().await else {
        return;
    };
    let port = free_port();
    let mut broker = start_tansu(port);
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--config", "/dev/null", "worker"])
        .env("SLUICE_QUEUE__URL", format!("kafka://127.0.0.1:{port}"))
        .env("SLUICE_SERVER__SHUTDOWN_GRACE_MS", "2000")
        .env("SLUICE_WORKER__LISTEN", "127.0.0.1:0")
        .env("SLUICE_LOG__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Running, and connected to its broker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(worker.try_wait().unwrap().is_none(), "the worker started");
    broker.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = worker.id().unwrap().to_string();
    let stopping = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let exited = tokio::time::timeout(Duration::from_secs(20), worker.wait()).await;
    let took = stopping.elapsed();
    assert!(exited.is_ok(), "the worker did not exit within 20 s");
    // Its 2 s grace, the runtime's shutdown allowance (2 s), and some slack.
    assert!(took < Duration::from_secs(7), "exiting took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gauges_follow_an_outage_without_anyone_asking() {
    let services = services!();
    let port = free_port();
    let mut redis = start_redis(port);
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(
        &sim.url(),
        &format!("[cache]\nurl = \"redis://127.0.0.1:{port}\"\n"),
    );
    let gw = TestGateway::start_config(sim, config).await;
    let cache_up = |metrics: &str| metric(metrics, r#"sluice_backend_up{backend="cache"}"#);
    assert_eq!(cache_up(&gw.metrics().await), Some(1.0));
    redis.kill().unwrap();
    redis.wait().unwrap();
    // No request and no call to /ready: the background check notices.
    let down = eventually(Duration::from_secs(15), || async {
        (cache_up(&gw.metrics().await) == Some(0.0)).then_some(())
    })
    .await;
    assert!(down.is_some(), "the gauge followed the outage");
    assert_eq!(
        metric(&gw.metrics().await, r#"sluice_backend_up{backend="store"}"#),
        Some(1.0)
    );
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_worker_picks_up_gets_503_after_its_attempts() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    // An edge and no worker at all.
    let queue = merge_toml(
        &services.kafka_queue(false),
        "[queue]\nqueue_timeout_ms = 1500\nmax_attempts = 3\n",
    );
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(services.config(&sim.url(), &queue)).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "nobody")
        .await
        .unwrap()
        .secret;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "prompt": "anyone there?", "max_tokens": 2, "stream": true}))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no worker picked the request up"),
        "{error}"
    );
    // After max_attempts × queue_timeout_ms, as documented: each send waits its own.
    assert!(
        waited >= Duration::from_millis(4400) && waited < Duration::from_millis(7000),
        "{waited:?}"
    );
    let metrics = scrape_metrics(&url).await.unwrap();
    assert_eq!(
        metric(&metrics, "sluice_queue_retries_total"),
        Some(2.0),
        "sent again twice under other keys (a partition may have lost its reader)"
    );
    edge.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_fail_over_to_another_replica_through_kafka() {
    let services = services!();
    let replica = || {
        Simulator::start(SimulatorConfig {
            token_delay: Duration::from_millis(5),
            first_token_delay: Duration::from_millis(5),
            ..SimulatorConfig::default()
        })
    };
    let (a, b) = (replica().await.unwrap(), replica().await.unwrap());
    let fleet = format!(
        "[upstream]\nhealth_interval_ms = 100\n[cache]\nurl = \"off\"\n[[models]]\nname = \"{MODEL}\"\nendpoints = [\"{}\", \"{}\"]\nbalance = \"least_outstanding\"\n",
        a.url(),
        b.url()
    );
    let config = || services.config(&a.url(), &merge_toml(&services.kafka_queue(false), &fleet));
    let (worker_1, worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    worker_1.start_worker(config()).await;
    worker_2.start_worker(config()).await;
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(config()).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "fleet")
        .await
        .unwrap()
        .secret;
    let http = reqwest::Client::new();
    let load = join_all((0..60).map(|i| {
        let (http, url, key) = (&http, &url, &key);
        async move {
            tokio::time::sleep(Duration::from_millis(i * 10)).await;
            let body = json!({"model": MODEL, "prompt": format!("through kafka {i}"), "max_tokens": 4, "stream": true});
            let response = http
                .post(format!("{url}/v1/completions"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }
    }));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.kill();
    };
    let (statuses, ()) = tokio::join!(load, kill);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(!b.received().is_empty());
    for rt in [edge, worker_1, worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_two_workers_serve_200_concurrent_streams_exactly_once() {
    let services = services!();
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(5),
        first_token_delay: Duration::from_millis(10),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let edge_config = || {
        services.config(
            &sim.url(),
            &merge_toml(&services.kafka_queue(false), "[cache]\nurl = \"off\"\n"),
        )
    };
    let worker_config = || services.config(&sim.url(), &services.kafka_queue(false));

    let (rt_edge_a, rt_edge_b) = (Isolated::new("edge-a"), Isolated::new("edge-b"));
    let (rt_worker_1, rt_worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    rt_worker_1.start_worker(worker_config()).await;
    rt_worker_2.start_worker(worker_config()).await;
    let (url_a, store) = rt_edge_a.start_edge(edge_config()).await;
    let (url_b, _) = rt_edge_b.start_edge(edge_config()).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "load")
        .await
        .unwrap()
        .secret;

    let http = reqwest::Client::new();
    let requests = (0..200).map(|i| {
        let (http, key, sim) = (http.clone(), key.clone(), &sim);
        let url = if i % 2 == 0 { url_a.clone() } else { url_b.clone() };
        async move {
            let body = json!({"model": MODEL, "prompt": format!("request number {i}"), "max_tokens": 12, "stream": true});
            let events = stream_from(&http, &url, &key, &body).await;
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "request {i}: {events:?}");
            assert_eq!(events.len(), 13, "request {i}: {events:?}");
            assert_eq!(texts(&events), sim.expected_texts(&body), "request {i} got other tokens");
        }
    });
    join_all(requests).await;

    let received = sim.received();
    assert_eq!(
        received.len(),
        200,
        "the upstream saw each request exactly once"
    );
    let ids: HashSet<_> = received.iter().map(|r| r.request_id.clone()).collect();
    let prompts: HashSet<_> = received
        .iter()
        .map(|r| r.body["prompt"].to_string())
        .collect();
    assert_eq!((ids.len(), prompts.len()), (200, 200));
    for rt in [rt_edge_a, rt_edge_b, rt_worker_1, rt_worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_generation_on_a_remote_worker() {
    let services = services!();
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(50),
        ..sim_config()
    })
    .await
    .unwrap();
    let (edge, worker, url, key) = edge_and_worker(&services, &sim, "cancel").await;

    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "prompt": "never mind", "max_tokens": 1000, "stream": true}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let mut reader = SseReader::new(response);
    assert!(reader.next().await.is_some());
    drop(reader);
    let disconnected = Instant::now();
    assert!(
        sim.wait_for_abort(&id, Duration::from_secs(5)).await,
        "the worker dropped the upstream request"
    );
    let took = disconnected.elapsed();
    assert!(took < Duration::from_secs(1), "cancellation took {took:?}");
    edge.kill();
    worker.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_its_first_chunk_is_replaced_transparently() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let worker_config = || services.config(&sim.url(), &services.kafka_queue(false));
    let first_worker = Isolated::new("worker-1");
    first_worker.start_worker(worker_config()).await;
    let edge = Isolated::new("edge");
    let (url, store) = edge
        .start_edge(services.config(&sim.url(), &services.kafka_queue(false)))
        .await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "retry")
        .await
        .unwrap()
        .secret;

    // A long prefill: the worker accepts the request but sends no token for 2 s.
    let body = json!({"model": MODEL, "prompt": "slow start", "max_tokens": 8, "stream": true, "sim_first_token_delay_ms": 2000});
    let client = tokio::spawn({
        let (url, key, body) = (url.clone(), key.clone(), body.clone());
        async move { stream_from(&reqwest::Client::new(), &url, &key, &body).await }
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            (!sim.received().is_empty()).then_some(())
        })
        .await
        .is_some()
    );
    let second_worker = Isolated::new("worker-2");
    second_worker.start_worker(worker_config()).await;
    first_worker.kill();

    let events = tokio::time::timeout(Duration::from_secs(40), client)
        .await
        .expect("finished")
        .unwrap();
    assert_eq!(
        texts(&events),
        sim.expected_texts(&body),
        "the client got the whole answer, once"
    );
    assert_eq!(events.len(), 9);
    let received = sim.received();
    assert_eq!(received.len(), 2, "the upstream saw the retry");
    assert_eq!(received[0].request_id, received[1].request_id);
    assert!(
        sim.aborted().contains(&received[0].request_id),
        "the dead worker's generation was aborted"
    );
    edge.kill();
    second_worker.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_its_generation_stopped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    // The default worker timeout: the flood below (50,000 tokens as fast as
    // the simulator makes them) can hold tansu up for longer than the tests'
    // usual 1.5 s, which the edge would take for a lost worker.
    let (edge, worker, url, key) = edge_and_worker_with(
        &services,
        &sim,
        "stalled",
        "[queue]\nworker_timeout_ms = 10000\n",
    )
    .await;

    // A client that sends its request and then reads nothing, with a small
    // receive buffer: the edge cannot hold back the worker across Kafka, so it
    // holds a bounded number of the answer's chunks, then gives up on it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(url.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let body = json!({"model": MODEL, "prompt": "never read", "max_tokens": 50000, "stream": true, "sim_token_delay_ms": 0}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    let id = eventually(Duration::from_secs(10), || async {
        sim.received().first().map(|r| r.request_id.clone())
    })
    .await
    .expect("the request reached vLLM");
    assert!(
        sim.wait_for_abort(&id, Duration::from_secs(60)).await,
        "the generation nobody reads was stopped"
    );
    assert!(
        !sim.completed().contains(&id),
        "the generation ran to its end"
    );

    // Other clients are served meanwhile.
    let other = json!({"model": MODEL, "prompt": "read promptly", "max_tokens": 5, "stream": true});
    let events = stream_from(&reqwest::Client::new(), &url, &key, &other).await;
    assert_eq!(texts(&events), sim.expected_texts(&other));

    // Reading at last, the stalled client finds its stream ended: an error
    // event that says why, then [DONE].
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n = stalled.read(&mut buffer).await.unwrap();
            if n == 0 {
                return;
            }
            // Only the new bytes (and a marker's length before them) can hold the end.
            let from = received.len().saturating_sub(b"data: [DONE]".len());
            received.extend_from_slice(&buffer[..n]);
            if memchr::memmem::find(&received[from..], b"data: [DONE]").is_some() {
                return;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received);
    assert!(
        ended.is_ok(),
        "the stalled stream never ended ({} bytes read)",
        received.len()
    );
    assert!(
        text.contains("the client read too slowly"),
        "no error event before the end: {}",
        text.get(text.len().saturating_sub(600)..).unwrap_or(&text)
    );
    assert!(text.contains("data: [DONE]"));
    edge.kill();
    worker.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_ends_the_stream_with_an_error() {
    let services = services!();
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(100),
        ..sim_config()
    })
    .await
    .unwrap();
    let (edge, worker, url, key) = edge_and_worker(&services, &sim, "midstream").await;

    let body = json!({"model": MODEL, "prompt": "interrupted", "max_tokens": 50, "stream": true});
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(reader.next().await.expect("chunk"));
    }
    worker.kill();
    while let Some(event) = reader.next().await {
        events.push(event);
    }
    let error: Value =
        serde_json::from_str(&events[events.len() - 2]).expect("an error event before [DONE]");
    assert_eq!(error["error"]["code"], 502, "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let delivered = texts(&events[..events.len() - 2]);
    let expected = &sim.expected_texts(&body)[0];
    assert!(
        expected.starts_with(&delivered[0]),
        "tokens in order, none twice: {delivered:?}"
    );
    assert_eq!(
        sim.received().len(),
        1,
        "a request that delivered tokens is not retried"
    );
    edge.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_succeed_while_redis_is_down_and_the_cache_comes_back_by_itself() {
    let services = services!();
    let port = free_port();
    let mut redis = start_redis(port);
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(
        &sim.url(),
        &format!("[cache]\nurl = \"redis://127.0.0.1:{port}\"\n"),
    );
    let gw = TestGateway::start_config(sim, config).await;
    let body =
        |prompt: &str| json!({"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": true});

    assert!(
        gw.until_hit(&body("before"), Duration::from_secs(3)).await,
        "cache works while Redis is up"
    );

    redis.kill().unwrap();
    redis.wait().unwrap();
    for i in 0..5 {
        let events = sse_events(gw.post(&body(&format!("during outage {i}"))).await).await;
        assert_eq!(events.last().unwrap(), "[DONE]");
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"sluice_cache_lookups_total{result="error"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_backend_up{backend="cache"} 0"#),
        "{metrics}"
    );

    let mut redis = start_redis(port);
    let hits_after = eventually(Duration::from_secs(15), || async {
        // Traffic is what probes a Redis that is backing off.
        sse_events(gw.post(&body("probe")).await).await;
        let metrics = gw.metrics().await;
        metrics
            .contains(r#"sluice_backend_up{backend="cache"} 1"#)
            .then_some(())
    })
    .await;
    assert!(
        hits_after.is_some(),
        "the cache recovered without a restart"
    );
    assert!(
        gw.until_hit(&body("after recovery"), Duration::from_secs(5))
            .await,
        "answers are cached again"
    );
    redis.kill().unwrap();
    let _ = redis.wait();
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_on_both_topics_are_skipped_and_counted() {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(&sim.url(), &services.kafka_queue(true));
    let gw = TestGateway::start_config(sim, config).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .create()
        .unwrap();
    for partition in 0..4 {
        for topic in ["requests", "responses"] {
            let topic = format!("sluice-test-{}.{topic}", services.id);
            let record = FutureRecord::<str, [u8]>::to(&topic)
                .partition(partition)
                .payload(&b"\x00\xffnot a sluice message"[..]);
            producer
                .send(record, Duration::from_secs(5))
                .await
                .expect("garbage produced");
        }
    }
    // Well-formed messages of a protocol version this build does not speak
    // (an edge or worker of a later release, mid-upgrade): skipped, not run.
    let future =
        json!({"model": MODEL, "prompt": "from a later release", "max_tokens": 4, "stream": true})
            .to_string();
    let now = chrono::Utc::now().timestamp_millis().to_string();
    for partition in 0..4 {
        for topic in ["requests", "responses"] {
            let headers = [
                ("sluice-protocol", "2"),
                (
                    "sluice-kind",
                    if topic == "requests" {
                        "request"
                    } else {
                        "frames"
                    },
                ),
                ("sluice-request", "future-1"),
                ("sluice-edge", "edge-of-the-future"),
                ("sluice-reply-partition", "0"),
                ("sluice-attempt", "1"),
                ("sluice-submitted-ms", now.as_str()),
            ]
            .into_iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            });
            let topic = format!("sluice-test-{}.{topic}", services.id);
            let record = FutureRecord::<str, [u8]>::to(&topic)
                .partition(partition)
                .payload(future.as_bytes())
                .headers(headers);
            producer
                .send(record, Duration::from_secs(5))
                .await
                .expect("a later version's message produced");
        }
    }
    let body =
        json!({"model": MODEL, "prompt": "after the garbage", "max_tokens": 4, "stream": true});
    let events = sse_events(gw.post(&body).await).await;
    assert_eq!(texts(&events), gw.sim.expected_texts(&body));
    let metrics = gw.metrics().await;
    let requests = format!(
        r#"sluice_queue_messages_skipped_total{{reason="malformed",topic="sluice-test-{}.requests"}} 4"#,
        services.id
    );
    assert!(metrics.contains(&requests), "{metrics}");
    let responses = format!(
        r#"sluice_queue_messages_skipped_total{{reason="malformed",topic="sluice-test-{}.responses"}} 1"#,
        services.id
    );
    assert!(
        metrics.contains(&responses),
        "the edge's reply partition had one: {metrics}"
    );
    for (topic, count) in [("requests", 4), ("responses", 1)] {
        let versions = format!(
            r#"sluice_queue_messages_skipped_total{{reason="version",topic="sluice-test-{}.{topic}"}} {count}"#,
            services.id
        );
        assert!(metrics.contains(&versions), "{versions} in {metrics}");
    }
    assert!(
        gw.sim
            .received()
            .iter()
            .all(|r| r.body["prompt"] != "from a later release"),
        "a request of another protocol version never reaches vLLM"
    );
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_clearly_when_a_required_backend_is_unreachable() {
    let services = services!();
    let bad_store =
        config_from_toml("[store]\nurl = \"postgres://sluice:hunter2@127.0.0.1:1/db\"\n");
    let err = sluice::Gateway::start(bad_store)
        .await
        .err()
        .expect("startup fails")
        .to_string();
    assert!(
        err.contains("PostgreSQL") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "credentials never appear: {err}");

    let bad_queue = services.config(
        "http://127.0.0.1:9",
        "[queue]\nurl = \"kafka://127.0.0.1:1\"\n[worker]\nin_process = false\n",
    );
    let err = sluice::Gateway::start(bad_queue)
        .await
        .err()
        .expect("startup fails")
        .to_string();
    assert!(
        err.contains("Kafka") && err.contains("127.0.0.1:1"),
        "{err}"
    );

    // Redis is optional: an unreachable cache does not stop startup.
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(&sim.url(), "[cache]\nurl = \"redis://127.0.0.1:1\"\n");
    let gw = TestGateway::start_config(sim, config).await;
    let events = sse_events(
        gw.post(&json!({"model": MODEL, "prompt": "no redis", "max_tokens": 2, "stream": true}))
            .await,
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    gw.stop().await;
    services.drop_database().await;
}

/// Streams whole and in order: `max_tokens` text chunks, no error, `[DONE]`.
fn assert_complete(events: &[String], max_tokens: usize) {
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

fn texts_of_stream(events: &[String]) -> usize {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v["choices"][0]["text"].is_string())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_too_large_for_a_message_ends_only_its_own_request() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    // This worker's producer sends messages of at most 4 KB; the edge's is as usual.
    let small_messages = merge_toml(
        &services.kafka_queue(false),
        "[queue.producer]\n\"message.max.bytes\" = 4096\n",
    );
    let worker = Isolated::new("worker");
    let metrics = worker
        .start_worker(services.config(&sim.url(), &small_messages))
        .await;
    let edge = Isolated::new("edge");
    let (url, store) = edge
        .start_edge(services.config(&sim.url(), &services.kafka_queue(false)))
        .await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "oversize")
        .await
        .unwrap()
        .secret;
    let http = reqwest::Client::new();
    // An echoed 6 KB prompt makes a first chunk no 4 KB message can carry;
    // twenty streams beside it make batches that must be split.
    let huge = json!({"model": MODEL, "prompt": "word ".repeat(1200), "echo": true,
        "max_tokens": 40, "stream": true});
    let normal = |i: usize| json!({"model": MODEL, "prompt": format!("stream {i}"), "max_tokens": 60, "stream": true});
    let bodies: Vec<Value> = (0..20).map(normal).collect();
    let huge_request = async {
        let response = http
            .post(format!("{url}/v1/completions"))
            .bearer_auth(&key)
            .json(&huge)
            .send()
            .await
            .unwrap();
        (
            response.status(),
            request_id(&response),
            response.json::<Value>().await.unwrap(),
        )
    };
    let others = join_all(
        bodies
            .iter()
            .map(|body| stream_from(&http, &url, &key, body)),
    );
    let ((status, huge_id, error), others) = tokio::join!(huge_request, others);
    for events in &others {
        assert_complete(events, 60);
    }
    // The oversize chunk was the first: its client gets an OpenAI-shaped 500 saying why.
    assert_eq!(status, 500, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than the queue's message limit"),
        "{error}"
    );
    // Its generation was stopped on the upstream, not left running for nobody.
    assert!(sim.wait_for_abort(&huge_id, Duration::from_secs(5)).await);
    assert_eq!(
        metric(&metrics.render(), "sluice_queue_frames_too_large_total"),
        Some(1.0)
    );
    worker.kill();
    edge.kill();
    services.drop_database().await;
}

/// Relays TCP connections to `upstream`, passing at most `bytes_per_second`
/// from each client to the broker: a broker that takes data slowly.
async fn slow_proxy(listener: tokio::net::TcpListener, upstream: u16, bytes_per_second: f64) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_holds_the_worker_to_its_outbox_bound() {
    let services = services!();
    // A broker of its own, reached only through a proxy that passes 64 KB/s towards it.
    let (broker_port, proxy) = (
        free_port(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let proxy_port = proxy.local_addr().unwrap().port();
    let mut broker = start_tansu_advertising(broker_port, proxy_port);
    tokio::spawn(slow_proxy(proxy, broker_port, 64.0 * 1024.0));
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(1),
        ..sim_config()
    })
    .await
    .unwrap();
    let queue = merge_toml(
        &services.kafka_queue(false),
        &format!("[queue]\nurl = \"kafka://127.0.0.1:{proxy_port}\"\nmax_outbox_bytes = 8192\n"),
    );
    let worker = Isolated::new("worker");
    let metrics = worker
        .start_worker(services.config(&sim.url(), &queue))
        .await;
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(services.config(&sim.url(), &queue)).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "slow")
        .await
        .unwrap()
        .secret;
    let http = reqwest::Client::new();
    // Eight streams producing about 2 MB/s of responses between them, far more than the broker takes.
    let body = |i: usize| json!({"model": MODEL, "prompt": format!("slow {i}"), "max_tokens": 150, "stream": true});
    // The most the outbox ever held, sampled while the streams run.
    let most = Arc::new(std::sync::Mutex::new(0.0f64));
    let sampler = tokio::spawn({
        let (metrics, most) = (metrics.clone(), most.clone());
        async move {
            loop {
                let held = metric(&metrics.render(), "sluice_queue_outbox_bytes").unwrap_or(0.0);
                {
                    let mut most = most.lock().unwrap();
                    *most = most.max(held);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let bodies: Vec<Value> = (0..8).map(body).collect();
    let streams = join_all(bodies.iter().map(|b| stream_from(&http, &url, &key, b))).await;
    sampler.abort();
    for events in &streams {
        assert_complete(events, 150);
    }
    // The bound, plus at most one chunk from each job that found room at once.
    let most = *most.lock().unwrap();
    assert!(
        most > 0.0 && most <= 8192.0 + 8.0 * 1024.0,
        "the outbox held {most} bytes"
    );
    let rendered = metrics.render();
    assert!(
        metric(&rendered, "sluice_queue_outbox_full_total").unwrap_or(0.0) > 0.0,
        "the worker never had to wait: the broker was not slow enough to test anything"
    );
    worker.kill();
    edge.kill();
    broker.kill();
    services.drop_database().await;
}

/// A key made with `sluice keys create` on `config`; returns its secret.
fn create_key_with_cli(config: &std::path::Path, name: &str) -> String {
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
fn sluice_process(
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
fn log_tails(paths: &[&std::path::Path]) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_end_streams_cleanly_and_traffic_resumes() {
    let services = services!();
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(50),
        ..sim_config()
    })
    .await
    .unwrap();
    // A broker of this test's own (memory storage: a restart loses every
    // topic), and two edges and two workers as processes of their own.
    let broker_port = free_port();
    let mut broker = start_tansu(broker_port);
    let dir = tempfile::tempdir().unwrap();
    let process_config = |name: &str, listen: u16| {
        let toml = merge_toml(
            &services.kafka_queue(false),
            &format!(
                "[server]\nlisten = \"127.0.0.1:{listen}\"\n[store]\nurl = \"{}\"\n[cache]\nurl = \"off\"\n[upstream]\nurls = [\"{}\"]\n[log]\nlevel = \"warn\"\nformat = \"text\"\n[queue]\nurl = \"kafka://127.0.0.1:{broker_port}\"\n[worker]\nlisten = \"127.0.0.1:{listen}\"\n",
                services.postgres,
                sim.url()
            ),
        );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    };
    let mut processes = Vec::new();
    let (mut edges, mut worker_ports) = (Vec::new(), Vec::new());
    for (name, role) in [
        ("edge-a", "serve"),
        ("edge-b", "serve"),
        ("worker-a", "worker"),
        ("worker-b", "worker"),
    ] {
        let port = free_port();
        let config = process_config(name, port);
        let log = dir.path().join(format!("{name}.log"));
        processes.push((sluice_process(&config, &[role], &log), log));
        match role {
            "serve" => edges.push(format!("http://127.0.0.1:{port}")),
            _ => worker_ports.push(port),
        }
    }
    let logs = |processes: &[(tokio::process::Child, std::path::PathBuf)]| {
        log_tails(
            &processes
                .iter()
                .map(|(_, log)| log.as_path())
                .collect::<Vec<_>>(),
        )
    };
    let key = create_key_with_cli(&process_config("keys", free_port()), "restart");
    let http = reqwest::Client::new();
    let complete = |max_tokens: u32| json!({"model": MODEL, "prompt": "through a restart", "max_tokens": max_tokens, "stream": true});
    let post = |edge: &str, body: Value| {
        http.post(format!("{edge}/v1/completions"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let serves = |edge: String| {
        let post = &post;
        async move {
            eventually(Duration::from_secs(60), || async {
                let response = post(&edge, complete(3)).await.ok()?;
                (response.status() == 200).then_some(())?;
                let events = sse_events(response).await;
                (texts_of_stream(&events) == 3).then_some(())
            })
            .await
            .is_some()
        }
    };
    for edge in &edges {
        assert!(
            serves(edge.clone()).await,
            "{edge} came up\n{}",
            logs(&processes)
        );
    }

    for round in 0..3 {
        // A long stream is running when the broker dies.
        let edge = &edges[round % 2];
        let response = post(edge, complete(400)).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut reader = SseReader::new(response);
        assert!(reader.next().await.is_some(), "streaming");
        broker.kill();
        let killed = Instant::now();
        let mut rest = Vec::new();
        while let Some(event) = tokio::time::timeout(Duration::from_secs(20), reader.next())
            .await
            .expect("the stream ended within 20 s of the broker's death")
        {
            rest.push(event);
        }
        assert!(rest.iter().any(|e| e.contains("\"error\"")), "{rest:?}");
        assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
        eprintln!(
            "round {round}: the stream ended {:?} after the broker's death",
            killed.elapsed()
        );

        // While the broker is gone, new requests get an OpenAI-shaped 503.
        let refused = eventually(Duration::from_secs(20), || async {
            let response = post(edge, complete(3)).await.ok()?;
            (response.status() == 503).then_some(response.json::<Value>().await.ok()?)
        })
        .await
        .expect("503 while the broker is down");
        assert!(refused["error"]["message"].is_string(), "{refused}");

        // The broker comes back empty; the topics are made again and both edges serve.
        broker = start_tansu(broker_port);
        let back = Instant::now();
        for edge in &edges {
            assert!(
                serves(edge.clone()).await,
                "round {round}: {edge} did not serve again\n{}",
                logs(&processes)
            );
        }
        eprintln!(
            "round {round}: both edges served again {:?} after the restart",
            back.elapsed()
        );
    }
    for (process, log) in &mut processes {
        let exited = process.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "{} died ({exited:?})\n{}",
            log.display(),
            log_tails(&[log])
        );
    }
    // The workers' queue gauges follow (they are checked every few seconds).
    for port in &worker_ports {
        let queue_up = eventually(Duration::from_secs(15), || async {
            let metrics = scrape_metrics(&format!("http://127.0.0.1:{port}")).await?;
            (metric(&metrics, r#"sluice_backend_up{backend="queue"}"#) == Some(1.0)).then_some(())
        })
        .await;
        assert!(
            queue_up.is_some(),
            "a worker's queue gauge says the broker is back"
        );
    }
    for (process, _) in &mut processes {
        let _ = process.start_kill();
    }
    broker.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_after_a_worker_process_is_killed() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    // Two workers as processes of their own; one is killed with SIGKILL, so it
    // neither leaves the consumer group nor finishes anything.
    let dir = tempfile::tempdir().unwrap();
    let queue = merge_toml(
        &services.kafka_queue(false),
        "[queue]\nqueue_timeout_ms = 3000\nmax_attempts = 6\n",
    );
    let metrics_ports = [free_port(), free_port()];
    let worker_toml = |n: usize| {
        merge_toml(
            &queue,
            &format!(
                "[store]\nurl = \"sqlite://{}\"\n[upstream]\nurls = [\"{}\"]\n[log]\nlevel = \"warn\"\n[worker]\nlisten = \"127.0.0.1:{}\"\n",
                dir.path().join(format!("worker-{n}.db")).display(),
                sim.url(),
                metrics_ports[n]
            ),
        )
    };
    let mut workers = Vec::new();
    for n in 0..2 {
        let config = dir.path().join(format!("worker-{n}.toml"));
        std::fs::write(&config, worker_toml(n)).unwrap();
        let log = dir.path().join(format!("worker-{n}.log"));
        workers.push((sluice_process(&config, &["worker"], &log), log));
    }
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(services.config(&sim.url(), &queue)).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "sigkill")
        .await
        .unwrap()
        .secret;
    let http = reqwest::Client::new();
    let body = |i: usize| json!({"model": MODEL, "prompt": format!("after the kill {i}"), "max_tokens": 4, "stream": true});
    let served = eventually(Duration::from_secs(30), || async {
        let response = http
            .post(format!("{url}/v1/completions"))
            .bearer_auth(&key)
            .json(&body(0))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(served.is_some(), "the workers came up");
    // Both workers read partitions, so the one killed leaves some without a reader.
    let worker_urls = metrics_ports.map(|port| format!("http://127.0.0.1:{port}"));
    let assigned = |url: &str| {
        let url = url.to_string();
        async move {
            metric(
                &scrape_metrics(&url).await?,
                "sluice_queue_assigned_partitions",
            )
        }
    };
    let shared_out = eventually(Duration::from_secs(30), || async {
        let (a, b) = (
            assigned(&worker_urls[0]).await?,
            assigned(&worker_urls[1]).await?,
        );
        (a > 0.0 && b > 0.0 && a + b == 4.0).then_some(())
    })
    .await;
    assert!(
        shared_out.is_some(),
        "the two workers never shared the 4 partitions"
    );

    let (mut killed, _) = workers.remove(0);
    killed.start_kill().unwrap();
    killed.wait().await.unwrap();
    let killed_at = Instant::now();
    // Every request is answered in full: those sent to the dead worker's
    // partitions go again under other keys (each send lands on a read
    // partition by chance until the group has rebalanced, which takes the
    // session timeout and, on tansu, the survivor's rejoin: 12-15 s here, so
    // 6 sends of 3 s leave room for it).
    let bodies: Vec<Value> = (1..=12).map(body).collect();
    let answers = join_all(bodies.iter().map(|b| stream_from(&http, &url, &key, b))).await;
    for (events, sent) in answers.iter().zip(&bodies) {
        assert_eq!(texts(events), sim.expected_texts(sent), "{events:?}");
    }
    // Then the survivor reads every partition: once the dead member's session
    // is over (6 s here) and the group has rebalanced, a wave of requests
    // needs no re-send. A broker that keeps the dead member's partitions
    // unassigned (tansu 0.6) is made to rebalance by the survivor rejoining.
    let retries = || async { metric(&scrape_metrics(&url).await?, "sluice_queue_retries_total") };
    let mut wave = 100;
    let healed = eventually(Duration::from_secs(60), || {
        wave += 100;
        let bodies: Vec<Value> = (wave..wave + 12).map(body).collect();
        let (http, url, key, sim, retries) = (&http, &url, &key, &sim, &retries);
        async move {
            let before = retries().await?;
            let answers = join_all(bodies.iter().map(|b| stream_from(http, url, key, b))).await;
            for (events, sent) in answers.iter().zip(&bodies) {
                assert_eq!(texts(events), sim.expected_texts(sent), "{events:?}");
            }
            (retries().await? == before).then_some(())
        }
    })
    .await;
    let (survivor, log) = &mut workers[0];
    assert!(
        healed.is_some(),
        "60 s after the kill, requests still needed re-sends: some request partitions have no reader\n{}",
        log_tails(&[log])
    );
    let survivor_metrics = eventually(Duration::from_secs(10), || async {
        let text = scrape_metrics(&worker_urls[1]).await?;
        (metric(&text, "sluice_queue_assigned_partitions") == Some(4.0)).then_some(text)
    })
    .await
    .expect("the survivor's gauge shows it reads every partition");
    eprintln!(
        "every partition read again within {:.1} s of the kill; the survivor rejoined its group {} times",
        killed_at.elapsed().as_secs_f64(),
        metric(&survivor_metrics, "sluice_queue_group_rejoins_total").unwrap_or(0.0)
    );
    assert!(
        survivor.try_wait().unwrap().is_none(),
        "the surviving worker died\n{}",
        log_tails(&[log])
    );
    edge.kill();
    services.drop_database().await;
}
