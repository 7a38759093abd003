//! The Batch API in production mode: files and batches in PostgreSQL, the
//! lines through Kafka to workers in other processes, the runners on two
//! edges sharing the work through leases. A worker and then an edge are
//! killed in the middle of a 2,000-line batch: the output is complete and
//! exact, each `custom_id` once.

use super::*;
use crate::batch::{batch_object as batch, create_batch, upload_lines as upload};

/// Both edges' config: Kafka, no in-process worker, short batch leases so a
/// dead edge's lines run elsewhere within the test.
fn batch_config(services: &Services, sim: &str) -> sluice::Config {
    let extra = format!(
        "{}\n[batch]\nlease_ms = 1000\npoll_ms = 50\n",
        services.kafka_queue(false)
    );
    services.config(sim, &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_a_batch_through_kafka() {
    let services = services!();
    let python = python_with_openai().expect("CI provides a Python with openai");
    let sim = Simulator::start(sim_config()).await.unwrap();
    let (worker_1, worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    worker_1
        .start_worker(batch_config(&services, &sim.url()))
        .await;
    worker_2
        .start_worker(batch_config(&services, &sim.url()))
        .await;
    let (edge_a, edge_b) = (Isolated::new("edge-a"), Isolated::new("edge-b"));
    let (url, store) = edge_a.start_edge(batch_config(&services, &sim.url())).await;
    edge_b.start_edge(batch_config(&services, &sim.url())).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "sdk")
        .await
        .unwrap()
        .secret;
    let other = sluice::tenancy::keys::create_key(store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    let out = run_sdk_script(
        &python,
        "openai_batch.py",
        &[&url, &key, &other, MODEL, "run"],
    )
    .await;
    for (name, lines) in [("chat", 30), ("completions", 10), ("embeddings", 5)] {
        assert_eq!(out[name]["status"], "completed", "{name}: {out}");
        assert_eq!(out[name]["counts"], json!([lines, lines, 0]), "{name}");
        assert_eq!(out[name]["same_as_alone"], lines, "{name}");
    }
    for rt in [edge_a, edge_b, worker_1, worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}

/// Waits until the batch has answered `lines` lines (or ended).
async fn answered(http: &reqwest::Client, url: &str, key: &str, id: &str, lines: i64) -> Value {
    eventually(Duration::from_secs(180), || async {
        let batch = batch(http, url, key, id).await;
        let done = batch["request_counts"]["completed"].as_i64().unwrap_or(0)
            + batch["request_counts"]["failed"].as_i64().unwrap_or(0);
        (done >= lines || batch["status"] != "in_progress" && batch["status"] != "validating")
            .then_some(batch)
    })
    .await
    .unwrap_or_else(|| panic!("batch {id} did not answer {lines} lines"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_survives_a_worker_and_an_edge_killed_mid_way() {
    let services = services!();
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(1),
        first_token_delay: Duration::from_millis(2),
        ..sim_config()
    })
    .await
    .unwrap();
    let (worker_1, worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    worker_1
        .start_worker(batch_config(&services, &sim.url()))
        .await;
    worker_2
        .start_worker(batch_config(&services, &sim.url()))
        .await;
    let (edge_a, edge_b) = (Isolated::new("edge-a"), Isolated::new("edge-b"));
    let (url_a, store) = edge_a.start_edge(batch_config(&services, &sim.url())).await;
    let (url_b, _) = edge_b.start_edge(batch_config(&services, &sim.url())).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "bulk")
        .await
        .unwrap()
        .secret;
    let http = reqwest::Client::new();
    let body = |i: usize| json!({"model": MODEL, "prompt": format!("Field {i} of the survey"), "max_tokens": 4, "temperature": 0});
    let lines: Vec<Value> = (0..2000)
        .map(|i| json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/completions", "body": body(i)}))
        .collect();
    let file = upload(&http, &url_a, &key, &lines).await;
    let id = create_batch(&http, &url_a, &key, &file, "/v1/completions").await;

    let running = |batch: &Value| {
        batch["status"] == "in_progress"
            && batch["request_counts"]["completed"].as_i64().unwrap() < 2000
    };
    let at_first_kill = answered(&http, &url_b, &key, &id, 400).await;
    assert!(running(&at_first_kill), "killed mid-batch: {at_first_kill}");
    worker_1.kill();
    let at_second_kill = answered(&http, &url_b, &key, &id, 1000).await;
    assert!(
        running(&at_second_kill),
        "killed mid-batch: {at_second_kill}"
    );
    edge_a.kill();
    let done = answered(&http, &url_b, &key, &id, 2000).await;
    let done = eventually(Duration::from_secs(60), || async {
        let batch = batch(&http, &url_b, &key, &id).await;
        (batch["status"] == "completed").then_some(batch)
    })
    .await
    .unwrap_or_else(|| panic!("the batch did not complete: {done}"));
    assert_eq!(
        done["request_counts"],
        json!({"total": 2000, "completed": 2000, "failed": 0})
    );
    assert_eq!(done["error_file_id"], Value::Null);

    let output = http
        .get(format!(
            "{url_b}/v1/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for line in output.lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        let custom_id = line["custom_id"].as_str().unwrap().to_string();
        let i: usize = custom_id.trim_start_matches("line-").parse().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(
            line["response"]["body"]["choices"][0]["text"],
            sim.expected_texts(&body(i))[0],
            "{custom_id}"
        );
        assert!(seen.insert(custom_id.clone()), "{custom_id} written twice");
    }
    assert_eq!(seen.len(), 2000, "every line in the output");
    for rt in [edge_b, worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}
