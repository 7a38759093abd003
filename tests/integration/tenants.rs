//! Tenants: per-key and per-team limits (exact counts in process and across
//! two edges sharing Redis, token reservations settled with vLLM's usage,
//! concurrency, the models a key may use, expiry, OpenAI's 429 and headers,
//! what happens when the limiter's Redis goes away) and isolation between
//! keys (cache scope, sampled requests).

use std::time::Duration;

use crate::common::services::{Services, free_port, start_redis};
use crate::common::*;
use futures::future::join_all;
use serde_json::{Value, json};
use sluice::tenancy::tenants::{self, KeyPatch, LimitsPatch};
use sluice_simulator::SimulatorConfig;

/// A key with these limits (JSON, as the admin API takes them).
async fn key_with(store: &dyn sluice::backends::store::Store, name: &str, limits: Value) -> String {
    let patch = KeyPatch {
        limits: serde_json::from_value(limits).unwrap(),
        ..KeyPatch::default()
    };
    tenants::create_key(store, name, &patch)
        .await
        .unwrap()
        .secret
}

async fn post_as(http: &reqwest::Client, url: &str, key: &str, body: Value) -> reqwest::Response {
    http.post(format!("{url}/v1/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn small(i: usize) -> Value {
    json!({"model": MODEL, "prompt": format!("request {i}"), "max_tokens": 2})
}

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
async fn a_key_uses_only_its_models_and_lists_only_them() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.upstream.models = vec![MODEL.into(), "sim-mistral".into()];
    })
    .await;
    let key = key_with(gw.store.as_ref(), "llama-only", json!({"models": [MODEL]})).await;
    assert_eq!(
        post_as(&gw.http, &gw.url, &key, small(0)).await.status(),
        200
    );
    let other = json!({"model": "sim-mistral", "prompt": "x", "max_tokens": 2});
    let response = post_as(&gw.http, &gw.url, &key, other).await;
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["error"]["message"],
        "The model `sim-mistral` does not exist or you do not have access to it."
    );
    let list: Value = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], MODEL);
    assert_eq!(
        gw.sim.received().len(),
        1,
        "the refused model never reached vLLM"
    );
}

#[tokio::test]
async fn an_expired_key_gets_401_and_a_team_limit_holds_across_its_keys() {
    let gw = TestGateway::start().await;
    let store = gw.store.as_ref();
    let expired = KeyPatch {
        expires_at: Some(Some(chrono::Utc::now() - chrono::Duration::seconds(1))),
        ..KeyPatch::default()
    };
    let secret = tenants::create_key(store, "old", &expired)
        .await
        .unwrap()
        .secret;
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
    tenants::create_team(store, "research", &team_limits)
        .await
        .unwrap();
    let member = |name: &'static str| async move {
        let patch = KeyPatch {
            team: Some(Some("research".into())),
            ..KeyPatch::default()
        };
        tenants::create_key(store, name, &patch)
            .await
            .unwrap()
            .secret
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
    tenants::update_team(store, "research", &raise)
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
async fn one_keys_cached_answer_is_not_a_hit_for_another_key() {
    let gw = TestGateway::start().await;
    let other = sluice::tenancy::keys::create_key(gw.store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    let body = json!({"model": MODEL, "prompt": "a private question", "max_tokens": 4, "seed": 1});
    assert!(
        gw.until_hit(&body, Duration::from_secs(3)).await,
        "a hit for its own key"
    );
    let before = gw.sim.received().len();
    post_as(&gw.http, &gw.url, &other, body.clone())
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        gw.sim.received().len(),
        before + 1,
        "another key asks vLLM itself"
    );

    // With cache.scope = "global" they share.
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.cache.scope = sluice::config::CacheScope::Global;
    })
    .await;
    let other = sluice::tenancy::keys::create_key(gw.store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    assert!(gw.until_hit(&body, Duration::from_secs(3)).await);
    post_as(&gw.http, &gw.url, &other, body)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(gw.sim.received().len(), 1, "shared across keys");
}

#[tokio::test]
async fn sampled_requests_are_not_cached_by_default() {
    let gw = TestGateway::start_with(sim_config(), |c| c.cache.sampled = false).await;
    let sampled = json!({"model": MODEL, "prompt": "roll the dice", "max_tokens": 3});
    for _ in 0..3 {
        gw.post(&sampled).await.bytes().await.unwrap();
    }
    assert_eq!(gw.sim.received().len(), 3, "every sample is generated anew");
    for deterministic in [
        json!({"model": MODEL, "prompt": "greedy", "max_tokens": 3, "temperature": 0}),
        json!({"model": MODEL, "prompt": "seeded", "max_tokens": 3, "temperature": 0.8, "seed": 7}),
    ] {
        assert!(
            gw.until_hit(&deterministic, Duration::from_secs(3)).await,
            "{deterministic} is cached"
        );
    }
    let chat =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    gw.post_chat(&chat).await.bytes().await.unwrap();
    gw.post_chat(&chat).await.bytes().await.unwrap();
    let mut seeded_chat = chat.clone();
    seeded_chat["seed"] = json!(3);
    gw.post_chat(&seeded_chat).await.bytes().await.unwrap();
    gw.wait_cached(3).await;
    let before = gw.sim.received().len();
    gw.post_chat(&seeded_chat).await.bytes().await.unwrap();
    assert_eq!(gw.sim.received().len(), before, "a seeded chat is replayed");
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_an_open_websocket() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let slow = SimulatorConfig {
        token_delay: Duration::from_millis(50),
        ..sim_config()
    };
    let gw = TestGateway::start_with(slow, |_| {}).await;
    let mut idle = gw.ws().await;
    let mut streaming = gw.ws().await;
    let long =
        json!({"model": MODEL, "prompt": "a long answer", "max_tokens": 400, "stream": true});
    streaming
        .send(Message::Text(long.to_string().into()))
        .await
        .unwrap();
    let id = first_chunk_request_id(&mut streaming).await;
    assert_eq!(gw.store.revoke_key(&gw.key_id).await.unwrap(), 1);
    // The running stream ends within the revocation bound (1 s), with a 401
    // error frame and close 4401, and its generation is cancelled.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        let mut error = None;
        while let Some(Ok(message)) = streaming.next().await {
            match message {
                Message::Text(text) if text.contains("\"error\"") => error = Some(text.to_string()),
                Message::Close(frame) => return (error, frame.map(|f| u16::from(f.code))),
                _ => {}
            }
        }
        (error, None)
    })
    .await
    .expect("the stream ended within the bound");
    let (error, code) = ended;
    assert!(error.unwrap_or_default().contains("revoked"));
    assert_eq!(code, Some(4401));
    assert!(gw.sim.wait_for_abort(&id, Duration::from_secs(2)).await);
    // The idle socket's next request is refused the same way.
    idle.send(Message::Text(small(1).to_string().into()))
        .await
        .unwrap();
    let frames = ws_frames(&mut idle).await;
    let error: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(error["error"]["code"], 401);
}

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

#[tokio::test]
async fn the_admin_api_manages_keys_teams_limits_and_usage() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.token = Some(ADMIN_TOKEN.to_string().into());
        assert!(
            !format!("{c:?}").contains(ADMIN_TOKEN),
            "the token never appears in Debug output"
        );
    })
    .await;
    let admin = gw.admin_url.clone().expect("the admin API listens");
    let call = |method: Method, path: &str, token: &str, body: Option<Value>| {
        let mut request = gw
            .http
            .request(method, format!("{admin}{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    use reqwest::Method;
    // The wrong token, or none, is refused in the OpenAI error shape.
    let response = call(Method::GET, "/admin/keys", "wrong", None)
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], 401);
    let response = gw
        .http
        .get(format!("{admin}/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // The admin API is not on the public listener.
    let response = gw
        .http
        .get(format!("{}/admin/keys", gw.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    let team = call(
        Method::POST,
        "/admin/teams",
        ADMIN_TOKEN,
        Some(json!({"name": "ops", "limits": {"requests_per_minute": 50}})),
    )
    .await
    .unwrap();
    assert_eq!(team.status(), 201);
    let created = call(
        Method::POST,
        "/admin/keys",
        ADMIN_TOKEN,
        Some(json!({"name": "svc", "team": "ops", "limits": {"requests_per_minute": 2, "models": [MODEL]}})),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert_eq!(created["limits"]["requests_per_minute"], 2);
    assert!(created["team_id"].as_str().unwrap().starts_with("team_"));
    let statuses = |n: usize| {
        let secret = secret.clone();
        let gw = &gw;
        async move {
            let mut statuses = Vec::new();
            for i in 0..n {
                statuses.push(
                    post_as(&gw.http, &gw.url, &secret, small(1000 + i))
                        .await
                        .status()
                        .as_u16(),
                );
            }
            statuses
        }
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);

    let updated = call(
        Method::PATCH,
        "/admin/keys/svc",
        ADMIN_TOKEN,
        Some(json!({"limits": {"requests_per_minute": 5}})),
    )
    .await
    .unwrap();
    assert_eq!(updated.status(), 200);
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["limits"]["requests_per_minute"], 5);
    assert_eq!(
        updated["limits"]["models"],
        json!([MODEL]),
        "untouched fields stay"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        statuses(4).await,
        [200, 200, 200, 429],
        "the new limit within a second"
    );

    let usage = eventually(Duration::from_secs(3), || async {
        let usage: Value = call(Method::GET, "/admin/keys/svc/usage", ADMIN_TOKEN, None)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // Refused requests are logged too (status 429), without tokens.
        (usage["requests"] == 7).then_some(usage)
    })
    .await
    .expect("usage of the seven requests, five admitted");
    assert_eq!(usage["completion_tokens"], 10);
    let team_usage: Value = call(Method::GET, "/admin/teams/ops/usage", ADMIN_TOKEN, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(team_usage["requests"], 7);

    // Bad input: 400 naming the problem, 404 for an unknown key, 409 for a taken name.
    for (body, needle) in [
        (
            json!({"name": "z", "limits": {"requests_per_minute": 0}}),
            "requests_per_minute",
        ),
        (
            json!({"name": "z", "limits": {"tokens_per_minute": -3}}),
            "tokens_per_minute",
        ),
        (json!({"name": "z", "limits": {"rpm": 3}}), "rpm"),
        (json!({"limits": {}}), "name"),
        (json!({"name": "z", "team": "no-such-team"}), "no-such-team"),
    ] {
        let response = call(Method::POST, "/admin/keys", ADMIN_TOKEN, Some(body.clone()))
            .await
            .unwrap();
        let status = response.status().as_u16();
        let error: Value = response.json().await.unwrap();
        assert!(matches!(status, 400 | 404), "{body}: {status}");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {error}"
        );
    }
    let malformed = gw
        .http
        .post(format!("{admin}/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let error: Value = malformed.json().await.unwrap();
    assert_eq!(error["error"]["code"], 400);
    let missing = call(
        Method::GET,
        "/admin/keys/key_nonexistent",
        ADMIN_TOKEN,
        None,
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    let taken = call(
        Method::POST,
        "/admin/keys",
        ADMIN_TOKEN,
        Some(json!({"name": "svc"})),
    )
    .await
    .unwrap();
    assert_eq!(taken.status(), 409);

    // Revoked: refused within a second.
    let revoked = call(Method::DELETE, "/admin/keys/svc", ADMIN_TOKEN, None)
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let revoked: Value = revoked.json().await.unwrap();
    assert!(revoked["revoked_at"].is_string());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        post_as(&gw.http, &gw.url, &secret, small(2000))
            .await
            .status(),
        401
    );
    let keys: Value = call(Method::GET, "/admin/keys", ADMIN_TOKEN, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "svc")
    );
}
