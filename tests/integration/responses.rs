//! OpenAI's Responses API through the whole gateway in embedded mode: the
//! official openai SDK against sluice and against the simulated vLLM
//! directly (a response, its typed events, the stream helper, a follow-up
//! and a retrieve, a function-call round, background mode and cancel),
//! compared field by field; another key's response is not found; stored
//! responses are followed up on the replica that holds them, and a clear
//! error (no silent call elsewhere) when that replica was SIGKILLed; a
//! background response is counted and logged when it ends.

use std::time::Duration;

use crate::common::processes::SimulatorProcess;
use crate::common::*;
use serde_json::{Value, json};
use sluice::config::{Balance, ModelConfig};

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_gets_what_vllm_answers() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let gw = TestGateway::start().await;
    let other = sluice::tenancy::keys::create_key(gw.store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    let result = run_sdk_script(
        &python,
        "openai_responses.py",
        &[&gw.url, &gw.sim.url(), &gw.key, MODEL, &other],
    )
    .await;
    let compared = result["compared"].as_object().unwrap();
    assert_eq!(compared.len(), 6);
    for (name, both) in compared {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
    }
    let events = compared["events"]["gateway"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(&kinds[..2], ["response.created", "response.in_progress"]);
    assert_eq!(kinds.last(), Some(&"response.completed"));
    assert!(kinds.contains(&"response.output_text.delta"), "{kinds:?}");
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let follow_up = &compared["follow-up"]["gateway"];
    assert_eq!(follow_up["retrieved is first"], true, "{follow_up}");
    assert!(follow_up["second usage"]["input_tokens"].as_u64().unwrap() > 0);
    let call = &compared["function call"]["gateway"];
    assert_eq!(call["call"]["type"], "function_call", "{call}");
    assert_eq!(call["call"]["name"], "get_weather");
    let streamed = call["streamed"].as_array().unwrap();
    assert!(streamed.contains(&json!("response.function_call_arguments.delta")));
    let background = &compared["background"]["gateway"];
    assert_eq!(background["queued"], "queued", "{background}");
    assert_eq!(
        background["polled"], "incomplete",
        "{background}: it ran to max_output_tokens"
    );
    assert_eq!(background["cancelled"], "cancelled", "{background}");
    assert_eq!(background["after cancel"], "cancelled", "{background}");

    let errors = &result["errors"];
    assert_eq!(errors["invalid key"]["status"], 401, "{errors}");
    for case in [
        "another key retrieves",
        "another key continues",
        "unknown id",
    ] {
        let error = &errors[case];
        assert_eq!(error["class"], "NotFoundError", "{case}: {error}");
        assert!(
            error["body"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("not found")),
            "{case}: {error}"
        );
    }
}

/// A chain of follow-ups over a pool of two replicas, each reaching the
/// replica that holds its predecessor; then that replica is SIGKILLed and
/// a follow-up or a retrieve gets a clear 503, in OpenAI's shape, without
/// any other replica being asked.
#[tokio::test(flavor = "multi_thread")]
async fn follow_ups_reach_the_replica_that_holds_them_until_it_dies() {
    let args = ["--token-delay-ms", "1", "--first-token-delay-ms", "1"];
    let mut replicas = [
        SimulatorProcess::start(&args),
        SimulatorProcess::start(&args),
    ];
    let fleet = vec![ModelConfig {
        name: MODEL.into(),
        aliases: Vec::new(),
        endpoints: replicas.iter().map(|r| r.url.parse().unwrap()).collect(),
        upstream_model: None,
        balance: Balance::RoundRobin,
        continue_streams: true,
        capacity: None,
    }];
    let gw = TestGateway::start_with(sim_config(), move |c| c.models = fleet).await;
    let url = format!("{}/v1/responses", gw.url);
    let (status, first) = post_json(
        &gw.http,
        &url,
        &gw.key,
        &json!({"model": MODEL, "input": "start", "max_output_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let mut previous = first["id"].as_str().unwrap().to_string();
    let holder = held_by(&replicas, &previous).await;
    // Round robin would send every other request to the other replica,
    // which does not know the previous response (vLLM answers 404).
    for turn in 0..4 {
        let body = json!({"model": MODEL, "input": format!("turn {turn}"),
            "previous_response_id": previous, "max_output_tokens": 4, "stream": turn % 2 == 1});
        let response = gw
            .http
            .post(&url)
            .bearer_auth(&gw.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "turn {turn}");
        let text = response.text().await.unwrap();
        let answer = response_object(&text);
        assert_eq!(answer["previous_response_id"], previous.as_str());
        previous = answer["id"].as_str().unwrap().to_string();
        assert_eq!(held_by(&replicas, &previous).await, holder, "turn {turn}");
    }
    let (status, retrieved) = get_json(&gw, &format!("{url}/{previous}")).await;
    assert_eq!(
        (status, retrieved["id"].as_str()),
        (200, Some(previous.as_str()))
    );

    replicas[holder].kill();
    let follow_up =
        json!({"model": MODEL, "input": "still there?", "previous_response_id": previous});
    let (status, error) = post_json(&gw.http, &url, &gw.key, &follow_up).await;
    assert_eq!(status, 503, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&previous) && message.contains("unavailable"),
        "{message}"
    );
    let (status, error) = get_json(&gw, &format!("{url}/{previous}")).await;
    assert_eq!(status, 503, "{error}");
    // A new conversation goes to the replica still alive.
    let (status, fresh) = post_json(
        &gw.http,
        &url,
        &gw.key,
        &json!({"model": MODEL, "input": "new", "max_output_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{fresh}");
}

/// Which replica (by index) holds a stored response, asked of each directly.
async fn held_by(replicas: &[SimulatorProcess], id: &str) -> usize {
    let http = reqwest::Client::new();
    let mut holders = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        let url = format!("{}/v1/responses/{id}", replica.url);
        if http.get(&url).send().await.unwrap().status() == 200 {
            holders.push(i);
        }
    }
    assert_eq!(holders.len(), 1, "{id} is held by exactly one replica");
    holders[0]
}

async fn get_json(gw: &TestGateway, url: &str) -> (u16, Value) {
    let response = gw.http.get(url).bearer_auth(&gw.key).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_background_response_is_counted_and_logged_when_it_ends() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.responses.background_poll = Duration::from_millis(20);
    })
    .await;
    let url = format!("{}/v1/responses", gw.url);
    let body = json!({"model": MODEL, "input": "in the background", "background": true,
        "max_output_tokens": 30, "sim_token_delay_ms": 10});
    let response = gw
        .http
        .post(&url)
        .bearer_auth(&gw.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let request_id = request_id(&response);
    let queued: Value = response.json().await.unwrap();
    assert_eq!(queued["status"], "queued", "{queued}");
    assert!(
        gw.store
            .inferences_for(&request_id)
            .await
            .unwrap()
            .is_empty(),
        "not logged before it ends"
    );
    let row = eventually(Duration::from_secs(10), || async {
        gw.store.inferences_for(&request_id).await.unwrap().pop()
    })
    .await
    .expect("logged when it ends");
    assert_eq!(row.route, "/v1/responses");
    assert_eq!(row.status, 200);
    assert_eq!(row.completion_tokens, 30, "{row:?}");
    assert!(row.prompt_tokens > 0, "{row:?}");
    let id = queued["id"].as_str().unwrap();
    // Its events, streamed again after the third (vLLM's `starting_after`),
    // through the replica that holds them: as the simulator sends them.
    let events_url = format!("{url}/{id}?stream=true&starting_after=3");
    let through = gw
        .http
        .get(&events_url)
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(through.status(), 200);
    let through = without_ids(&through.text().await.unwrap());
    let direct = format!(
        "{}/v1/responses/{id}?stream=true&starting_after=3",
        gw.sim.url()
    );
    let direct = gw
        .http
        .get(direct)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(through, direct);
    assert!(through.starts_with("event: "), "{through}");
    assert!(through.contains(r#""sequence_number":4,"#), "{through}");
    assert!(!through.contains(r#""sequence_number":3,"#), "{through}");
    assert_eq!(response_object(&through)["id"], id);
    let (status, done) = get_json(&gw, &format!("{url}/{id}")).await;
    assert_eq!((status, done["status"].as_str()), (200, Some("incomplete")));
    assert_eq!(done["usage"]["output_tokens"], 30);

    // A stateless request (store: false) at temperature 0 is cached; a stored one never is.
    let stateless = json!({"model": MODEL, "input": "cache me", "store": false, "temperature": 0});
    let stored = json!({"model": MODEL, "input": "not me", "temperature": 0});
    for _ in 0..2 {
        for body in [&stateless, &stored] {
            let (status, answer) = post_json(&gw.http, &url, &gw.key, body).await;
            assert_eq!(status, 200, "{answer}");
        }
    }
    gw.wait_cached(1).await;
    let before = gw.sim.received().len();
    let (status, _) = post_json(&gw.http, &url, &gw.key, &stateless).await;
    assert_eq!(status, 200);
    assert_eq!(
        gw.sim.received().len(),
        before,
        "the stateless answer is cached"
    );
    let stored_calls = gw
        .sim
        .received()
        .iter()
        .filter(|r| r.body["input"] == "not me")
        .count();
    assert_eq!(stored_calls, 2, "a stored response is generated each time");
}

/// A replica failing after the first events ends the client's stream with
/// the Responses API's `error` event, numbered after the last event it got
/// (no `[DONE]`, which this API never sends), and the request counts as failed.
#[tokio::test]
async fn a_replica_failing_mid_stream_ends_it_with_an_error_event() {
    let gw = TestGateway::start().await;
    let body = json!({"model": MODEL, "input": "break", "stream": true, "store": false,
        "max_output_tokens": 10, "sim_drop_after": 3});
    let response = gw
        .http
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(&gw.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let text = without_ids(&response.text().await.unwrap());
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    let last = events.last().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{text}");
    let error: Value = serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["sequence_number"], events.len() as u64 - 1, "{text}");
    let deltas = events
        .iter()
        .filter(|e| e.starts_with("event: response.output_text.delta\n"))
        .count();
    assert_eq!(deltas, 3, "{text}");
    assert!(!text.contains("[DONE]") && !text.contains("response.completed"));
    let row = eventually(Duration::from_secs(5), || async {
        gw.store.inferences_for(&id).await.unwrap().pop()
    })
    .await
    .expect("logged");
    assert!(row.status >= 500, "{row:?}");
}

/// An agent of the OpenAI Agents SDK, on its default Responses API model,
/// calls its function tool and answers through sluice; a second run
/// continues the first by `previous_response_id`.
#[tokio::test(flavor = "multi_thread")]
async fn an_openai_agents_sdk_agent_runs_its_tool_through_sluice() {
    let Some(python) = python_with_agents() else {
        return;
    };
    // Short answers: without `max_output_tokens` an answer runs to its end.
    let sim = sluice_simulator::SimulatorConfig {
        answer_tokens: 4..12,
        ..sim_config()
    };
    let gw = TestGateway::start_with(sim, |_| {}).await;
    let result = run_sdk_script(&python, "openai_agents.py", &[&gw.url, &gw.key, MODEL]).await;
    let calls = result["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{result}");
    let items = &result["first"]["items"];
    for kind in [
        "tool_call_item",
        "tool_call_output_item",
        "message_output_item",
    ] {
        assert!(
            items.as_array().unwrap().contains(&json!(kind)),
            "{kind}: {result}"
        );
    }
    for run in ["first", "second"] {
        let output = result[run]["output"].as_str().unwrap_or_default();
        assert!(!output.is_empty(), "{run}: {result}");
    }
    let responses = gw
        .sim
        .received()
        .iter()
        .filter(|r| r.body.get("input").is_some())
        .count();
    assert_eq!(responses, 3, "two model calls, then one continuing them");
}

/// A key's limits and the gateway's metrics apply to the Responses API as
/// to chat: over its requests per minute a key gets OpenAI's 429 with
/// `retry-after`, and requests are counted under the route's label (a
/// retrieve under its path template, not one series per id).
#[tokio::test]
async fn limits_and_metrics_apply_to_the_responses_api() {
    use sluice::tenancy::tenants::KeyPatch;
    let gw = TestGateway::start().await;
    let patch = KeyPatch {
        limits: serde_json::from_value(json!({"requests_per_minute": 2})).unwrap(),
        ..KeyPatch::default()
    };
    let limited = new_key(gw.store.as_ref(), "limited", &patch).await;
    let url = format!("{}/v1/responses", gw.url);
    let body = json!({"model": MODEL, "input": "count me", "max_output_tokens": 2});
    let (status, created) = post_json(&gw.http, &url, &limited, &body).await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap();
    let retrieved = gw
        .http
        .get(format!("{url}/{id}"))
        .bearer_auth(&limited)
        .send()
        .await
        .unwrap();
    assert_eq!(retrieved.status(), 200);
    // Reading a response back costs no tokens: they were counted when it was made.
    let read_id = request_id(&retrieved);
    let row = eventually(Duration::from_secs(5), || async {
        gw.store.inferences_for(&read_id).await.unwrap().pop()
    })
    .await
    .expect("the retrieve is logged");
    assert_eq!(row.route, "/v1/responses/{response_id}");
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (0, 0),
        "{row:?}"
    );
    let refused = gw
        .http
        .post(&url)
        .bearer_auth(&limited)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");
    let metrics = gw.metrics().await;
    for (route, status) in [
        ("/v1/responses", "2xx"),
        ("/v1/responses/{response_id}", "2xx"),
        ("/v1/responses", "4xx"),
    ] {
        let series = format!(
            r#"sluice_requests_total{{route="{route}",status="{status}",transport="json"}}"#
        );
        assert_eq!(metric(&metrics, &series), Some(1.0), "{series}");
    }
}
