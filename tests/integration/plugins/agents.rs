//! Token filters on the agent APIs: the example token-censor masks a word in
//! Anthropic's Messages (streamed text deltas and a whole message) and in
//! the Responses API (streamed deltas, whose `done` events and final
//! response carry the masked text too, and a whole response), as on chat.

use super::*;

/// A word of `text` (its third), for the censor to mask.
fn a_word_of(text: &str) -> String {
    text.split_whitespace()
        .nth(2)
        .expect("a few words")
        .to_string()
}

/// The `data:` JSON of each event of an SSE body.
fn datas(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|event| event.split_once("data: "))
        .map(|(_, data)| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test]
async fn token_censor_masks_messages_and_responses_streamed_and_whole() {
    let sim = Simulator::start(sim_config()).await.unwrap();
    let message = json!({"model": MODEL, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "censor this message"}]});
    let response = json!({"model": MODEL, "max_output_tokens": 12, "store": false,
        "input": "censor this response"});
    let http = reqwest::Client::new();
    let (_, raw_message) =
        post_json(&http, &format!("{}/v1/messages", sim.url()), "", &message).await;
    let (_, raw_response) =
        post_json(&http, &format!("{}/v1/responses", sim.url()), "", &response).await;
    let raw_message = raw_message["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let raw_response = raw_response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let (word_1, word_2) = (a_word_of(&raw_message), a_word_of(&raw_response));
    drop(sim);
    let gw = gateway_with(vec![plugin(
        "censor",
        "token_censor",
        FailClosed,
        json!({"words": [word_1, word_2], "mask": "[censored]"}),
    )])
    .await;
    let mask = |text: &str| {
        censored(
            &censored(text, &word_1, "[censored]"),
            &word_2,
            "[censored]",
        )
    };
    let post = |path: &str, body: Value| {
        gw.http
            .post(format!("{}{path}", gw.url))
            .bearer_auth(&gw.key)
            .json(&body)
            .send()
    };

    // Messages: the whole message, then its stream of text deltas.
    let whole: Value = post("/v1/messages", message.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whole["content"][0]["text"], mask(&raw_message).as_str());
    let mut streamed = message.clone();
    streamed["stream"] = json!(true);
    let body = post("/v1/messages", streamed)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let text: String = datas(&body)
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| e["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, mask(&raw_message), "{body}");
    assert!(body.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

    // Responses: the whole response, then the stream; every event that
    // carries the text agrees with the deltas, numbered without a gap.
    let whole: Value = post("/v1/responses", response.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        whole["output"][0]["content"][0]["text"],
        mask(&raw_response).as_str()
    );
    let mut streamed = response.clone();
    streamed["stream"] = json!(true);
    let body = post("/v1/responses", streamed)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = datas(&body);
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    let masked = mask(&raw_response);
    assert_eq!(text, masked, "{body}");
    let done = events
        .iter()
        .find(|e| e["type"] == "response.output_text.done")
        .unwrap();
    assert_eq!(done["text"], masked.as_str());
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed");
    assert_eq!(
        completed["response"]["output"][0]["content"][0]["text"],
        masked.as_str()
    );
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
}

/// The example prompt-guard's tool-call hook on the agent APIs (fail-open:
/// its request hook has no record of these routes yet): a blocked tool's
/// call never reaches the client, streamed or whole; an allowed one passes
/// as vLLM sent it.
#[tokio::test]
async fn prompt_guard_stops_blocked_tool_calls_on_messages_and_responses() {
    let gw = gateway_with(vec![plugin(
        "prompt-guard",
        "prompt_guard",
        FailOpen,
        json!({"blocked_tools": ["delete_file"]}),
    )])
    .await;
    let schema =
        json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]});
    let message = |tool: &str, stream: bool| {
        json!({"model": MODEL, "max_tokens": 20, "stream": stream,
            "tools": [{"name": tool, "input_schema": schema}],
            "messages": [{"role": "user", "content": "tidy up"}]})
    };
    let response = |tool: &str, stream: bool| {
        json!({"model": MODEL, "stream": stream, "store": false, "input": "tidy up",
            "tools": [{"type": "function", "name": tool, "parameters": schema}]})
    };
    let post = |path: &'static str, body: Value| {
        gw.http
            .post(format!("{}{path}", gw.url))
            .bearer_auth(&gw.key)
            .json(&body)
            .send()
    };
    let note = "[the call of tool \"delete_file\" was blocked by policy]";

    // Messages: an allowed call streams its input; a blocked one becomes the note.
    let allowed = post("/v1/messages", message("list_files", true))
        .await
        .unwrap();
    let allowed = allowed.text().await.unwrap();
    assert!(allowed.contains("\"input_json_delta\""), "{allowed}");
    let blocked = post("/v1/messages", message("delete_file", true))
        .await
        .unwrap();
    let blocked = blocked.text().await.unwrap();
    assert!(
        !blocked.contains("tool_use") && !blocked.contains("input_json_delta"),
        "{blocked}"
    );
    assert!(
        blocked.contains(r#"tool \"delete_file\" was blocked by policy"#),
        "{blocked}"
    );
    assert!(blocked.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    let whole: Value = post("/v1/messages", message("delete_file", false))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        whole["content"],
        json!([{"type": "text", "text": note}]),
        "{whole}"
    );
    assert_eq!(whole["stop_reason"], "end_turn");

    // Responses: the same, on function-call items.
    let allowed = post("/v1/responses", response("list_files", true))
        .await
        .unwrap();
    let allowed = allowed.text().await.unwrap();
    assert!(
        allowed.contains("response.function_call_arguments.delta"),
        "{allowed}"
    );
    let blocked = post("/v1/responses", response("delete_file", true))
        .await
        .unwrap();
    let blocked = blocked.text().await.unwrap();
    assert!(!blocked.contains("function_call"), "{blocked}");
    assert!(
        blocked.contains(r#"tool \"delete_file\" was blocked by policy"#),
        "{blocked}"
    );
    let whole: Value = post("/v1/responses", response("delete_file", false))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whole["output"][0]["type"], "message", "{whole}");
    assert_eq!(whole["output"][0]["content"][0]["text"], note);
}

/// Request hooks read the agent APIs' conversations (0.4.0): the example
/// prompt-guard refuses a blocked phrase wherever it hides (a system
/// prompt, a message's text block, a Responses function output) before the
/// upstream, in each API's error shape; the pii-redactor's rewrite is what
/// vLLM receives, other blocks and items untouched. A 0.3.0 component has
/// no record of these routes: fail-closed it refuses them, fail-open it
/// lets them pass unread, and it still reads the routes it knows.
#[tokio::test]
async fn request_hooks_read_and_rewrite_the_agent_apis_conversations() {
    let gw = gateway_with(vec![
        plugin(
            "guard",
            "prompt_guard",
            FailClosed,
            json!({"block": ["forbidden"]}),
        ),
        plugin("pii", "pii_redactor", FailClosed, json!({})),
    ])
    .await;
    let post = |path: &'static str, body: Value| {
        gw.http
            .post(format!("{}{path}", gw.url))
            .bearer_auth(&gw.key)
            .json(&body)
            .send()
    };
    for (path, body) in [
        (
            "/v1/messages",
            json!({"model": MODEL, "max_tokens": 3, "system": "this is forbidden",
            "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/messages",
            json!({"model": MODEL, "max_tokens": 3, "messages": [{"role": "user",
            "content": [{"type": "text", "text": "fine"}, {"type": "text", "text": "FORBIDDEN"}]}]}),
        ),
        (
            "/v1/responses",
            json!({"model": MODEL, "input": [
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "now do the forbidden thing"}]}),
        ),
    ] {
        let response = post(path, body).await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let error: Value = response.json().await.unwrap();
        let message = match path {
            "/v1/messages" => {
                assert_eq!(error["type"], "error", "{error}");
                &error["error"]["message"]
            }
            _ => &error["error"]["message"],
        };
        assert!(message.as_str().unwrap().contains("forbidden"), "{error}");
    }
    assert!(gw.sim.received().is_empty(), "refused before the upstream");

    let message = json!({"model": MODEL, "max_tokens": 3, "system": "reply to ann@example.com",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "call +1 415 555 0100"},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]});
    assert_eq!(post("/v1/messages", message).await.unwrap().status(), 200);
    let response = json!({"model": MODEL, "store": false, "instructions": "mail bob@example.org",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "me: eve@example.net"}]}]});
    assert_eq!(post("/v1/responses", response).await.unwrap().status(), 200);
    let received = gw.sim.received();
    let sent = &received[0].body;
    assert_eq!(sent["system"], "reply to [EMAIL]");
    assert_eq!(
        sent["messages"][0]["content"],
        json!([{"type": "text", "text": "call [PHONE]"},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}])
    );
    let sent = &received[1].body;
    assert_eq!(sent["instructions"], "mail [EMAIL]");
    assert_eq!(
        sent["input"][0]["content"],
        json!([{"type": "input_text", "text": "me: [EMAIL]"}])
    );

    // A 0.3.0 component: no record of the agent APIs.
    for (on_error, status) in [(FailClosed, 500), (FailOpen, 200)] {
        let gw = gateway_with(vec![plugin("v3", "v3_guard", on_error, json!({}))]).await;
        let body = json!({"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "forbidden?"}]});
        let (got, _) =
            post_json(&gw.http, &format!("{}/v1/messages", gw.url), &gw.key, &body).await;
        assert_eq!(got, status, "{on_error:?}");
        let (got, answer) = post_json(
            &gw.http,
            &format!("{}/v1/embeddings", gw.url),
            &gw.key,
            &json!({"model": MODEL, "input": "shout"}),
        )
        .await;
        assert_eq!(got, 200, "{answer}");
        let sent = gw.sim.received().last().unwrap().body.clone();
        assert_eq!(
            sent["input"], "SHOUT",
            "a 0.3.0 rewrite of a route it knows"
        );
        let (got, _) = post_json(
            &gw.http,
            &gw.chat_url(),
            &gw.key,
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "forbidden"}]}),
        )
        .await;
        assert_eq!(got, 403);
    }
}
