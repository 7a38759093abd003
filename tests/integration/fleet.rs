//! A fleet: two models on two simulated replicas each. Failover before the
//! first byte, ejection and return of a replica, aliases, unknown models,
//! `/ready` and the endpoint metrics, and an endpoint that answers garbage.

use std::time::Duration;

use crate::common::processes::SimulatorProcess;
use crate::common::*;
use futures::future::join_all;
use serde_json::{Value, json};
use sluice::config::{Balance, ModelConfig};
use sluice_simulator::{Simulator, SimulatorConfig};

const MISTRAL: &str = "sim-mistral";

fn replica_config(model: &str) -> SimulatorConfig {
    SimulatorConfig {
        model: model.into(),
        token_delay: Duration::from_millis(5),
        first_token_delay: Duration::from_millis(5),
        ..SimulatorConfig::default()
    }
}

async fn replica(model: &str) -> Simulator {
    Simulator::start(replica_config(model)).await.unwrap()
}

fn model(name: &str, aliases: &[&str], replicas: &[&Simulator], balance: Balance) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        endpoints: replicas.iter().map(|r| r.url().parse().unwrap()).collect(),
        upstream_model: None,
        balance,
        continue_streams: true,
        capacity: None,
    }
}

async fn ready(gw: &TestGateway) -> (u16, Value) {
    let response = gw
        .http
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn request(model: &str, i: usize) -> Value {
    json!({"model": model, "prompt": format!("fleet request {i}"), "max_tokens": 4, "stream": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_under_load_costs_no_request_that_had_not_started() {
    let (llama_a, llama_b) = (replica(MODEL).await, replica(MODEL).await);
    let (mistral_a, mistral_b) = (replica(MISTRAL).await, replica(MISTRAL).await);
    let port_a = llama_a.addr().port();
    let fleet = vec![
        model(
            MODEL,
            &["llama"],
            &[&llama_a, &llama_b],
            Balance::RoundRobin,
        ),
        model(
            MISTRAL,
            &[],
            &[&mistral_a, &mistral_b],
            Balance::LeastOutstanding,
        ),
    ];
    let gw = TestGateway::start_with(sim_config(), move |c| {
        c.models = fleet;
        c.upstream.health_interval = Duration::from_millis(100);
        c.cache.url = "off".to_string().into();
    })
    .await;

    // Both models are served, by both of their replicas; the alias too.
    for i in 0..8 {
        for name in [MODEL, MISTRAL, "llama"] {
            let events = sse_events(gw.post(&request(name, i)).await).await;
            assert_eq!(events.last().unwrap(), "[DONE]", "{name}");
        }
    }
    assert_eq!(llama_a.received().len() + llama_b.received().len(), 16);
    assert!(!llama_a.received().is_empty() && !llama_b.received().is_empty());
    assert!(!mistral_a.received().is_empty() && !mistral_b.received().is_empty());
    assert!(
        mistral_a
            .received()
            .iter()
            .all(|r| r.body["model"] == MISTRAL)
    );
    // A model nobody serves: 404 without an upstream call.
    let total = || {
        [&llama_a, &llama_b, &mistral_a, &mistral_b]
            .iter()
            .map(|r| r.received().len())
            .sum::<usize>()
    };
    let before = total();
    let unknown = gw.post(&request("gpt-4", 0)).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(total(), before);
    // The configured models are the list.
    let ids = gw.model_ids(&gw.key).await;
    assert_eq!(ids, [MODEL, MISTRAL]);
    let (status, body) = ready(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"][MODEL]["healthy"], 2);

    // Load on the llama pair while replica A dies.
    let gw_ref = &gw;
    let load = join_all((0..60).map(|i| async move {
        tokio::time::sleep(Duration::from_millis(i as u64 * 5)).await;
        let response = gw_ref.post(&request(MODEL, 100 + i)).await;
        let status = response.status().as_u16();
        (status, sse_events(response).await)
    }));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(120)).await;
        llama_a.kill();
    };
    let (results, ()) = tokio::join!(load, kill);
    // Every request answered 200: those not yet streaming were retried on B.
    // (A stream already running on A when it died may end with an error event.)
    assert!(
        results.iter().all(|(status, _)| *status == 200),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let broken = results
        .iter()
        .filter(|(_, events)| events.iter().any(|e| e.contains("\"error\"")))
        .count();
    assert!(
        broken <= 10,
        "{broken} streams broke, more than were running on A"
    );
    let metrics = gw.metrics().await;
    let a = format!("http://127.0.0.1:{port_a}");
    let up = |metrics: &str| {
        metric(
            metrics,
            &format!(r#"sluice_endpoint_up{{endpoint="{a}",model="{MODEL}"}}"#),
        )
    };
    assert_eq!(up(&metrics), Some(0.0), "A is out");
    assert!(metric(&metrics, &format!(r#"sluice_endpoint_requests_total{{endpoint="{a}",model="{MODEL}",result="failed"}}"#)).unwrap_or(0.0) >= 1.0);
    let (status, body) = ready(&gw).await;
    assert_eq!(
        status, 200,
        "one healthy replica keeps the model ready: {body}"
    );
    assert_eq!(body["models"][MODEL]["healthy"], 1);

    // A comes back on the same port: taken back by the health check.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port_a))
        .await
        .unwrap();
    let revived = Simulator::serve(replica_config(MODEL), listener).unwrap();
    let back = eventually(Duration::from_secs(5), || async {
        (up(&gw.metrics().await) == Some(1.0)).then_some(())
    })
    .await;
    assert!(back.is_some(), "A is back in rotation");
    for i in 0..6 {
        sse_events(gw.post(&request(MODEL, 300 + i)).await).await;
    }
    assert!(!revived.received().is_empty(), "A serves again");

    // Both llama replicas failing: the model is not ready, and clients get an error, not a hang.
    revived.set_failing(true);
    llama_b.set_failing(true);
    let not_ready = eventually(Duration::from_secs(5), || async {
        let (status, body) = ready(&gw).await;
        (status == 503).then_some(body)
    })
    .await
    .expect("no healthy llama: not ready");
    assert_eq!(not_ready["models"][MODEL]["healthy"], 0);
    let response = gw.post(&request(MODEL, 400)).await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], 503);
    // Mistral is untouched.
    assert_eq!(gw.post(&request(MISTRAL, 400)).await.status(), 200);
}

#[tokio::test]
async fn an_endpoint_answering_garbage_is_a_502_and_counted() {
    let garbage = axum::Router::new()
        .route(
            "/v1/completions",
            axum::routing::post(|| async { "this is not server-sent events" }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, garbage).await });
    let fleet = vec![ModelConfig {
        name: "broken".into(),
        aliases: Vec::new(),
        endpoints: vec![url.parse().unwrap()],
        upstream_model: None,
        balance: Balance::RoundRobin,
        continue_streams: true,
        capacity: None,
    }];
    let gw = TestGateway::start_with(sim_config(), move |c| c.models = fleet).await;
    let response = tokio::time::timeout(Duration::from_secs(10), gw.post(&request("broken", 0)))
        .await
        .expect("an answer, not a hang");
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], 502);
    let metrics = gw.metrics().await;
    assert!(
        metric(&metrics, &format!(r#"sluice_endpoint_requests_total{{endpoint="{url}",model="broken",result="failed"}}"#))
            .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
}

#[test]
fn a_fleet_that_makes_no_sense_stops_startup_naming_the_key() {
    let load = |toml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        sluice::Config::load_with_env(Some(&path), []).map_err(|e| e.to_string())
    };
    let err = load("[[models]]\nname = \"a\"\nendpoints = []\n").unwrap_err();
    assert!(err.contains("models[0].endpoints"), "{err}");
    let err = load("[[models]]\nname = \"a\"\nendpoints = [\"not a url\"]\n").unwrap_err();
    assert!(err.contains("not a url"), "{err}");
    let err = load(
        "[[models]]\nname = \"a\"\nendpoints = [\"http://x:1\"]\n[[models]]\nname = \"b\"\naliases = [\"a\"]\nendpoints = [\"http://y:1\"]\n",
    )
    .unwrap_err();
    assert!(err.contains("models[1]") && err.contains("`a`"), "{err}");
    let err =
        load("[[models]]\nname = \"a\"\nendpoints = [\"http://x:1\"]\nbalance = \"random\"\n")
            .unwrap_err();
    assert!(err.contains("balance") || err.contains("random"), "{err}");
}

#[tokio::test]
async fn conversations_sharing_a_system_prompt_go_to_one_replica() {
    let (a, b) = (replica(MODEL).await, replica(MODEL).await);
    let fleet = vec![model(MODEL, &[], &[&a, &b], Balance::Prefix)];
    let gw = TestGateway::start_with(sim_config(), move |c| {
        c.models = fleet;
        c.cache.url = "off".to_string().into();
    })
    .await;
    let system = |n: usize| format!("You are assistant number {n}. Answer briefly and kindly.");
    for i in 0..12 {
        let body = json!({"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "system", "content": system(i % 2)},
            {"role": "user", "content": format!("question {i}")}]});
        assert_eq!(gw.post_chat(&body).await.status(), 200);
    }
    // Each replica saw one system prompt only, and both were used.
    for replica in [&a, &b] {
        let prompts: std::collections::HashSet<String> = replica
            .received()
            .iter()
            .map(|r| {
                r.body["messages"][0]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(prompts.len(), 1, "{prompts:?}");
        assert_eq!(replica.received().len(), 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_answer_survives_its_replica_dying_mid_generation() {
    let (mut replicas, gw) = two_replicas("20", true).await;
    // Ten JSON answers of 20 tokens (about half a second each), five on
    // each replica; one replica is SIGKILLed 150 ms in.
    let body = |i: usize| json!({"model": MODEL, "prompt": format!("whole answer {i}"), "max_tokens": 20, "stream": false});
    let gw_ref = &gw;
    let requests = join_all((0..10).map(|i| async move {
        let response = gw_ref.post(&body(i)).await;
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    }));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        replicas[0].kill();
    };
    let (answers, ()) = tokio::join!(requests, kill);
    for (i, (status, answer)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {answer}");
        assert_eq!(
            answer["choices"][0]["text"].as_str(),
            Some(gw.sim.expected_texts(&body(i))[0].as_str()),
            "request {i} got the whole answer, once: {answer}"
        );
        assert_eq!(answer["usage"]["completion_tokens"], 20, "{answer}");
    }
}

/// Two simulator processes (`token_delay_ms` per token, 20 ms to the first)
/// as one model's round-robin pool behind a gateway with no cache.
async fn two_replicas(
    token_delay_ms: &str,
    continue_streams: bool,
) -> ([SimulatorProcess; 2], TestGateway) {
    let args = [
        "--token-delay-ms",
        token_delay_ms,
        "--first-token-delay-ms",
        "20",
    ];
    let replicas = [
        SimulatorProcess::start(&args),
        SimulatorProcess::start(&args),
    ];
    let endpoints = replicas.iter().map(|r| r.url.parse().unwrap()).collect();
    let fleet = vec![ModelConfig {
        name: MODEL.into(),
        aliases: Vec::new(),
        endpoints,
        upstream_model: None,
        balance: Balance::RoundRobin,
        continue_streams,
        capacity: None,
    }];
    let gw = TestGateway::start_with(sim_config(), move |c| {
        c.models = fleet;
        c.cache.url = "off".to_string().into();
    })
    .await;
    (replicas, gw)
}

/// The replica running a stream, asked of each directly (vLLM's
/// `num_requests_running`).
async fn running_on(replicas: &[SimulatorProcess]) -> Option<usize> {
    for (i, replica) in replicas.iter().enumerate() {
        let metrics = scrape_metrics(&replica.url).await.unwrap_or_default();
        if metric(
            &metrics,
            r#"vllm:num_requests_running{model_name="sim-llama"}"#,
        ) == Some(1.0)
        {
            return Some(i);
        }
    }
    None
}

/// A stream whose replica is SIGKILLed mid-answer is continued on the other
/// replica: the client reads one uninterrupted stream, the same ids, no
/// duplicate or missing text (exactly the undisturbed greedy answer), and a
/// usage chunk counting what it received; for a completion and for a chat.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_survives_its_replica_dying_mid_answer() {
    // The third time, the model's switch is off: the client gets the error.
    for (chat, continue_streams) in [(false, true), (true, true), (false, false)] {
        let (mut replicas, gw) = two_replicas("25", continue_streams).await;
        let (url, body) = match chat {
            false => (
                gw.completions_url(),
                json!({"model": MODEL, "prompt": "a long story", "max_tokens": 40, "ignore_eos": true,
                    "stream": true, "stream_options": {"include_usage": true}}),
            ),
            true => (
                gw.chat_url(),
                json!({"model": MODEL, "messages": [{"role": "user", "content": "a long story"}],
                    "max_tokens": 40, "ignore_eos": true, "stream": true,
                    "stream_options": {"include_usage": true}}),
            ),
        };
        let response = gw
            .http
            .post(&url)
            .bearer_auth(&gw.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let id = request_id(&response);
        let mut reader = SseReader::new(response);
        let mut events = Vec::new();
        // Ten tokens in, the replica generating it dies.
        while events.len() < 10 {
            events.push(reader.next().await.expect("an event"));
        }
        let serving = running_on(&replicas)
            .await
            .expect("a replica is generating it");
        replicas[serving].kill();
        while let Some(event) = reader.next().await {
            events.push(event);
        }
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "chat={chat}: {events:?}"
        );
        if !continue_streams {
            let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
            assert_eq!(error["error"]["code"], 502, "{events:?}");
            continue;
        }
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(
            chunks.iter().all(|c| c.get("error").is_none()),
            "{events:?}"
        );
        let prefix = if chat { "chatcmpl-" } else { "cmpl-" };
        assert!(
            chunks.iter().all(|c| c["id"] == format!("{prefix}{id}")),
            "one stream, one id: {events:?}"
        );
        let roles = chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"].get("role").is_some())
            .count();
        assert_eq!(roles, usize::from(chat), "one role chunk");
        // The undisturbed answer, from the replica still alive.
        let survivor = &replicas[1 - serving].url;
        let direct = gw
            .http
            .post(format!("{survivor}{}", url.trim_start_matches(&gw.url)))
            .header("x-request-id", "undisturbed")
            .json(&body)
            .send()
            .await
            .unwrap();
        let direct = sse_events(direct).await;
        assert_eq!(
            texts(&events),
            texts(&direct),
            "chat={chat}: the same text, once"
        );
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], 40, "{usage}");
        let undisturbed: Value = serde_json::from_str(&direct[direct.len() - 2]).unwrap();
        assert_eq!(
            usage["prompt_tokens"],
            undisturbed["usage"]["prompt_tokens"]
        );
        let metrics = gw.metrics().await;
        assert_eq!(
            metric(
                &metrics,
                r#"sluice_stream_continuations_total{outcome="continued"}"#
            ),
            Some(1.0)
        );
        let row = eventually(Duration::from_secs(5), || async {
            gw.store.inferences_for(&id).await.unwrap().pop()
        })
        .await
        .expect("an inference-log row");
        assert_eq!(row.continuations, 1, "{row:?}");
        assert_eq!(row.status, 200, "{row:?}");
    }
}

/// Fifty greedy streams (completions and chats) through `url`, spread over
/// `replicas`; once each has had five chunks, the first replica is
/// SIGKILLed. Every client gets the whole answer, exactly what the
/// surviving replica answers undisturbed, with no error event. Returns
/// the streams' request ids.
pub(crate) async fn fifty_streams_survive_a_replica_kill(
    url: &str,
    key: &str,
    replicas: &mut [SimulatorProcess; 2],
) -> Vec<String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const STREAMS: usize = 50;
    let http = reqwest::Client::new();
    let ready = Arc::new(AtomicUsize::new(0));
    let kill = Arc::new(tokio::sync::Notify::new());
    let body = |i: usize| -> (&'static str, Value) {
        match i % 2 {
            0 => (
                "/v1/completions",
                json!({"model": MODEL, "prompt": format!("story {i}"),
                "max_tokens": 60, "ignore_eos": true, "temperature": 0, "stream": true}),
            ),
            _ => (
                "/v1/chat/completions",
                json!({"model": MODEL,
                "messages": [{"role": "user", "content": format!("story {i}")}],
                "max_tokens": 60, "ignore_eos": true, "temperature": 0, "stream": true}),
            ),
        }
    };
    let clients: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (path, body) = body(i);
            let request = http
                .post(format!("{url}{path}"))
                .bearer_auth(key)
                .json(&body);
            let (ready, kill) = (ready.clone(), kill.clone());
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 200);
                let id = request_id(&response);
                let mut reader = SseReader::new(response);
                let mut events = Vec::new();
                while let Some(event) = reader.next().await {
                    events.push(event);
                    if events.len() == 5 && ready.fetch_add(1, Ordering::SeqCst) + 1 == STREAMS {
                        kill.notify_one();
                    }
                }
                (id, events)
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), kill.notified())
        .await
        .expect("every stream started");
    replicas[0].kill();
    let survivor = replicas[1].url.clone();
    let mut ids = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (id, events) = client.await.unwrap();
        ids.push(id);
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "stream {i}: {events:?}"
        );
        assert!(
            events.iter().all(|e| !e.contains("\"error\"")),
            "stream {i}: {events:?}"
        );
        let (path, body) = body(i);
        let direct = http
            .post(format!("{survivor}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let direct = sse_events(direct).await;
        assert_eq!(
            texts(&events),
            texts(&direct),
            "stream {i}: the whole answer, once"
        );
    }
    ids
}

/// How many of `ids` the inference log shows continued.
pub(crate) async fn continued_in_the_log(
    store: &dyn sluice::backends::store::Store,
    ids: &[String],
) -> usize {
    let mut continued = 0;
    for id in ids {
        let row = eventually(Duration::from_secs(5), || async {
            store.inferences_for(id).await.unwrap().pop()
        })
        .await
        .unwrap_or_else(|| panic!("no inference-log row for {id}"));
        continued += usize::from(row.continuations > 0);
    }
    continued
}

/// Fifty concurrent streams, one replica SIGKILLed mid-answer: every
/// stream continues on the other.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_streams_survive_their_replica_dying() {
    let (mut replicas, gw) = two_replicas("25", true).await;
    let ids = fifty_streams_survive_a_replica_kill(&gw.url, &gw.key, &mut replicas).await;
    let continued = continued_in_the_log(gw.store.as_ref(), &ids).await;
    assert!(
        (1..50).contains(&continued),
        "{continued} of 50 logged as continued"
    );
}
