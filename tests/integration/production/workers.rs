//! Edges and workers through Kafka: streams exactly once, retries, and losing an edge, a worker or a client.

use super::*;

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

/// Asks for a short completion that must be refused with a 503 whose
/// message says `says`; returns how long the refusal took.
async fn refused_with_503(http: &reqwest::Client, url: &str, key: &str, says: &str) -> Duration {
    let started = Instant::now();
    let response = http
        .post(format!("{url}/v1/completions"))
        .bearer_auth(key)
        .json(&json!({"model": MODEL, "prompt": "anyone there?", "max_tokens": 2, "stream": true}))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{error}");
    waited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_worker_alive_a_request_gets_503_at_once() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    // An edge and no worker at all, up longer than a worker may be silent.
    let queue = merge_toml(
        &services.kafka_queue(false),
        "[queue]\nqueue_timeout_ms = 5000\nmax_attempts = 3\n",
    );
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(services.config(&sim.url(), &queue)).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "nobody")
        .await
        .unwrap()
        .secret;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let waited = refused_with_503(&reqwest::Client::new(), &url, &key, "no worker serving").await;
    assert!(
        waited < Duration::from_secs(1),
        "not after max_attempts × queue_timeout_ms: {waited:?}"
    );
    assert!(sim.received().is_empty());
    let metrics = scrape_metrics(&url).await.unwrap();
    assert_eq!(metric(&metrics, "sluice_queue_retries_total"), Some(0.0));
    edge.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_live_worker_never_picks_up_gets_503_after_its_attempts() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    // A worker that is alive but busy: one request at a time, and that one long.
    let (edge, worker, url, key) = edge_and_worker_with(
        &services,
        &sim,
        "busy",
        "[queue]\nqueue_timeout_ms = 1500\nmax_attempts = 3\n[worker]\nconcurrency = 1\n",
    )
    .await;
    let http = reqwest::Client::new();
    let long = tokio::spawn({
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        async move {
            let body = json!({"model": MODEL, "prompt": "a long prefill", "max_tokens": 2, "stream": true, "sim_first_token_delay_ms": 9000});
            stream_from(&http, &url, &key, &body).await
        }
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            (!sim.received().is_empty()).then_some(())
        })
        .await
        .is_some()
    );
    let waited = refused_with_503(&http, &url, &key, "no worker picked the request up").await;
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
    long.abort();
    edge.kill();
    worker.kill();
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
    let workers = [Isolated::new("worker-1"), Isolated::new("worker-2")];
    let mut registries = Vec::new();
    for worker in &workers {
        registries.push(worker.start_worker(worker_config()).await);
    }
    let edge = Isolated::new("edge");
    let (url, store) = edge
        .start_edge(services.config(&sim.url(), &services.kafka_queue(false)))
        .await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "retry")
        .await
        .unwrap()
        .secret;
    // Both workers read their share of the request partitions (a kill during
    // the rebalance a join starts is another story: the group then waits for
    // the dead member).
    let gauge = |i: usize, name: &str| metric(&registries[i].render(), name).unwrap_or(0.0);
    let shared_out = eventually(Duration::from_secs(30), || async {
        let held = [0, 1].map(|i| gauge(i, "sluice_queue_assigned_partitions"));
        (held[0] > 0.0 && held[1] > 0.0 && held[0] + held[1] == 4.0).then_some(())
    })
    .await;
    assert!(
        shared_out.is_some(),
        "the two workers never shared the partitions"
    );

    // A long prefill: the worker accepts the request but sends no token for 2 s.
    let body = json!({"model": MODEL, "prompt": "slow start", "max_tokens": 8, "stream": true, "sim_first_token_delay_ms": 2000});
    let client = tokio::spawn({
        let (url, key, body) = (url.clone(), key.clone(), body.clone());
        async move { stream_from(&reqwest::Client::new(), &url, &key, &body).await }
    });
    let serving = eventually(Duration::from_secs(10), || async {
        if sim.received().is_empty() {
            return None; // not yet at vLLM
        }
        [0, 1]
            .into_iter()
            .find(|&i| gauge(i, "sluice_worker_inflight_requests") > 0.0)
    })
    .await
    .expect("a worker took the request to vLLM");
    let [first, second] = workers;
    let survivor = match serving {
        0 => {
            first.kill();
            second
        }
        _ => {
            second.kill();
            first
        }
    };

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
    survivor.kill();
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
