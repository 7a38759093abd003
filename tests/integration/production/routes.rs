//! vLLM's routes beside generation through Kafka: an edge and two workers
//! answer `/v1/embeddings` (the official OpenAI SDK, every input shape),
//! rerank, score, `/tokenize`, `/detokenize`, speech to text (the SDK
//! with a WAV file, streamed and not) and Anthropic's Messages API (its SDK)
//! as the simulated vLLM does when called directly.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_tokenize_through_kafka_and_two_workers_match_the_upstream() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = || services.config(&sim.url(), &services.kafka_queue(false));
    let (worker_1, worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    worker_1.start_worker(config()).await;
    worker_2.start_worker(config()).await;
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(config()).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "routes")
        .await
        .unwrap()
        .secret;

    let result = run_sdk_script(
        &python,
        "openai_embeddings.py",
        &[&url, &sim.url(), &key, MODEL],
    )
    .await;
    for (name, both) in result.as_object().unwrap() {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
    }
    let http = reqwest::Client::new();
    for (path, body) in [
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "through kafka", "return_token_strs": true}),
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [107, 97, 102, 107, 97]}),
        ),
        (
            "/v2/rerank",
            json!({"model": MODEL, "query": "q", "documents": ["a", "b", "c"], "top_n": 2}),
        ),
        (
            "/score",
            json!({"model": MODEL, "text_1": "q", "text_2": ["a", "b"]}),
        ),
        (
            "/v2/embed",
            json!({"model": MODEL, "texts": ["through", "kafka"]}),
        ),
        ("/classify", json!({"model": MODEL, "input": "fine"})),
    ] {
        let (_, through) = post_json(&http, &format!("{url}{path}"), &key, &body).await;
        let (_, direct) = post_json(&http, &format!("{}{path}", sim.url()), "", &body).await;
        assert_eq!(unnamed(through), unnamed(direct), "{path}");
    }
    // Uploads travel with their content-type; a streamed transcription
    // comes back token to token.
    let result = run_sdk_script(&python, "openai_audio.py", &[&url, &sim.url(), &key, MODEL]).await;
    for (name, both) in result.as_object().unwrap() {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
    }
    // Anthropic's Messages API: its events end with message_stop across Kafka.
    let python = python_with_anthropic().expect("the anthropic package");
    let patch = sluice::tenancy::tenants::KeyPatch {
        limits: serde_json::from_value(json!({"requests_per_minute": 1})).unwrap(),
        ..Default::default()
    };
    let limited = new_key(store.as_ref(), "limited", &patch).await;
    let result = run_sdk_script(
        &python,
        "anthropic_messages.py",
        &[&url, &sim.url(), &key, MODEL, &limited],
    )
    .await;
    for (name, both) in result["compared"].as_object().unwrap() {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
    }
    assert_eq!(result["rate limited"][1]["class"], "RateLimitError");
    for rt in [edge, worker_1, worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_a_queue_message_are_refused_and_say_so() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let small_messages = "[queue.producer]\n\"message.max.bytes\" = 20000\n";
    let (edge, worker, url, key) =
        edge_and_worker_with(&services, &sim, "large", small_messages).await;
    let http = reqwest::Client::new();
    let embed = |body: Value| {
        http.post(format!("{url}/v1/embeddings"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };

    // A request that cannot travel in one message: 413 before anything is sent.
    let long = "word ".repeat(5000);
    let refused = embed(json!({"model": MODEL, "input": long})).await.unwrap();
    assert_eq!(refused.status(), 413);
    let error: Value = refused.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{error}"
    );
    assert!(sim.received().is_empty(), "nothing reached vLLM");

    // An answer that cannot: its request ends with an error naming the limit.
    let inputs: Vec<String> = (0..16).map(|i| format!("text {i}")).collect();
    let answer = embed(json!({"model": MODEL, "input": inputs, "encoding_format": "float"}))
        .await
        .unwrap();
    assert_eq!(answer.status(), 500);
    let error: Value = answer.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than the queue's message limit"),
        "{error}"
    );
    // A small one still passes.
    let small = embed(json!({"model": MODEL, "input": "short", "dimensions": 8}))
        .await
        .unwrap();
    assert_eq!(small.status(), 200);

    // An audio upload is a request like any other: too large, it is refused.
    let upload = |millis: u32| {
        let file =
            reqwest::multipart::Part::bytes(sluice_simulator::wav(millis, 1)).file_name("long.wav");
        let form = reqwest::multipart::Form::new()
            .part("file", file)
            .text("model", MODEL);
        http.post(format!("{url}/v1/audio/transcriptions"))
            .bearer_auth(&key)
            .multipart(form)
            .send()
    };
    assert_eq!(upload(1000).await.unwrap().status(), 413, "32 KB of audio");
    assert_eq!(upload(300).await.unwrap().status(), 200, "10 KB of audio");
    edge.kill();
    worker.kill();
    services.drop_database().await;
}

/// The Responses API across two edges, two workers and two replicas, over
/// Kafka with the map of stored responses in Redis: a chain of follow-ups
/// alternating edges (and streams) each reaches the replica holding its
/// predecessor; a retrieve on the other edge finds it; a background
/// response made on one edge is polled to its end on the other; another
/// key's request for it is not found; the SDK gets what vLLM answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_are_followed_up_from_any_edge_through_kafka() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let services = services!();
    let replicas = [
        Simulator::start(sim_config()).await.unwrap(),
        Simulator::start(sim_config()).await.unwrap(),
    ];
    let extra = format!(
        "{}\n[upstream]\nurls = [\"{}\", \"{}\"]\nbalance = \"round_robin\"\n",
        services.kafka_queue(false),
        replicas[0].url(),
        replicas[1].url()
    );
    let config = || services.config(&replicas[0].url(), &extra);
    let (worker_1, worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    worker_1.start_worker(config()).await;
    worker_2.start_worker(config()).await;
    let (edge_a, edge_b) = (Isolated::new("edge-a"), Isolated::new("edge-b"));
    let (url_a, store) = edge_a.start_edge(config()).await;
    let (url_b, _) = edge_b.start_edge(config()).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "agents")
        .await
        .unwrap()
        .secret;
    let other = sluice::tenancy::keys::create_key(store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    let http = reqwest::Client::new();
    let edges = [url_a.as_str(), url_b.as_str()];
    let first = json!({"model": MODEL, "input": "start", "max_output_tokens": 4});
    let (status, answer) = post_json(&http, &format!("{url_a}/v1/responses"), &key, &first).await;
    assert_eq!(status, 200, "{answer}");
    let mut previous = answer["id"].as_str().unwrap().to_string();
    for turn in 0..4 {
        let edge = edges[(turn + 1) % 2];
        let body = json!({"model": MODEL, "input": format!("turn {turn}"),
            "previous_response_id": previous, "max_output_tokens": 4, "stream": turn % 2 == 0});
        let response = http
            .post(format!("{edge}/v1/responses"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "turn {turn}");
        let text = response.text().await.unwrap();
        let answer = response_object(&text);
        assert_eq!(
            answer["previous_response_id"],
            previous.as_str(),
            "turn {turn}"
        );
        previous = answer["id"].as_str().unwrap().to_string();
    }
    let get = |edge: &str, key: &str, id: &str| {
        http.get(format!("{edge}/v1/responses/{id}"))
            .bearer_auth(key)
            .send()
    };
    let found = get(&url_b, &key, &previous).await.unwrap();
    assert_eq!(found.status(), 200);
    assert_eq!(get(&url_b, &other, &previous).await.unwrap().status(), 404);

    let background =
        json!({"model": MODEL, "input": "later", "background": true, "max_output_tokens": 8});
    let (status, queued) =
        post_json(&http, &format!("{url_b}/v1/responses"), &key, &background).await;
    assert_eq!(
        (status, queued["status"].as_str()),
        (200, Some("queued")),
        "{queued}"
    );
    let id = queued["id"].as_str().unwrap();
    let ended = eventually(Duration::from_secs(20), || async {
        let polled: Value = get(&url_a, &key, id).await.ok()?.json().await.ok()?;
        (polled["status"] != "queued" && polled["status"] != "in_progress").then_some(polled)
    })
    .await
    .expect("the background response ends");
    assert_eq!(ended["usage"]["output_tokens"], 8, "{ended}");

    let result = run_sdk_script(
        &python,
        "openai_responses.py",
        &[&url_a, &replicas[0].url(), &key, MODEL, &other],
    )
    .await;
    for (name, both) in result["compared"].as_object().unwrap() {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
    }
    // An OpenAI Agents SDK agent calls its tool through Kafka too.
    let agents = python_with_agents().expect("the openai-agents package");
    let result = run_sdk_script(&agents, "openai_agents.py", &[&url_b, &key, MODEL]).await;
    assert_eq!(
        result["calls"].as_array().map(Vec::len),
        Some(1),
        "{result}"
    );
    assert!(
        !result["second"]["output"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
    for rt in [edge_a, edge_b, worker_1, worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}
