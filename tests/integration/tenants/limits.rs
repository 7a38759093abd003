//! Requests, tokens and concurrency per key and team, in process and across two edges sharing Redis, and while that Redis is down.

use super::*;

/// How many of `responses` were admitted, checking every refusal is OpenAI's 429.
async fn admitted(responses: Vec<reqwest::Response>, kind: &str) -> usize {
    let mut ok = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => {
                ok += 1;
                response.bytes().await.unwrap();
            }
            429 => {
                assert!(response.headers().contains_key("retry-after"));
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["type"], kind, "{body}");
                assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
            }
            other => panic!(
                "unexpected status {other}: {}",
                response.text().await.unwrap()
            ),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_are_exact_in_process() {
    let gw = TestGateway::start().await;
    let key = key_with(gw.store.as_ref(), "five", json!({"requests_per_minute": 5})).await;
    let responses = join_all((0..12).map(|i| post_as(&gw.http, &gw.url, &key, small(i)))).await;
    assert_eq!(admitted(responses, "requests").await, 5);
    // The key the harness made has no limits; it is not held back.
    assert_eq!(gw.post(&small(99)).await.status(), 200);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_limited_requests_total{reason="requests"}"#
        ),
        Some(7.0)
    );
}

#[tokio::test]
async fn admitted_responses_carry_openais_rate_limit_headers() {
    let gw = TestGateway::start().await;
    let key = key_with(
        gw.store.as_ref(),
        "headers",
        json!({"requests_per_minute": 3, "tokens_per_minute": 1000}),
    )
    .await;
    let response = post_as(&gw.http, &gw.url, &key, small(0)).await;
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_string();
    assert_eq!(header("x-ratelimit-limit-requests"), "3");
    assert_eq!(header("x-ratelimit-remaining-requests"), "2");
    assert!(header("x-ratelimit-reset-requests").ends_with('s'));
    assert_eq!(header("x-ratelimit-limit-tokens"), "1000");
    // 2 output tokens and the prompt's estimate are reserved.
    let remaining: u64 = header("x-ratelimit-remaining-tokens").parse().unwrap();
    assert!((990..998).contains(&remaining), "{remaining}");
    // Streams carry them too.
    let mut streamed = small(1);
    streamed["stream"] = json!(true);
    let response = post_as(&gw.http, &gw.url, &key, streamed).await;
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "1");
}

/// Where limits are counted in a test: in process, and (when Redis is there,
/// always in CI) in Redis under a fresh key prefix.
fn limit_stores() -> Vec<Option<(String, String)>> {
    let redis =
        std::env::var("SLUICE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = std::net::TcpStream::connect(redis.trim_start_matches("redis://")).is_ok();
    let required =
        std::env::var_os("CI").is_some() || std::env::var_os("SLUICE_REQUIRE_SERVICES").is_some();
    assert!(
        reachable || !required,
        "Redis is not reachable at {redis}, and CI is set"
    );
    let mut stores = vec![None];
    if reachable {
        let prefix = format!("sluice-test-{}:", uuid::Uuid::new_v4().simple());
        stores.push(Some((redis, prefix)));
    } else {
        eprintln!("SKIPPED the Redis half: Redis is not reachable at {redis}");
    }
    stores
}

fn count_limits_in(config: &mut sluice::Config, store: &Option<(String, String)>) {
    if let Some((url, prefix)) = store {
        config.limits.url = url.clone().into();
        config.limits.key_prefix = prefix.clone();
    }
}

#[tokio::test]
async fn token_reservations_are_settled_with_the_usage() {
    for store in limit_stores() {
        token_settlement(&store).await;
    }
}

async fn token_settlement(store: &Option<(String, String)>) {
    let slow = SimulatorConfig {
        token_delay: Duration::from_millis(40),
        ..sim_config()
    };
    // A request without max_tokens reserves 70 output tokens; the simulator
    // writes 16 (vLLM's default) and reports them in its usage.
    let gw = TestGateway::start_with(slow, |c| {
        c.limits.reserve_tokens = 70.try_into().unwrap();
        count_limits_in(c, store);
    })
    .await;
    let key = key_with(
        gw.store.as_ref(),
        "tokens",
        json!({"tokens_per_minute": 100}),
    )
    .await;
    // One-word prompts of two bytes, each different (a cache hit costs no tokens).
    let body = |prompt: &str| json!({"model": MODEL, "prompt": prompt, "stream": true});
    let running = post_as(&gw.http, &gw.url, &key, body("hi")).await;
    assert_eq!(running.status(), 200);
    // While it runs its whole reservation counts: a second one does not fit.
    let refused = post_as(&gw.http, &gw.url, &key, body("ho")).await;
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "tokens");
    sse_events(running).await;
    // Settled with 17 used (1 prompt + 16 completion): another fits now, and
    // then no third (17 + 17 + 71 > 100).
    let second = eventually(Duration::from_secs(3), || async {
        let response = post_as(&gw.http, &gw.url, &key, body("ho")).await;
        (response.status() == 200).then_some(response)
    })
    .await
    .expect("the unused reservation was freed");
    sse_events(second).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = post_as(&gw.http, &gw.url, &key, body("he")).await;
    assert_eq!(third.status(), 429);
    // A request that could never fit says so.
    let huge = json!({"model": MODEL, "prompt": "hi", "max_tokens": 500});
    let response = post_as(&gw.http, &gw.url, &key, huge).await;
    assert_eq!(response.status(), 429);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Request too large"),
        "{error}"
    );
}

#[tokio::test]
async fn concurrent_requests_are_capped_and_freed_when_they_end() {
    for store in limit_stores() {
        concurrency(&store).await;
    }
}

async fn concurrency(store: &Option<(String, String)>) {
    let slow = SimulatorConfig {
        token_delay: Duration::from_millis(30),
        ..sim_config()
    };
    let gw = TestGateway::start_with(slow, |c| count_limits_in(c, store)).await;
    let key = key_with(gw.store.as_ref(), "two", json!({"max_concurrent": 2})).await;
    let long = |i: usize| json!({"model": MODEL, "prompt": format!("long {i}"), "max_tokens": 20, "stream": true});
    let a = post_as(&gw.http, &gw.url, &key, long(1)).await;
    let b = post_as(&gw.http, &gw.url, &key, long(2)).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let c = post_as(&gw.http, &gw.url, &key, long(3)).await;
    assert_eq!(c.status(), 429);
    let error: Value = c.json().await.unwrap();
    assert_eq!(error["error"]["type"], "concurrency");
    // A client that hangs up frees its place too.
    drop(a);
    sse_events(b).await;
    let d = eventually(Duration::from_secs(3), || async {
        let response = post_as(&gw.http, &gw.url, &key, long(4)).await;
        (response.status() == 200).then_some(response)
    })
    .await;
    assert!(d.is_some(), "places are given back when requests end");
}

#[tokio::test]
async fn an_expired_key_gets_401_and_a_team_limit_holds_across_its_keys() {
    let gw = TestGateway::start().await;
    let store = gw.store.as_ref();
    let expired = KeyPatch {
        expires_at: Some(Some(chrono::Utc::now() - chrono::Duration::seconds(1))),
        ..KeyPatch::default()
    };
    let secret = new_key(store, "old", &expired).await;
    let response = post_as(&gw.http, &gw.url, &secret, small(0)).await;
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );

    let team_limits: LimitsPatch =
        serde_json::from_value(json!({"requests_per_minute": 3})).unwrap();
    tenants::create_team(
        store,
        &sluice::tenancy::audit::Actor::cli(),
        "research",
        &team_limits,
    )
    .await
    .unwrap();
    let member = |name: &'static str| async move {
        let patch = KeyPatch {
            team: Some(Some("research".into())),
            ..KeyPatch::default()
        };
        new_key(store, name, &patch).await
    };
    let (a, b) = (member("alice").await, member("bob").await);
    let mut responses = Vec::new();
    for i in 0..4 {
        responses.push(post_as(&gw.http, &gw.url, &a, small(i)).await);
        responses.push(post_as(&gw.http, &gw.url, &b, small(10 + i)).await);
    }
    assert_eq!(
        admitted(responses, "requests").await,
        3,
        "three for the whole team"
    );
    // Raising the team's limit takes effect within a second.
    let raise: LimitsPatch = serde_json::from_value(json!({"requests_per_minute": 10})).unwrap();
    tenants::update_team(
        store,
        &sluice::tenancy::audit::Actor::cli(),
        "research",
        &raise,
    )
    .await
    .unwrap();
    let admitted_again = eventually(Duration::from_secs(3), || async {
        let response = post_as(&gw.http, &gw.url, &a, small(50)).await;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(admitted_again.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_raises_rate_limit_error_with_the_headers() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let gw = TestGateway::start().await;
    let key = key_with(gw.store.as_ref(), "sdk", json!({"requests_per_minute": 1})).await;
    let result = run_sdk_script(&python, "openai_limits.py", &[&gw.url, &key, MODEL]).await;
    assert_eq!(result["admitted"]["x-ratelimit-limit-requests"], "1");
    assert_eq!(result["admitted"]["x-ratelimit-remaining-requests"], "0");
    let refused = &result["refused"];
    assert_eq!(refused["class"], "RateLimitError");
    assert_eq!(refused["status"], 429);
    assert_eq!(refused["type"], "requests");
    assert_eq!(refused["code"], "rate_limit_exceeded");
    assert_eq!(refused["remaining"], "0");
    let retry_after: u64 = refused["retry_after"].as_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry_after), "{retry_after}");
}

/// Two edges (each on a runtime of its own) sharing PostgreSQL and the
/// limiter's Redis, with `extra` TOML for both.
async fn two_edges(
    services: &Services,
    upstream: &str,
    extra: &str,
) -> (
    Isolated,
    Isolated,
    String,
    String,
    std::sync::Arc<dyn sluice::backends::store::Store>,
) {
    let config = || services.config(upstream, extra);
    let (edge_a, edge_b) = (Isolated::new("edge-a"), Isolated::new("edge-b"));
    let (url_a, store) = edge_a.start_edge(config()).await;
    let (url_b, _) = edge_b.start_edge(config()).await;
    (edge_a, edge_b, url_a, url_b, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_sharing_redis_admit_exactly_the_limit() {
    let Some(services) = Services::fresh().await else {
        return;
    };
    let sim = sluice_simulator::Simulator::start(sim_config())
        .await
        .unwrap();
    let limits = format!(
        "[limits]\nurl = \"{}\"\nkey_prefix = \"sluice-test-{}:\"\n",
        services.redis, services.id
    );
    let (edge_a, edge_b, url_a, url_b, store) = two_edges(&services, &sim.url(), &limits).await;
    let key = key_with(
        store.as_ref(),
        "hundred",
        json!({"requests_per_minute": 100}),
    )
    .await;
    let http = reqwest::Client::new();
    let responses = join_all((0..300).map(|i| {
        let url = if i % 2 == 0 { &url_a } else { &url_b };
        post_as(&http, url, &key, small(i))
    }))
    .await;
    assert_eq!(
        admitted(responses, "requests").await,
        100,
        "exactly the limit, across both edges"
    );
    assert_eq!(sim.received().len(), 100);
    edge_a.kill();
    edge_b.kill();
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_limiters_redis_dies_each_edge_checks_its_share_or_refuses() {
    let Some(services) = Services::fresh().await else {
        return;
    };
    let sim = sluice_simulator::Simulator::start(sim_config())
        .await
        .unwrap();
    let port = free_port();
    let mut redis = start_redis(port);
    let limits = |on_unavailable: &str| {
        format!(
            "[limits]\nurl = \"redis://127.0.0.1:{port}\"\nkey_prefix = \"sluice-test-{}:\"\nedges = 2\non_unavailable = \"{on_unavailable}\"\ntimeout_ms = 200\n",
            services.id
        )
    };
    let (edge_a, edge_b, url_a, url_b, store) =
        two_edges(&services, &sim.url(), &limits("local")).await;
    let refusing = Isolated::new("edge-refusing");
    let (url_c, _) = refusing
        .start_edge(services.config(&sim.url(), &limits("refuse")))
        .await;
    let key = key_with(store.as_ref(), "shared", json!({"requests_per_minute": 10})).await;
    let http = reqwest::Client::new();
    // Redis up: 10 across both edges.
    let responses = join_all((0..20).map(|i| {
        let url = if i % 2 == 0 { &url_a } else { &url_b };
        post_as(&http, url, &key, small(i))
    }))
    .await;
    assert_eq!(admitted(responses, "requests").await, 10);

    redis.kill().unwrap();
    redis.wait().unwrap();
    // Redis gone: each edge allows its share (10 / 2), counted from zero.
    for url in [&url_a, &url_b] {
        let responses = join_all((0..8).map(|i| post_as(&http, url, &key, small(100 + i)))).await;
        assert_eq!(admitted(responses, "requests").await, 5, "{url}");
    }
    // The refusing edge answers 503 for limited keys while Redis is down.
    let response = post_as(&http, &url_c, &key, small(200)).await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limiter unavailable"),
        "{error}"
    );
    for url in [&url_a, &url_c] {
        let metrics = http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains(r#"sluice_backend_up{backend="limits"} 0"#),
            "{metrics}"
        );
        assert!(metric(&metrics, "sluice_limiter_fallbacks_total").unwrap_or(0.0) >= 1.0);
    }
    for rt in [edge_a, edge_b, refusing] {
        rt.kill();
    }
    services.drop_database().await;
}

#[tokio::test]
async fn a_teams_refusal_names_the_team_and_the_headers_show_the_binding_limit() {
    for store in limit_stores() {
        let gw = TestGateway::start_with(sim_config(), |c| count_limits_in(c, &store)).await;
        refusals_name_their_scope(gw).await;
    }
}

async fn refusals_name_their_scope(gw: TestGateway) {
    let store = gw.store.as_ref();
    let one_a_minute: LimitsPatch =
        serde_json::from_value(json!({"requests_per_minute": 1})).unwrap();
    tenants::create_team(
        store,
        &sluice::tenancy::audit::Actor::cli(),
        "tight",
        &one_a_minute,
    )
    .await
    .unwrap();
    let in_team = |name: &'static str, limits: Value| async move {
        let patch = KeyPatch {
            team: Some(Some("tight".into())),
            limits: serde_json::from_value(limits).unwrap(),
            ..KeyPatch::default()
        };
        new_key(store, name, &patch).await
    };
    // A key without limits of its own: the team's limit binds, and says so.
    let plain = in_team("plain", json!({})).await;
    let first = post_as(&gw.http, &gw.url, &plain, small(0)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "1");
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "0");
    let second = post_as(&gw.http, &gw.url, &plain, small(1)).await;
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["x-ratelimit-limit-requests"], "1");
    let error: Value = second.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("this API key's team"), "{message}");

    // A key with a roomy limit of its own in the same team: refused by the
    // team, and the headers describe the team's limit, the one with the least left.
    let roomy = in_team("roomy", json!({"requests_per_minute": 100})).await;
    let refused = post_as(&gw.http, &gw.url, &roomy, small(2)).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-ratelimit-limit-requests"], "1");
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    let error: Value = refused.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("this API key's team"), "{message}");

    // A key alone (no team) with its own limit is named as the key.
    let alone = key_with(store, "alone", json!({"requests_per_minute": 1})).await;
    assert_eq!(
        post_as(&gw.http, &gw.url, &alone, small(3)).await.status(),
        200
    );
    let refused = post_as(&gw.http, &gw.url, &alone, small(4)).await;
    let error: Value = refused.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("on this API key:") && !message.contains("team"),
        "{message}"
    );
}

#[tokio::test]
async fn requests_for_a_model_the_key_may_not_use_cost_it_nothing() {
    for store in limit_stores() {
        let gw = TestGateway::start_with(sim_config(), |c| count_limits_in(c, &store)).await;
        requests_for_other_models_cost_nothing(gw).await;
    }
}

async fn requests_for_other_models_cost_nothing(gw: TestGateway) {
    let key = key_with(
        gw.store.as_ref(),
        "narrow",
        json!({"requests_per_minute": 2, "models": [MODEL]}),
    )
    .await;
    for i in 0..3 {
        let body =
            json!({"model": "someone-elses", "prompt": format!("wrong {i}"), "max_tokens": 1});
        let response = post_as(&gw.http, &gw.url, &key, body).await;
        assert_eq!(response.status(), 404);
    }
    for i in 0..2 {
        let response = post_as(&gw.http, &gw.url, &key, small(100 + i)).await;
        assert_eq!(
            response.status(),
            200,
            "the refused requests used up none of the key's 2 a minute"
        );
    }
    assert_eq!(
        post_as(&gw.http, &gw.url, &key, small(200)).await.status(),
        429,
        "the limit still holds for the model it may use"
    );
}
