//! OpenAI's Files and Batch APIs through the openai SDK, unchanged, in
//! embedded mode: batches end to end on three endpoints (each answer what
//! the same request gets alone), files and batches private to their key, a
//! malformed input file refused line by line, cancellation and expiry.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// Uploads `lines` as a batch input file for `key`; its id.
pub(crate) async fn upload_lines(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    lines: &[Value],
) -> String {
    let content: String = lines.iter().map(|line| format!("{line}\n")).collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(content.into_bytes()).file_name("input.jsonl"),
        );
    let response = http
        .post(format!("{url}/v1/files"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Creates a batch of `file` on `endpoint`; its id.
pub(crate) async fn create_batch(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    file: &str,
    endpoint: &str,
) -> String {
    let created: Value = http
        .post(format!("{url}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_string()
}

/// The batch as `GET /v1/batches/{id}` answers it.
pub(crate) async fn batch_object(http: &reqwest::Client, url: &str, key: &str, id: &str) -> Value {
    http.get(format!("{url}/v1/batches/{id}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs one scenario of `tests/openai_batch.py` against `gw`.
async fn scenario(gw: &TestGateway, name: &str) -> Value {
    let python = python_with_openai().expect("CI provides a Python with openai");
    let other = sluice::tenancy::keys::create_key(gw.store.as_ref(), "batch-other")
        .await
        .unwrap();
    run_sdk_script(
        &python,
        "openai_batch.py",
        &[&gw.url, &gw.key, &other.secret, MODEL, name],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_answers_each_line_as_the_route_answers_it_alone() {
    if python_with_openai().is_none() {
        return;
    }
    let gw = TestGateway::start().await;
    let out = scenario(&gw, "run").await;
    for (name, lines, prefix) in [
        ("chat", 30, "chat-"),
        ("completions", 10, "text-"),
        ("embeddings", 5, "vec-"),
    ] {
        let run = &out[name];
        assert_eq!(run["status"], "completed", "{name}: {run}");
        assert_eq!(run["counts"], json!([lines, lines, 0]), "{name}");
        assert_eq!(run["errors"], 0, "{name}");
        assert_eq!(run["status_codes"], json!([200]), "{name}");
        assert_eq!(
            run["same_as_alone"], lines,
            "{name}: every answer as the route gives it alone"
        );
        let mut ids: Vec<String> = (0..lines).map(|i| format!("{prefix}{i}")).collect();
        ids.sort();
        assert_eq!(run["custom_ids"], json!(ids), "{name}: each custom_id once");
        assert_eq!(run["metadata"], json!({"scenario": name}));
        let times: Vec<i64> = run["timestamps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().expect("set"))
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{name}: {times:?}");
    }
    assert_eq!(
        out["listed_batches"],
        json!([
            out["embeddings"]["batch"],
            out["completions"]["batch"],
            out["chat"]["batch"]
        ]),
        "newest first, read in pages of two"
    );
    assert_eq!(out["listed_files"].as_array().unwrap().len(), 3, "{out}");
    assert!(out["file_bytes"].as_i64().unwrap() > 1000);
    assert_eq!(out["deleted"], true);
    assert_eq!(out["after_delete"], 404);

    // The lines ran through the pipeline: each is in the inference log.
    let logged = eventually(Duration::from_secs(10), || async {
        let usage = gw.store.key_usage(None).await.unwrap();
        let served = usage.iter().find(|u| u.key_id == gw.key_id)?.served;
        (served >= 2 * 45).then_some(served)
    })
    .await;
    assert!(
        logged.is_some(),
        "batch lines and one-by-one requests logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn another_key_cannot_see_a_keys_files_or_batches() {
    if python_with_openai().is_none() {
        return;
    }
    let gw = TestGateway::start().await;
    let out = scenario(&gw, "others").await;
    for call in ["file", "content", "delete", "batch", "cancel", "create"] {
        assert_eq!(out[call], 404, "{call}: {out}");
    }
    assert_eq!(out["listed_files"], json!([]));
    assert_eq!(out["listed_batches"], json!([]));
    assert_eq!(out["owner_still_reads"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_input_file_fails_the_batch_naming_each_line() {
    if python_with_openai().is_none() {
        return;
    }
    // The single pool serves only MODEL, so another model is unknown.
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.upstream.models = vec![MODEL.to_string()];
    })
    .await;
    let out = scenario(&gw, "invalid").await;
    assert_eq!(out["status"], "failed");
    assert_eq!(out["failed_at"], true);
    assert_eq!(
        out["errors"],
        json!([
            [2, "invalid_json_line", null],
            [3, "invalid_url", "url"],
            [4, "duplicate_custom_id", "custom_id"],
            [5, "invalid_request", "body.stream"],
            [6, "model_not_found", "body.model"],
            [7, "missing_required_parameter", "body"],
        ])
    );
    assert_eq!(out["output"], Value::Null);
    assert_eq!(out["bad_endpoint"], 400);
    // Nothing was sent upstream.
    assert!(gw.sim.received().is_empty());
}

/// A file larger than one part goes in and out whole, and a batch reads
/// its lines across the parts; a file over the limit is refused (413) and
/// never listed.
#[tokio::test(flavor = "multi_thread")]
async fn files_are_streamed_in_parts_and_bounded() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.batch.file_part_bytes = std::num::NonZeroUsize::new(4096).unwrap();
        c.batch.max_file_bytes = std::num::NonZeroU64::new(100_000).unwrap();
    })
    .await;
    let lines: Vec<Value> = (0..120)
        .map(|i| {
            json!({"custom_id": format!("p{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": MODEL, "prompt": format!("{i} {}", "padding ".repeat(20)), "max_tokens": 2}})
        })
        .collect();
    let file = upload_lines(&gw.http, &gw.url, &gw.key, &lines).await;
    let sent: String = lines.iter().map(|line| format!("{line}\n")).collect();
    assert!(sent.len() > 8 * 4096, "several parts: {} bytes", sent.len());
    let content = gw
        .http
        .get(format!("{}/v1/files/{file}/content", gw.url))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(content, sent);
    let id = create_batch(&gw.http, &gw.url, &gw.key, &file, "/v1/completions").await;
    let done = eventually(Duration::from_secs(30), || async {
        let batch = batch_object(&gw.http, &gw.url, &gw.key, &id).await;
        (batch["status"] == "completed").then_some(batch)
    })
    .await
    .expect("the batch completes");
    assert_eq!(done["request_counts"]["completed"], 120);

    let too_big = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(vec![b'x'; 150_000]).file_name("big.jsonl"),
        );
    let refused = gw
        .http
        .post(format!("{}/v1/files", gw.url))
        .bearer_auth(&gw.key)
        .multipart(too_big)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    let listed: Value = gw
        .http
        .get(format!("{}/v1/files", gw.url))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["data"].as_array().unwrap().len(),
        2,
        "the input and the output: {listed}"
    );
}

/// A gateway running four batch lines at a time, so a long batch is
/// still running when the test acts on it.
async fn slow_batches() -> TestGateway {
    TestGateway::start_with(sim_config(), |c| {
        c.batch.concurrency = std::num::NonZeroUsize::new(4).unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_batch_ends_with_what_it_has() {
    if python_with_openai().is_none() {
        return;
    }
    let gw = slow_batches().await;
    let out = scenario(&gw, "cancel").await;
    assert_eq!(out["cancelling"], "cancelling");
    assert_eq!(out["status"], "cancelled");
    assert_eq!(out["cancelled_at"], true);
    let answered = out["answered"].as_i64().unwrap();
    assert!(answered < 200, "cancelled before the end: {out}");
    assert_eq!(
        out["lines"], 200,
        "every line in the output or the error file"
    );
    assert_eq!(out["unique"], 200);
    assert_eq!(out["error_codes"], json!(["batch_cancelled"]));
    assert_eq!(out["counts"][1], answered);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_past_its_window_expires_with_what_it_has() {
    if python_with_openai().is_none() {
        return;
    }
    let gw = slow_batches().await;
    let out = scenario(&gw, "expire").await;
    assert_eq!(out["status"], "expired");
    assert_eq!(out["expired_at"], true);
    assert!(out["answered"].as_i64().unwrap() < 200, "{out}");
    assert_eq!(out["lines"], 200);
    assert_eq!(out["unique"], 200);
    assert_eq!(out["error_codes"], json!(["batch_expired"]));
}
