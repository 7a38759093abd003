//! The chat route end to end in embedded mode: `/v1/chat/completions` over
//! SSE, JSON and WebSocket compared with the simulated vLLM's own answers,
//! cache hits, cancellation, the inference log, bad input and `/v1/models`.

use std::time::Duration;

use crate::common::*;
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn tool_request(stream: bool) -> Value {
    json!({"model": MODEL, "stream": stream, "seed": 9,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "weather in Oslo?"},
                                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "text"}, "chat_template_kwargs": {"enable_thinking": false},
        "vendor_extension": [1, 2, 3]})
}

#[tokio::test]
async fn streamed_chat_is_the_upstream_stream_field_by_field() {
    let gw = TestGateway::start().await;
    for body in [
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hello river"}],
               "max_completion_tokens": 5, "n": 2, "logprobs": true, "top_logprobs": 1, "seed": 3,
               "stream": true, "stream_options": {"include_usage": true}}),
        tool_request(true),
    ] {
        let response = gw.post_chat(&body).await;
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let via_gateway = sse_events(response).await;
        let direct_events = sse_events(direct_chat(&gw.sim, &body, &id).await).await;
        assert!(via_gateway.len() > 5, "{via_gateway:?}");
        assert_eq!(via_gateway.len(), direct_events.len());
        for (ours, theirs) in via_gateway.iter().zip(&direct_events) {
            assert_eq!(without_created(ours), without_created(theirs));
        }
        assert_eq!(via_gateway.last().unwrap(), "[DONE]");
        let first: Value = serde_json::from_str(&via_gateway[0]).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["id"], format!("chatcmpl-{id}"));
    }
    // Every field of the request reached the upstream as sent.
    let sent = tool_request(true);
    let received = &gw.sim.received()[2].body;
    for field in [
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "chat_template_kwargs",
        "vendor_extension",
        "seed",
    ] {
        assert_eq!(received[field], sent[field], "{field}");
    }
    assert_eq!(received["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn json_chat_is_the_upstream_body_and_usage_reaches_the_log() {
    let gw = TestGateway::start().await;
    for body in [
        json!({"model": MODEL, "messages": [{"role": "user", "content": "count these four words"}], "max_tokens": 7}),
        tool_request(false),
    ] {
        let response = gw.post_chat(&body).await;
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let ours: Value = response.json().await.unwrap();
        let theirs: Value = direct_chat(&gw.sim, &body, &id).await.json().await.unwrap();
        assert_eq!(
            without_created(&ours.to_string()),
            without_created(&theirs.to_string())
        );
        assert_eq!(ours["object"], "chat.completion");
        let row = eventually(Duration::from_secs(3), || async {
            gw.store.inferences_for(&id).await.unwrap().pop()
        })
        .await
        .expect("an inference log row");
        assert_eq!(
            row.completion_tokens,
            ours["usage"]["completion_tokens"].as_i64().unwrap()
        );
        assert_eq!(
            row.prompt_tokens,
            ours["usage"]["prompt_tokens"].as_i64().unwrap()
        );
        assert!(row.prompt_tokens > 0);
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_total{route="/v1/chat/completions",status="2xx",transport="json"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn websocket_chat_serves_several_requests_on_one_socket() {
    let gw = TestGateway::start().await;
    let mut ws = gw.chat_ws().await;
    let streamed = json!({"model": MODEL, "messages": [{"role": "user", "content": "over a socket"}],
        "max_tokens": 4, "stream": true, "seed": 1});
    let tool = tool_request(true);
    let assembled = json!({"model": MODEL, "messages": [{"role": "user", "content": "over a socket"}],
        "max_tokens": 4, "seed": 1});
    for body in [&streamed, &tool] {
        ws.send(Message::Text(body.to_string().into()))
            .await
            .unwrap();
        let frames = ws_frames(&mut ws).await;
        let id = serde_json::from_str::<Value>(&frames[0]).unwrap()["id"]
            .as_str()
            .unwrap()
            .trim_start_matches("chatcmpl-")
            .to_string();
        let direct_events = sse_events(direct_chat(&gw.sim, body, &id).await).await;
        assert_eq!(
            frames.len(),
            direct_events.len(),
            "one frame per SSE payload, then [DONE]"
        );
        for (ours, theirs) in frames.iter().zip(&direct_events) {
            assert_eq!(without_created(ours), without_created(theirs));
        }
    }
    // Not streamed: the assembled body in one frame, then [DONE].
    ws.send(Message::Text(assembled.to_string().into()))
        .await
        .unwrap();
    let frames = ws_frames(&mut ws).await;
    assert_eq!(frames.len(), 2);
    let body: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(frames[1], "[DONE]");
    // Bad input on the socket is an error frame; the socket stays usable.
    ws.send(Message::Text(
        json!({"model": MODEL, "messages": []}).to_string().into(),
    ))
    .await
    .unwrap();
    let frames = ws_frames(&mut ws).await;
    assert!(frames[0].contains("messages"), "{frames:?}");
    ws.send(Message::Text(streamed.to_string().into()))
        .await
        .unwrap();
    assert_eq!(ws_frames(&mut ws).await.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_cached_chat_replays_the_original_chunks() {
    let gw = TestGateway::start().await;
    let body = tool_request(true);
    let first_response = gw.post_chat(&body).await;
    let first = sse_events(first_response).await;
    gw.wait_cached(1).await;
    let response = gw.post_chat(&body).await;
    let id = request_id(&response);
    let second = sse_events(response).await;
    assert_eq!(
        gw.sim.received().len(),
        1,
        "the second answer came from the cache"
    );
    assert_eq!(
        ids_blanked(&first),
        ids_blanked(&second),
        "same chunks, same boundaries"
    );
    assert!(
        second[..second.len() - 1]
            .iter()
            .all(|e| e.contains(&format!(r#""id":"chatcmpl-{id}""#))),
        "{second:?}"
    );
    // The JSON form of the same request is assembled from the same entry,
    // and a completion with the same text is another entry.
    let json_body: Value = gw
        .post_chat(&tool_request(false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(json_body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(gw.sim.received().len(), 1);
    gw.post(&json!({"model": MODEL, "prompt": "weather in Oslo?", "max_tokens": 2}))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(gw.sim.received().len(), 2);
}

#[tokio::test]
async fn closing_a_chat_stream_cancels_the_upstream_generation() {
    let slow = sluice_simulator::SimulatorConfig {
        token_delay: Duration::from_millis(50),
        ..sim_config()
    };
    // Resumable, the stream waits this long for its client to come back.
    let gw = TestGateway::start_with(slow, |c| c.resume.grace = Duration::from_millis(100)).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 1000, "stream": true});
    let response = gw.post_chat(&body).await;
    let id = request_id(&response);
    let mut reader = SseReader::new(response);
    assert!(reader.next().await.is_some(), "the role chunk arrives");
    drop(reader);
    assert!(
        gw.sim.wait_for_abort(&id, Duration::from_secs(2)).await,
        "upstream aborted"
    );

    let mut ws = gw.chat_ws().await;
    ws.send(Message::Text(body.to_string().into()))
        .await
        .unwrap();
    let id = first_chunk_request_id(&mut ws).await;
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(
        gw.sim.wait_for_abort(&id, Duration::from_secs(2)).await,
        "upstream aborted after WS close"
    );
}

async fn error_of(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], status, "{body}");
    body["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn bad_conversations_get_a_400_naming_the_field() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.max_body_bytes = 4096.try_into().unwrap()
    })
    .await;
    let cases = [
        (json!({"model": MODEL}), "messages"),
        (json!({"model": MODEL, "messages": []}), "`messages`"),
        (
            json!({"model": MODEL, "messages": {"role": "user"}}),
            "`messages`",
        ),
        (
            json!({"model": MODEL, "messages": [{"content": "no role"}]}),
            "role",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "narrator", "content": "x"}]}),
            "`messages[0].role`",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": 42}]}),
            "`messages[0].content`",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"no": "type"}]}]}),
            "`messages[1].content`",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
            "stream",
        ),
    ];
    for (body, field) in cases {
        let message = error_of(gw.post_chat(&body).await, 400).await;
        assert!(message.contains(field), "{body}: {message}");
    }
    let huge = json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    error_of(gw.post_chat(&huge).await, 413).await;
    assert!(
        gw.sim.received().is_empty(),
        "nothing bad reached the upstream"
    );
    // An unknown model is vLLM's 404, passed on in the OpenAI shape.
    let unknown = json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]});
    let message = error_of(gw.post_chat(&unknown).await, 404).await;
    assert!(message.contains("no-such-model"), "{message}");
    assert_eq!(gw.sim.received().len(), 1);
    // The gateway still serves.
    let ok = json!({"model": MODEL, "messages": [{"role": "user", "content": "still here"}], "max_tokens": 2});
    assert_eq!(gw.post_chat(&ok).await.status(), 200);
}

#[tokio::test]
async fn models_are_the_upstreams_unless_a_list_is_configured() {
    let gw = TestGateway::start().await;
    let unauthenticated = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .send()
        .await
        .unwrap();
    error_of(unauthenticated, 401).await;
    let list: Value = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], MODEL);
    assert_eq!(
        list["data"][0]["owned_by"], "vllm",
        "the upstream's own answer"
    );

    let gw = TestGateway::start_with(sim_config(), |c| {
        c.upstream.models = vec![MODEL.into(), "sim-mistral".into()];
    })
    .await;
    let ids = gw.model_ids(&gw.key).await;
    assert_eq!(ids, [MODEL, "sim-mistral"]);
    // A model off the list is refused without an upstream call, in vLLM's words.
    for response in [
        gw.post_chat(&json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}))
            .await,
        gw.post(&json!({"model": "gpt-4", "prompt": "x"})).await,
    ] {
        let message = error_of(response, 404).await;
        assert_eq!(message, "The model `gpt-4` does not exist.");
    }
    assert!(gw.sim.received().is_empty());
}

#[tokio::test]
async fn without_upstream_usage_the_log_counts_the_output_pieces_not_every_chunk() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "no usage from upstream"}],
                      "max_tokens": 8, "stream": true, "sim_no_usage": true});
    let response = gw.post_chat(&body).await;
    let id = request_id(&response);
    let events = sse_events(response).await;
    assert_eq!(
        events.len(),
        10,
        "a role chunk, 8 tokens and [DONE]: {events:?}"
    );
    let row = eventually(Duration::from_secs(3), || async {
        gw.store.inferences_for(&id).await.unwrap().pop()
    })
    .await
    .expect("an inference log row");
    assert_eq!(row.completion_tokens, 8, "the role chunk is no token");
    assert_eq!(row.prompt_tokens, 0);
}

#[tokio::test]
async fn answers_end_by_themselves_tools_get_arguments_of_their_schema_and_overlong_requests_vllms_400()
 {
    let gw = TestGateway::start().await;
    // An answer ends on its own before a large max_tokens: finish_reason stop.
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}],
                      "max_tokens": 3000, "temperature": 0});
    let answer: Value = gw.post_chat(&long).await.json().await.unwrap();
    let tokens = answer["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert!(tokens < 3000, "{tokens}");
    // ignore_eos runs to max_tokens, as vLLM's does.
    let mut forced = long.clone();
    forced["ignore_eos"] = json!(true);
    forced["max_tokens"] = json!(1100);
    let answer: Value = gw.post_chat(&forced).await.json().await.unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["usage"]["completion_tokens"], 1100);

    // A tool's arguments satisfy its schema: required properties, of their types.
    let tool = json!({"model": MODEL, "messages": [{"role": "user", "content": "book two seats to Oslo"}],
        "tools": [{"type": "function", "function": {"name": "book", "parameters": {
            "type": "object", "required": ["city", "seats", "window"],
            "properties": {"city": {"type": "string"}, "seats": {"type": "integer"},
                           "window": {"type": "boolean"}, "class": {"enum": ["economy", "business"]}}}}}]});
    let answer: Value = gw.post_chat(&tool).await.json().await.unwrap();
    let call = &answer["choices"][0]["message"]["tool_calls"][0]["function"];
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert!(arguments["seats"].is_u64(), "{arguments}");
    assert!(arguments["window"].is_boolean(), "{arguments}");
    assert_eq!(arguments["class"], "economy");

    // More than the context holds: vLLM's 400, its message and `param`, passed on whole.
    let overlong = json!({"model": MODEL, "prompt": "hello", "max_tokens": 100_000});
    let response = gw.post(&overlong).await;
    assert_eq!(response.status(), 400);
    let ours: Value = response.json().await.unwrap();
    let theirs: Value = direct(&gw.sim, &overlong, "x").await.json().await.unwrap();
    assert_eq!(ours, theirs);
    assert_eq!(ours["error"]["param"], "max_tokens");
    assert!(
        ours["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 4096"),
        "{ours}"
    );
}
