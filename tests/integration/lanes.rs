//! Real-time and batch on one fleet, against a simulated replica with a
//! fixed number of seats: requests over a full pool start in fair order
//! across keys, and batch lines never take the seats interactive requests
//! need.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use sluice_simulator::SimulatorConfig;

use crate::batch::{batch_object, create_batch, upload_lines};
use crate::common::*;

/// One replica of `seats` sequences, the gateway told its capacity.
async fn seated(seats: usize) -> TestGateway {
    let sim = SimulatorConfig {
        max_num_seqs: seats,
        token_delay: Duration::from_millis(20),
        first_token_delay: Duration::from_millis(20),
        ..sim_config()
    };
    TestGateway::start_with(sim, |c| {
        c.upstream.capacity = std::num::NonZeroU32::new(seats as u32).unwrap();
        c.cache.url = "off".to_string().into();
    })
    .await
}

async fn complete(gw: &TestGateway, key: &str, prompt: String) {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "ignore_eos": true});
    let response = gw
        .http
        .post(gw.completions_url())
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// A key's burst of twelve is queued first; another key's three, sent
/// after, start in turn with the burst instead of after all of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_one_key_takes_turns_with_another_key() {
    let gw = seated(2).await;
    let other = sluice::tenancy::keys::create_key(gw.store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    let gw = Arc::new(gw);
    let burst_done = Arc::new(AtomicUsize::new(0));
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let (gw, done) = (gw.clone(), burst_done.clone());
            tokio::spawn(async move {
                complete(&gw, &gw.key, format!("burst {i}")).await;
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    // The burst fills both seats and queues the rest.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(burst_done.load(Ordering::SeqCst), 0);
    let few: Vec<_> = (0..3)
        .map(|i| {
            let (gw, other) = (gw.clone(), other.clone());
            tokio::spawn(async move { complete(&gw, &other, format!("few {i}")).await })
        })
        .collect();
    for request in few {
        request.await.unwrap();
    }
    let before = burst_done.load(Ordering::SeqCst);
    assert!(
        before <= 6,
        "the other key's three took turns with the burst: {before} of its 12 ended first"
    );
    for request in burst {
        request.await.unwrap();
    }
    let metrics = gw.metrics().await;
    let waited = metric(&metrics, "sluice_wait_seconds_count{class=\"normal\"}").unwrap();
    assert_eq!(waited, 15.0, "every request passed the pool's gate");
}

/// A batch that could fill the replica runs beside an interactive client:
/// the replica never queues a request, since batch lines leave a seat.
#[tokio::test(flavor = "multi_thread")]
async fn batch_lines_leave_interactive_requests_their_seat() {
    let gw = seated(4).await;
    let lines: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            json!({"custom_id": format!("l{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": MODEL, "prompt": format!("line {i}"), "max_tokens": 8, "ignore_eos": true}})
        })
        .collect();
    let file = upload_lines(&gw.http, &gw.url, &gw.key, &lines).await;
    let id = create_batch(&gw.http, &gw.url, &gw.key, &file, "/v1/completions").await;
    let mut most_running = 0.0f64;
    let mut interactive = 0;
    loop {
        complete(&gw, &gw.key, format!("interactive {interactive}")).await;
        interactive += 1;
        let vllm = reqwest::get(format!("{}/metrics", gw.sim.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let waiting = metric(&vllm, "vllm:num_requests_waiting{model_name=\"sim-llama\"}").unwrap();
        let running = metric(&vllm, "vllm:num_requests_running{model_name=\"sim-llama\"}").unwrap();
        assert_eq!(
            waiting, 0.0,
            "the replica queued a request beside the batch"
        );
        most_running = most_running.max(running);
        let state = batch_object(&gw.http, &gw.url, &gw.key, &id).await;
        if state["status"] == "completed" {
            assert_eq!(state["request_counts"]["completed"], 40);
            break;
        }
    }
    assert!(
        interactive > 5,
        "the interactive client ran beside the batch"
    );
    assert!(
        most_running >= 3.0,
        "the batch used the seats it could: {most_running}"
    );
}
