//! Anthropic's Messages API through the whole gateway in embedded mode:
//! the official anthropic SDK against sluice and against the simulated vLLM
//! directly (a message, its stream of events, the stream helper,
//! count_tokens, a tool use round, a streamed tool use), compared field by field; its exceptions for a wrong key and
//! a limited one; usage counted and logged; Anthropic-shaped errors.

use crate::common::*;
use serde_json::{Value, json};
use sluice::tenancy::tenants::KeyPatch;

#[tokio::test(flavor = "multi_thread")]
async fn the_anthropic_sdk_gets_what_vllm_answers() {
    let Some(python) = python_with_anthropic() else {
        return;
    };
    let gw = TestGateway::start().await;
    let patch = KeyPatch {
        limits: serde_json::from_value(json!({"requests_per_minute": 1})).unwrap(),
        ..KeyPatch::default()
    };
    let limited = new_key(gw.store.as_ref(), "limited", &patch).await;
    let result = run_sdk_script(
        &python,
        "anthropic_messages.py",
        &[&gw.url, &gw.sim.url(), &gw.key, MODEL, &limited],
    )
    .await;
    let compared = result["compared"].as_object().unwrap();
    assert_eq!(compared.len(), 6);
    for (name, both) in compared {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
    }
    let message = &compared["message"]["gateway"];
    assert_eq!(message["type"], "message");
    assert_eq!(message["content"][0]["type"], "text");
    let events = compared["events"]["gateway"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"message_start"));
    assert_eq!(
        &kinds[kinds.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let helper = &compared["stream helper"]["gateway"];
    assert_eq!(
        helper["text"], message["content"][0]["text"],
        "the stream's text is the message's"
    );
    assert_eq!(
        helper["usage"]["output_tokens"],
        message["usage"]["output_tokens"]
    );

    let invalid = &result["invalid key"];
    assert_eq!(invalid["class"], "AuthenticationError", "{invalid}");
    assert_eq!(invalid["status"], 401);
    assert_eq!(invalid["body"]["type"], "error");
    assert_eq!(invalid["body"]["error"]["type"], "authentication_error");
    let limited = result["rate limited"].as_array().unwrap();
    assert_eq!(limited[0], Value::Null, "the first request fits");
    assert_eq!(limited[1]["class"], "RateLimitError", "{}", limited[1]);
    assert_eq!(limited[1]["body"]["error"]["type"], "rate_limit_error");
    assert!(
        limited[1]["retry_after"]
            .as_str()
            .is_some_and(|s| s.parse::<u64>().is_ok())
    );
}

#[tokio::test]
async fn a_message_is_counted_and_logged_by_its_usage_and_errors_are_anthropics() {
    let gw = TestGateway::start().await;
    let url = format!("{}/v1/messages", gw.url);
    let body = json!({"model": MODEL, "max_tokens": 5, "stream": true,
        "messages": [{"role": "user", "content": "count me"}]});
    let response = gw
        .http
        .post(&url)
        .header("x-api-key", &gw.key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let id = request_id(&response);
    let text = without_ids(&response.text().await.unwrap());
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("event: message_start\ndata: "), "{text}");
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
    let row = eventually(std::time::Duration::from_secs(5), || async {
        gw.store.inferences_for(&id).await.unwrap().pop()
    })
    .await
    .expect("logged");
    assert_eq!(row.route, "/v1/messages");
    assert_eq!(row.completion_tokens, 5, "{row:?}");
    assert!(row.prompt_tokens > 0, "{row:?}");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_total{route="/v1/messages",status="2xx",transport="sse"}"#
        ),
        Some(1.0)
    );

    // The gateway's own refusals, in Anthropic's shape, before the upstream.
    for (body, key, status, kind) in [
        (
            json!({"model": MODEL, "messages": []}),
            gw.key.as_str(),
            400,
            "invalid_request_error",
        ),
        (body.clone(), "sk-wrong", 401, "authentication_error"),
    ] {
        let response = gw
            .http
            .post(&url)
            .header("x-api-key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], kind, "{error}");
    }
    assert_eq!(gw.sim.received().len(), 1);
    // vLLM's own refusals come back as vLLM words them.
    let unknown = json!({"model": "no-such-model", "max_tokens": 3, "messages": []});
    let (status, through) = post_json(&gw.http, &url, &gw.key, &unknown).await;
    let (_, direct) = post_json(
        &gw.http,
        &format!("{}/v1/messages", gw.sim.url()),
        "",
        &unknown,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(through, direct);
    assert_eq!(through["type"], "error");
}

#[tokio::test]
async fn a_greedy_message_stream_is_cached_and_replayed_under_the_new_requests_id() {
    let gw = TestGateway::start().await;
    let url = format!("{}/v1/messages", gw.url);
    let body = json!({"model": MODEL, "max_tokens": 4, "stream": true, "temperature": 0,
        "messages": [{"role": "user", "content": "the same question"}]});
    let send = || {
        gw.http
            .post(&url)
            .header("x-api-key", &gw.key)
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    let first_text = first.text().await.unwrap();
    gw.wait_cached(1).await;
    let second = send().await.unwrap();
    let second_id = request_id(&second);
    let second_text = second.text().await.unwrap();
    assert_eq!(gw.sim.received().len(), 1, "the second was a hit");
    let start = |text: &str| -> Value {
        let data = text
            .split("\n\n")
            .next()
            .unwrap()
            .split("data: ")
            .nth(1)
            .unwrap();
        serde_json::from_str(data).unwrap()
    };
    assert_eq!(
        start(&second_text)["message"]["id"],
        format!("chatcmpl-{second_id}")
    );
    let rest = |text: &str| without_ids(text.split_once("\n\n").unwrap().1);
    assert_eq!(rest(&first_text), rest(&second_text));
    // A message (not streamed) is another entry.
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let (status, message) = post_json(&gw.http, &url, &gw.key, &whole).await;
    assert_eq!(status, 200);
    assert_eq!(message["type"], "message");
    assert_eq!(gw.sim.received().len(), 2);
}

#[tokio::test]
async fn a_replica_failing_mid_stream_ends_it_with_anthropics_error_event() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "max_tokens": 8, "stream": true, "sim_drop_after": 2,
        "messages": [{"role": "user", "content": "this stream breaks"}]});
    let response = gw
        .http
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &gw.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the failure came after the first byte"
    );
    let text = without_ids(&response.text().await.unwrap());
    let deltas = text.matches("event: content_block_delta").count();
    assert_eq!(deltas, 2, "{text}");
    let (_, last) = text.trim_end().rsplit_once("\n\n").unwrap();
    let data = last
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("ends with an error event: {text}"));
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["type"], "error");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    assert!(
        !text.contains("message_stop") && !text.contains("[DONE]"),
        "{text}"
    );
}
