//! The broker misbehaving: down, slow, restarted, sent garbage or oversize messages.

use super::*;

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
    // twenty streams beside it make batches that must be split. The answer
    // is long (5 s) so that it is still running when the worker refuses its
    // first chunk, however busy the broker: only a cancel stops it early.
    let huge = json!({"model": MODEL, "prompt": "word ".repeat(1200), "echo": true,
        "max_tokens": 2500, "ignore_eos": true, "stream": true});
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
