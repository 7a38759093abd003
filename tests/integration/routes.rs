//! vLLM's routes beside generation, through the whole gateway in embedded
//! mode: `/v1/embeddings` with the official OpenAI SDK in every input shape,
//! Cohere's `/v2/embed`, rerank and score on each of their paths,
//! `/classify`, `/pooling`, `/tokenize` and `/detokenize`,
//! each compared field by field with the
//! simulated vLLM called directly; limits counted from the answer's usage,
//! the cache scoped per key, malformed bodies refused before the upstream.

use crate::common::*;
use serde_json::{Value, json};
use sluice::tenancy::tenants::KeyPatch;

#[tokio::test(flavor = "multi_thread")]
async fn openai_sdk_embeddings_match_the_upstream_in_every_shape() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let gw = TestGateway::start().await;
    let sim_url = gw.sim.url();
    let result = run_sdk_script(
        &python,
        "openai_embeddings.py",
        &[&gw.url, &sim_url, &gw.key, MODEL],
    )
    .await;
    let scenarios = result.as_object().unwrap();
    assert_eq!(scenarios.len(), 5);
    for (name, both) in scenarios {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
        // A list of floats, or (asked for explicitly) a base64 string.
        let embedding = &both["gateway"]["data"][0]["embedding"];
        let filled = embedding.as_array().is_some_and(|v| !v.is_empty())
            || embedding.as_str().is_some_and(|v| !v.is_empty());
        assert!(filled, "{name}: {both}");
        assert!(
            both["gateway"]["usage"]["prompt_tokens"].as_u64() > Some(0),
            "{name}"
        );
    }
    assert_eq!(
        scenarios["fewer dimensions"]["gateway"]["data"][0]["embedding"]
            .as_array()
            .map(Vec::len),
        Some(8)
    );
    // Five scenarios through the gateway, each also sent straight upstream.
    assert_eq!(gw.sim.received().len(), 10);
}

#[tokio::test]
async fn tokenize_and_detokenize_answer_as_vllm_does() {
    let gw = TestGateway::start().await;
    let sim = gw.sim.url();
    let http = &gw.http;
    let cases = [
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "Hello, wörld", "return_token_strs": true}),
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [75, 104, 111]}),
        ),
    ];
    for (path, body) in cases {
        let (status, through) = post_json(http, &format!("{}{path}", gw.url), &gw.key, &body).await;
        let (direct_status, direct) = post_json(http, &format!("{sim}{path}"), "", &body).await;
        assert_eq!(
            (status, direct_status),
            (200, 200),
            "{path} {body}: {through}"
        );
        assert_eq!(through, direct, "{path} {body}");
    }
    // What one route splits, the other puts back together.
    let url = |path: &str| format!("{}{path}", gw.url);
    let (_, tokens) = post_json(
        http,
        &url("/tokenize"),
        &gw.key,
        &json!({"model": MODEL, "prompt": "round trip"}),
    )
    .await;
    assert_eq!(tokens["count"], 10);
    let (_, text) = post_json(
        http,
        &url("/detokenize"),
        &gw.key,
        &json!({"model": MODEL, "tokens": tokens["tokens"]}),
    )
    .await;
    assert_eq!(text["prompt"], "round trip");
}

#[tokio::test]
async fn rerank_and_score_answer_as_vllm_does_on_every_path() {
    let gw = TestGateway::start().await;
    let sim = gw.sim.url();
    let documents = json!([
        "the river flows to the sea",
        "a mountain of granite",
        "rain feeds the river"
    ]);
    let rerank =
        json!({"model": MODEL, "query": "where does the river go?", "documents": documents});
    let top = json!({"model": MODEL, "query": "rivers", "documents": documents, "top_n": 2});
    let cases = [
        ("/rerank", rerank.clone()),
        ("/v1/rerank", rerank.clone()),
        ("/v2/rerank", top),
        (
            "/score",
            json!({"model": MODEL, "text_1": "rivers", "text_2": documents}),
        ),
        (
            "/v1/score",
            json!({"model": MODEL, "queries": ["a", "b"], "documents": ["c", "d"]}),
        ),
    ];
    for (path, body) in cases {
        let (status, through) =
            post_json(&gw.http, &format!("{}{path}", gw.url), &gw.key, &body).await;
        let (_, direct) = post_json(&gw.http, &format!("{sim}{path}"), "", &body).await;
        assert_eq!(status, 200, "{path}: {through}");
        assert_eq!(unnamed(through.clone()), unnamed(direct), "{path}");
        // vLLM names the answer after the request id sluice sent it.
        assert!(
            through["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("score-")),
            "{through}"
        );
    }
    let (_, ranked) = post_json(
        &gw.http,
        &format!("{}/v2/rerank", gw.url),
        &gw.key,
        &json!({"model": MODEL, "query": "q", "documents": documents, "top_n": 2}),
    )
    .await;
    let results = ranked["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{ranked}");
    assert!(results[0]["relevance_score"].as_f64() >= results[1]["relevance_score"].as_f64());
}

#[tokio::test]
async fn classify_pooling_and_cohere_embed_answer_as_vllm_does() {
    let gw = TestGateway::start().await;
    let sim = gw.sim.url();
    let cases = [
        (
            "/classify",
            json!({"model": MODEL, "input": ["great service", "awful wait"]}),
        ),
        (
            "/classify",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "fine"}]}),
        ),
        ("/pooling", json!({"model": MODEL, "input": "pool me"})),
        (
            "/v2/embed",
            json!({"model": MODEL, "texts": ["hello", "world"], "input_type": "search_document", "embedding_types": ["float", "base64", "binary"]}),
        ),
        (
            "/v2/embed",
            json!({"model": MODEL, "inputs": [{"content": [{"type": "text", "text": "parts"}]}]}),
        ),
    ];
    for (path, body) in cases {
        let (status, through) =
            post_json(&gw.http, &format!("{}{path}", gw.url), &gw.key, &body).await;
        let (_, direct) = post_json(&gw.http, &format!("{sim}{path}"), "", &body).await;
        assert_eq!(status, 200, "{path}: {through}");
        assert_eq!(unnamed(through), unnamed(direct), "{path} {body}");
    }
    // Cohere's answer counts its tokens in meta.billed_units: counted too.
    let series = format!(r#"sluice_prompt_tokens_total{{model="{MODEL}"}}"#);
    // 23 + 12 bytes classified, 7 pooled, 10 + 5 embedded (a part's text).
    let expected = (23 + "<user> fine\n".len() + 7 + 10 + 5) as f64;
    let counted = eventually(std::time::Duration::from_secs(5), || async {
        let counted = metric(&gw.metrics().await, &series);
        (counted == Some(expected)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{}", gw.metrics().await);
}

#[tokio::test]
async fn malformed_bodies_are_refused_naming_the_field_without_calling_upstream() {
    let gw = TestGateway::start().await;
    for (path, body, field) in [
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": 7}),
            "input",
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": ["a", {"x": 1}]}),
            "input[1]",
        ),
        ("/v1/embeddings", json!({"input": "no model"}), "model"),
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": ["not", "a string"]}),
            "prompt",
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": "abc"}),
            "tokens",
        ),
        (
            "/rerank",
            json!({"model": MODEL, "documents": ["a"]}),
            "query",
        ),
        ("/v2/embed", json!({"model": MODEL, "texts": []}), "texts"),
        ("/classify", json!({"model": MODEL, "input": 5}), "input"),
        (
            "/score",
            json!({"model": MODEL, "text_1": "a", "text_2": []}),
            "text_2",
        ),
    ] {
        let (status, error) =
            post_json(&gw.http, &format!("{}{path}", gw.url), &gw.key, &body).await;
        assert_eq!(status, 400, "{path} {body}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("`{field}`")),
            "{path} {body}: {error}"
        );
        assert_eq!(error["error"]["type"], "BadRequestError", "{error}");
    }
    assert!(gw.sim.received().is_empty());
    // vLLM's own refusals come back as it wrote them.
    let (status, error) = post_json(
        &gw.http,
        &format!("{}/v1/embeddings", gw.url),
        &gw.key,
        &json!({"model": "no-such-model", "input": "x"}),
    )
    .await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["type"], "NotFoundError", "{error}");
}

/// Waits until `n` answers are in the cache (written after the answer went out).
async fn stored(gw: &TestGateway, n: f64) {
    let series = r#"sluice_cache_stores_total{result="stored"}"#;
    let done = eventually(std::time::Duration::from_secs(5), || async {
        (metric(&gw.metrics().await, series) == Some(n)).then_some(())
    })
    .await;
    assert!(done.is_some(), "{n} answers stored in the cache");
}

#[tokio::test]
async fn an_embedding_is_cached_for_its_key_only_and_a_hit_skips_the_upstream() {
    let gw = TestGateway::start().await;
    let url = format!("{}/v1/embeddings", gw.url);
    let body = json!({"model": MODEL, "input": ["cache me", "and me"], "encoding_format": "float"});
    let send = || gw.http.post(&url).bearer_auth(&gw.key).json(&body).send();
    let first = send().await.unwrap();
    let first_id = request_id(&first);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["id"], format!("embd-{first_id}"));
    // The inference log's row names the route, with the answer's tokens.
    let row = eventually(std::time::Duration::from_secs(5), || async {
        gw.store.inferences_for(&first_id).await.unwrap().pop()
    })
    .await
    .expect("the request was logged");
    assert_eq!(row.route, "/v1/embeddings");
    assert_eq!(row.prompt_tokens, 14, "{row:?}");
    assert!(!row.cache_hit);
    stored(&gw, 1.0).await;
    let second = send().await.unwrap();
    let second_id = request_id(&second);
    let second: Value = second.json().await.unwrap();
    assert_eq!(
        gw.sim.received().len(),
        1,
        "the hit was served without vLLM"
    );
    // Renamed for the request that got it, as vLLM would have named it.
    assert_eq!(second["id"], format!("embd-{second_id}"));
    assert_eq!(unnamed(first.clone()), unnamed(second));
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, r#"sluice_cache_lookups_total{result="hit"}"#),
        Some(1.0)
    );

    // Another key asking the same is not served from the first key's entry.
    let other = new_key(gw.store.as_ref(), "other", &KeyPatch::default()).await;
    let (status, answer) = post_json(&gw.http, &url, &other, &body).await;
    stored(&gw, 2.0).await;
    assert_eq!(status, 200);
    assert_eq!(gw.sim.received().len(), 2, "a miss for the other key");
    assert_eq!(unnamed(answer), unnamed(first));
}

#[tokio::test]
async fn embeddings_count_their_usage_against_token_limits_and_are_counted_by_route() {
    let gw = TestGateway::start().await;
    let patch = KeyPatch {
        limits: serde_json::from_value(json!({"tokens_per_minute": 100})).unwrap(),
        ..KeyPatch::default()
    };
    let key = new_key(gw.store.as_ref(), "tokens", &patch).await;
    let url = format!("{}/v1/embeddings", gw.url);
    // 40 bytes each: the simulator's tokenizer counts 40 tokens, the
    // gateway's estimate before the answer is 10 (4 bytes a token). Each is
    // different (a hit would cost nothing).
    let body = |i: usize| json!({"model": MODEL, "input": format!("{i:02} thirty-eight more bytes of input text")});
    let prompt_tokens = format!(r#"sluice_prompt_tokens_total{{model="{MODEL}"}}"#);
    for i in 0..3 {
        let (status, answer) = post_json(&gw.http, &url, &key, &body(i)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["usage"]["prompt_tokens"], 40, "{answer}");
        // Settled (after the answer went out) before the next one asks.
        let settled = eventually(std::time::Duration::from_secs(5), || async {
            let counted = metric(&gw.metrics().await, &prompt_tokens);
            (counted == Some(40.0 * (i + 1) as f64)).then_some(())
        })
        .await;
        assert!(settled.is_some(), "request {i} counted");
    }
    // Each was settled with its usage (40), not the estimate (10): 120 are
    // used, and a fourth does not fit (had the estimates stood, 30 would be
    // used and it would).
    let (fourth, error) = post_json(&gw.http, &url, &key, &body(3)).await;
    assert_eq!(fourth, 429, "{error}");
    assert_eq!(error["error"]["type"], "tokens", "{error}");

    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_total{route="/v1/embeddings",status="2xx",transport="json"}"#
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn ping_and_version_answer_in_vllms_shape_without_a_key() {
    let gw = TestGateway::start().await;
    let sim = gw.sim.url();
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        for base in [&gw.url, &sim] {
            let ping = gw
                .http
                .request(method.clone(), format!("{base}/ping"))
                .send()
                .await
                .unwrap();
            assert_eq!(ping.status(), 200, "{base} {method}");
        }
    }
    let version = |base: String| async move {
        let answer: Value = reqwest::get(format!("{base}/version"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer
    };
    let (ours, vllms) = (version(gw.url.clone()).await, version(sim).await);
    // The same shape; each names its own version.
    assert_eq!(ours["version"], env!("CARGO_PKG_VERSION"));
    assert!(vllms["version"].is_string(), "{vllms}");
    assert_eq!(
        ours.as_object().map(|o| o.keys().collect::<Vec<_>>()),
        vllms.as_object().map(|o| o.keys().collect::<Vec<_>>())
    );
}

#[tokio::test]
async fn an_embedding_model_is_its_own_pool_and_its_alias_is_sent_as_its_name() {
    use sluice::config::{Balance, ModelConfig};
    const EMBEDDER: &str = "sim-bge";
    let embedder = sluice_simulator::Simulator::start(sluice_simulator::SimulatorConfig {
        model: EMBEDDER.into(),
        ..sim_config()
    })
    .await
    .unwrap();
    let embedder_url = embedder.url().parse().unwrap();
    let gw = TestGateway::start_with(sim_config(), move |c| {
        let chat_url = c.upstream.urls[0].clone();
        c.models = vec![
            ModelConfig {
                name: MODEL.into(),
                aliases: Vec::new(),
                endpoints: vec![chat_url],
                upstream_model: None,
                balance: Balance::RoundRobin,
                continue_streams: true,
                capacity: None,
            },
            ModelConfig {
                name: EMBEDDER.into(),
                aliases: vec!["embedder".into()],
                endpoints: vec![embedder_url],
                upstream_model: None,
                balance: Balance::RoundRobin,
                continue_streams: true,
                capacity: None,
            },
        ];
    })
    .await;
    let url = format!("{}/v1/embeddings", gw.url);
    let body = json!({"model": "embedder", "input": ["by alias"], "extra_field": {"kept": true}});
    let (status, through) = post_json(&gw.http, &url, &gw.key, &body).await;
    assert_eq!(status, 200, "{through}");
    // The embedding pool got it under the model's own name, the rest of the
    // body as the client wrote it; the chat pool saw nothing.
    let received = embedder.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body["model"], EMBEDDER);
    assert_eq!(received[0].body["extra_field"]["kept"], true);
    assert!(gw.sim.received().is_empty());
    let direct = json!({"model": EMBEDDER, "input": ["by alias"]});
    let (_, expected) = post_json(
        &gw.http,
        &format!("{}/v1/embeddings", embedder.url()),
        "",
        &direct,
    )
    .await;
    assert_eq!(unnamed(through), unnamed(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_an_embedding_request_stops_it_upstream() {
    let gw = TestGateway::start().await;
    let (url, key) = (format!("{}/v1/embeddings", gw.url), gw.key.clone());
    let body = json!({"model": MODEL, "input": "a slow batch", "sim_first_token_delay_ms": 5000});
    let client = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
    });
    let id = eventually(std::time::Duration::from_secs(5), || async {
        gw.sim.received().first().map(|r| r.request_id.clone())
    })
    .await
    .expect("the request reached vLLM");
    client.abort();
    assert!(
        gw.sim
            .wait_for_abort(&id, std::time::Duration::from_secs(3))
            .await,
        "the upstream request was dropped with its client"
    );
    let series = r#"sluice_requests_total{route="/v1/embeddings",status="4xx",transport="json"}"#;
    let counted = eventually(std::time::Duration::from_secs(5), || async {
        (metric(&gw.metrics().await, series) == Some(1.0)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "counted as the client's leaving (499)");
}
