//! End-to-end tests of the embedded mode: a gateway on port 0 (SQLite store,
//! in-process cache and queue) in front of the simulated vLLM.

use std::time::{Duration, Instant};

use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn sse_stream_is_the_upstream_stream_field_by_field() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "prompt": ["The river", "A bridge"], "max_tokens": 5, "n": 2,
        "logprobs": 1, "echo": true, "seed": 3, "stream": true, "stream_options": {"include_usage": true}});
    let response = gw.post(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let id = request_id(&response);
    let via_gateway = sse_events(response).await;
    let direct_events = sse_events(direct(&gw.sim, &body, &id).await).await;

    assert_eq!(
        via_gateway.len(),
        2 * 2 * 5 + 2,
        "20 token chunks, the usage chunk, [DONE]"
    );
    assert_eq!(via_gateway.len(), direct_events.len());
    for (ours, theirs) in via_gateway.iter().zip(&direct_events) {
        assert_eq!(without_created(ours), without_created(theirs));
    }
    let usage: Value = serde_json::from_str(&via_gateway[via_gateway.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 20);
    assert_eq!(via_gateway.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn usage_chunk_is_only_sent_to_clients_that_ask_for_it() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": true});
    let events = sse_events(gw.post(&body).await).await;
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events[..3].iter().all(|e| {
        !serde_json::from_str::<Value>(e).unwrap()["choices"]
            .as_array()
            .unwrap()
            .is_empty()
    }));
    // The upstream was still asked for usage, so the gateway can log token counts.
    let upstream = &gw.sim.received()[0].body;
    assert_eq!(upstream["stream"], true);
    assert_eq!(upstream["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn json_response_is_the_upstream_body_field_by_field() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "prompt": "The river", "max_tokens": 6, "n": 2, "logprobs": 2, "top_k": 5});
    let response = gw.post(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let id = request_id(&response);
    let ours: Value = response.json().await.unwrap();
    let theirs: Value = direct(&gw.sim, &body, &id).await.json().await.unwrap();
    assert_eq!(
        without_created(&ours.to_string()),
        without_created(&theirs.to_string())
    );
    assert_eq!(ours["object"], "text_completion");
    assert_eq!(ours["usage"]["completion_tokens"], 12);
    // Unknown fields reach the upstream untouched.
    assert_eq!(gw.sim.received()[0].body["top_k"], 5);
}

#[tokio::test]
async fn cache_hit_replays_identical_chunks_without_calling_upstream() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "prompt": "cache me", "max_tokens": 8, "stream": true});
    let first_response = gw.post(&body).await;
    let first_id = request_id(&first_response);
    let first = sse_events(first_response).await;
    // The entry is written once the stream completes; allow the write to land.
    let second = eventually(Duration::from_secs(2), || async {
        let response = gw.post(&body).await;
        let id = request_id(&response);
        let events = sse_events(response).await;
        (gw.sim.received().len() == 1).then_some((id, events))
    })
    .await
    .expect("a cache hit");
    assert_eq!(
        ids_blanked(&first),
        ids_blanked(&second.1),
        "identical chunks, identical boundaries"
    );
    // Each answer's chunks name its own request, as vLLM's would.
    let named = |events: &[String], id: &str| {
        events[..events.len() - 1]
            .iter()
            .all(|e| e.contains(&format!(r#""id":"cmpl-{id}""#)))
    };
    assert!(named(&first, &first_id), "{first:?}");
    assert!(named(&second.1, &second.0), "{:?}", second.1);
    assert_eq!(gw.sim.received().len(), 1);

    // A non-streaming request for the same completion is served from the same entry.
    let json_body = json!({"model": MODEL, "prompt": "cache me", "max_tokens": 8});
    let assembled: Value = gw.post(&json_body).await.json().await.unwrap();
    assert_eq!(
        assembled["choices"][0]["text"].as_str().unwrap(),
        texts(&first)[0]
    );
    assert_eq!(gw.sim.received().len(), 1);

    let row = eventually(Duration::from_secs(3), || async {
        gw.store.inferences_for(&second.0).await.unwrap().pop()
    })
    .await
    .expect("inference log row for the hit");
    assert!(row.cache_hit);
    assert_eq!(row.status, 200);
    assert_eq!(row.completion_tokens, 8);
}

#[tokio::test]
async fn different_sampling_parameters_do_not_share_a_cache_entry() {
    let gw = TestGateway::start().await;
    let a = json!({"model": MODEL, "prompt": "p", "max_tokens": 4, "temperature": 0.0});
    let b = json!({"model": MODEL, "prompt": "p", "max_tokens": 4, "temperature": 0.9});
    gw.post(&a).await.bytes().await.unwrap();
    gw.wait_cached(1).await;
    gw.post(&b).await.bytes().await.unwrap();
    assert_eq!(
        gw.sim.received().len(),
        2,
        "b was not served from a's entry"
    );
    gw.post(&a).await.bytes().await.unwrap();
    assert_eq!(gw.sim.received().len(), 2, "a itself is cached");
}

#[tokio::test]
async fn websocket_serves_two_requests_on_one_connection() {
    let gw = TestGateway::start().await;
    let mut ws = gw.ws().await;
    for prompt in ["first prompt", "second prompt"] {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": true});
        ws.send(Message::Text(body.to_string().into()))
            .await
            .unwrap();
        let mut frames = Vec::new();
        while let Some(Ok(Message::Text(text))) = ws.next().await {
            let done = text.as_str() == "[DONE]";
            frames.push(text.to_string());
            if done {
                break;
            }
        }
        assert_eq!(frames.len(), 5, "{frames:?}");
        assert_eq!(texts(&frames), gw.sim.expected_texts(&body));
        let chunk: Value = serde_json::from_str(&frames[0]).unwrap();
        assert_eq!(chunk["object"], "text_completion");
    }
    // A non-streaming request over the socket gets the assembled body, then [DONE].
    let body = json!({"model": MODEL, "prompt": "third", "max_tokens": 3});
    ws.send(Message::Text(body.to_string().into()))
        .await
        .unwrap();
    let Some(Ok(Message::Text(full))) = ws.next().await else {
        panic!("no body frame")
    };
    let full: Value = serde_json::from_str(&full).unwrap();
    assert_eq!(
        full["choices"][0]["text"].as_str().unwrap(),
        gw.sim.expected_texts(&body)[0]
    );
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.as_str() == "[DONE]"));
}

#[tokio::test]
async fn websocket_accepts_the_key_as_a_query_parameter_and_rejects_bad_frames() {
    let gw = TestGateway::start().await;
    let url = format!("{}?api_key={}", gw.ws_url(), gw.key);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for bad in [
        Message::Text("not json".into()),
        Message::Text("{\"model\":1}".into()),
        Message::Binary(vec![1, 2].into()),
    ] {
        ws.send(bad).await.unwrap();
        let Some(Ok(Message::Text(error))) = ws.next().await else {
            panic!("no error frame")
        };
        let error: Value = serde_json::from_str(&error).unwrap();
        assert_eq!(error["error"]["code"], 400, "{error}");
        assert_eq!(error["error"]["type"], "BadRequestError");
        assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.as_str() == "[DONE]"));
    }
    // The connection still serves requests afterwards.
    let body = json!({"model": MODEL, "prompt": "still alive", "max_tokens": 2, "stream": true});
    ws.send(Message::Text(body.to_string().into()))
        .await
        .unwrap();
    let Some(Ok(Message::Text(chunk))) = ws.next().await else {
        panic!("no chunk")
    };
    assert!(chunk.as_str().contains("text_completion"));
}

#[tokio::test]
async fn websocket_without_a_valid_key_is_refused_readably() {
    let gw = TestGateway::start().await;
    let url = format!("{}?api_key=sk-sluice-wrong", gw.ws_url());
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert!(response.headers().contains_key("x-request-id"));
    let Some(Ok(Message::Text(error))) = ws.next().await else {
        panic!("no error frame")
    };
    let error: Value = serde_json::from_str(error.as_str()).unwrap();
    assert_eq!(error["error"]["code"], 401);
    assert_eq!(error["error"]["type"], "AuthenticationError");
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.as_str() == "[DONE]"));
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4401),
        other => panic!("expected close 4401, got {other:?}"),
    }
    // The refused login is counted like a REST 401.
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_total{route="/v1/completions",status="4xx",transport="ws"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
}

async fn assert_openai_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert_eq!(error["param"], Value::Null);
    assert_eq!(error["code"], status, "{body}");
    body
}

#[tokio::test]
async fn missing_invalid_and_revoked_keys_get_401() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 1});
    let missing = gw
        .http
        .post(gw.completions_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_openai_error(missing, 401).await;
    let invalid = gw
        .http
        .post(gw.completions_url())
        .bearer_auth("sk-sluice-nope")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_openai_error(invalid, 401).await;

    let key = sluice::tenancy::keys::create_key(gw.store.as_ref(), "to-revoke")
        .await
        .unwrap();
    let ok = gw
        .http
        .post(gw.completions_url())
        .bearer_auth(&key.secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.status(),
        200,
        "the key works before revocation (and is now remembered)"
    );
    assert_eq!(gw.store.revoke_key("to-revoke").await.unwrap(), 1);
    let revoked_at = Instant::now();
    let refused = eventually(Duration::from_secs(3), || async {
        let response = gw
            .http
            .post(gw.completions_url())
            .bearer_auth(&key.secret)
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status() == 401).then_some(revoked_at.elapsed())
    })
    .await
    .expect("revoked key refused");
    assert!(
        refused < Duration::from_millis(1100),
        "revocation took {refused:?}"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_nothing_else_breaks() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.max_body_bytes = 4096.try_into().unwrap()
    })
    .await;
    let post_raw = |body: String| {
        gw.http
            .post(gw.completions_url())
            .bearer_auth(&gw.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let err = assert_openai_error(post_raw("{\"model\": ".into()).await.unwrap(), 400).await;
    assert!(err["error"]["message"].as_str().unwrap().contains("JSON"));
    let err = assert_openai_error(
        post_raw(json!({"model": MODEL, "prompt": "x", "max_tokens": "many"}).to_string())
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let err = assert_openai_error(
        post_raw(json!({"prompt": "x"}).to_string()).await.unwrap(),
        400,
    )
    .await;
    assert!(err["error"]["message"].as_str().unwrap().contains("model"));
    let err = assert_openai_error(
        post_raw(json!({"model": MODEL}).to_string()).await.unwrap(),
        400,
    )
    .await;
    assert!(err["error"]["message"].as_str().unwrap().contains("prompt"));
    assert_openai_error(
        post_raw(json!({"model": MODEL, "prompt": 5}).to_string())
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_openai_error(post_raw("[1, 2, 3]".into()).await.unwrap(), 400).await;
    assert_openai_error(
        post_raw(json!({"model": MODEL, "prompt": "x".repeat(5000)}).to_string())
            .await
            .unwrap(),
        413,
    )
    .await;

    let unknown = gw
        .http
        .get(format!("{}/v1/chat/nothing", gw.url))
        .send()
        .await
        .unwrap();
    assert_openai_error(unknown, 404).await;
    let wrong_method = gw.http.delete(gw.completions_url()).send().await.unwrap();
    assert_openai_error(wrong_method, 405).await;
    let plain_get = gw
        .http
        .get(gw.completions_url())
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_openai_error(plain_get, 400).await;

    assert_eq!(
        gw.sim.received().len(),
        0,
        "no bad request reached the upstream"
    );
    let ok = gw
        .post(&json!({"model": MODEL, "prompt": "fine", "max_tokens": 2}))
        .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn upstream_errors_before_the_first_chunk_keep_their_status() {
    let gw = TestGateway::start().await;
    let not_found = gw
        .post(&json!({"model": "no-such-model", "prompt": "x", "stream": true}))
        .await;
    let err = assert_openai_error(not_found, 404).await;
    assert_eq!(err["error"]["type"], "NotFoundError");
    assert_eq!(
        err["error"]["message"],
        "The model `no-such-model` does not exist."
    );

    let unavailable = gw
        .post(&json!({"model": MODEL, "prompt": "x", "sim_error_status": 503}))
        .await;
    assert_openai_error(unavailable, 503).await;
}

#[tokio::test]
async fn upstream_errors_after_the_first_chunk_end_the_stream_with_an_error_event() {
    let gw = TestGateway::start().await;
    let response = gw.post(&json!({"model": MODEL, "prompt": "x", "max_tokens": 10, "stream": true, "sim_error_after": 3})).await;
    assert_eq!(response.status(), 200);
    let events = sse_events(response).await;
    assert_eq!(events.len(), 5, "{events:?}");
    let error: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(error["error"]["code"], 500);
    assert_eq!(error["error"]["message"], "simulated failure mid-stream");
    assert_eq!(events[4], "[DONE]");

    // A failed response is not cached: once a later response has been
    // stored, the failed one is still a miss.
    sse_events(
        gw.post(&json!({"model": MODEL, "prompt": "y", "max_tokens": 2, "stream": true}))
            .await,
    )
    .await;
    gw.wait_cached(1).await;
    let again = sse_events(gw.post(&json!({"model": MODEL, "prompt": "x", "max_tokens": 10, "stream": true, "sim_error_after": 3})).await).await;
    assert_eq!(again.len(), 5);
    assert_eq!(gw.sim.received().len(), 3);
}

#[tokio::test]
async fn a_stalled_or_truncated_upstream_ends_the_stream_with_an_error() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.upstream.idle_timeout = Duration::from_millis(300)
    })
    .await;
    let events = sse_events(
        gw.post(&json!({"model": MODEL, "prompt": "x", "stream": true, "sim_stall_after": 2}))
            .await,
    )
    .await;
    assert_eq!(events.len(), 4, "{events:?}");
    let error: Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(error["error"]["code"], 504);

    let events = sse_events(
        gw.post(&json!({"model": MODEL, "prompt": "y", "stream": true, "sim_drop_after": 2}))
            .await,
    )
    .await;
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], 502, "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");

    // Non-streaming: the error is the HTTP status.
    let response = gw
        .post(&json!({"model": MODEL, "prompt": "z", "sim_stall_after": 1}))
        .await;
    assert_openai_error(response, 504).await;
}

#[tokio::test]
async fn client_disconnect_aborts_the_upstream_generation() {
    let slow = sluice_simulator::SimulatorConfig {
        token_delay: Duration::from_millis(50),
        ..sim_config()
    };
    // Resumable, the stream waits this long for its client to come back.
    let gw = TestGateway::start_with(slow, |c| c.resume.grace = Duration::from_millis(100)).await;
    let response = gw
        .post(&json!({"model": MODEL, "prompt": "long", "max_tokens": 1000, "stream": true}))
        .await;
    let id = request_id(&response);
    let mut reader = SseReader::new(response);
    assert!(reader.next().await.is_some(), "first chunk arrives");
    drop(reader);
    assert!(
        gw.sim.wait_for_abort(&id, Duration::from_secs(2)).await,
        "upstream generation aborted"
    );
    let row = eventually(Duration::from_secs(3), || async {
        gw.store.inferences_for(&id).await.unwrap().pop()
    })
    .await
    .expect("log row");
    assert_eq!(row.status, 499);

    // The same over WebSocket: closing the socket aborts the generation.
    let url = format!("{}?api_key={}", gw.ws_url(), gw.key);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let body = json!({"model": MODEL, "prompt": "long ws", "max_tokens": 1000, "stream": true});
    ws.send(Message::Text(body.to_string().into()))
        .await
        .unwrap();
    let id = first_chunk_request_id(&mut ws).await;
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(
        gw.sim.wait_for_abort(&id, Duration::from_secs(2)).await,
        "upstream generation aborted after WS close"
    );
}

#[tokio::test]
async fn every_request_writes_one_inference_log_row() {
    let gw = TestGateway::start().await;
    let response = gw
        .post(&json!({"model": MODEL, "prompt": "count my tokens please", "max_tokens": 7}))
        .await;
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let rows = eventually(Duration::from_secs(3), || async {
        let rows = gw.store.inferences_for(&id).await.unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await
    .expect("row written");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.key_id, gw.key_id);
    assert_eq!(row.model, MODEL);
    assert_eq!(row.prompt_tokens, 4);
    assert_eq!(row.completion_tokens, 7);
    assert!(!row.cache_hit);
    assert_eq!(row.status, 200);
    assert!(row.ttft_ms.is_some_and(|t| t > 0.0));
    assert!(row.total_ms >= row.ttft_ms.unwrap());

    let usage = gw.store.key_usage(None).await.unwrap();
    assert_eq!(usage[0].completion_tokens, 7);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let gw = TestGateway::start().await;
    let health: Value = gw
        .http
        .get(format!("{}/health", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready: Value = gw
        .http
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["backends"]["store"]["status"], "ok");

    let body = json!({"model": MODEL, "prompt": "metrics", "max_tokens": 3, "stream": true});
    sse_events(gw.post(&body).await).await;
    gw.wait_cached(1).await;
    sse_events(gw.post(&body).await).await;
    gw.http
        .post(gw.completions_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"sluice_requests_total{route="/v1/completions",status="2xx",transport="sse"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"sluice_requests_total{route="/v1/completions",status="4xx",transport="json"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_cache_lookups_total{result="hit"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_cache_lookups_total{result="miss"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"sluice_time_to_first_token_seconds_count{cache="hit",transport="sse"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_active_streams 0"), "{metrics}");
    assert!(
        metrics.contains(r#"sluice_completion_tokens_total{model="sim-llama"} 6"#),
        "{metrics}"
    );
}
