//! The store, the cache and the limits on PostgreSQL and Redis, and their outages.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_keys_revocations_and_inference_logs() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(&sim.url(), "");
    let gw = TestGateway::start_config(sim, config).await;
    let response = gw
        .post(&json!({"model": MODEL, "prompt": "stored in postgres", "max_tokens": 5}))
        .await;
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = eventually(Duration::from_secs(3), || async {
        gw.store.inferences_for(&id).await.unwrap().pop()
    })
    .await
    .expect("inference row in PostgreSQL");
    assert_eq!(
        (row.key_id.as_str(), row.completion_tokens, row.status),
        (gw.key_id.as_str(), 5, 200)
    );

    // The rows really are in PostgreSQL, under the documented schema.
    let pool = sqlx::PgPool::connect(&services.postgres).await.unwrap();
    let (count,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM inference_logs WHERE request_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(count, 1);
    let (hash,): (String,) = sqlx::query_as("SELECT key_hash FROM api_keys WHERE id = $1")
        .bind(&gw.key_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(hash, gw.key, "only the hash is stored");
    assert_eq!(hash, sluice::tenancy::keys::hash_secret(&gw.key));

    let keys = gw.store.list_keys().await.unwrap();
    assert!(
        keys.iter()
            .any(|k| k.id == gw.key_id && k.revoked_at.is_none())
    );
    let usage = gw.store.key_usage(None).await.unwrap();
    assert!(
        usage
            .iter()
            .any(|u| u.key_id == gw.key_id && u.completion_tokens == 5)
    );

    assert_eq!(gw.store.revoke_key(&gw.key_id).await.unwrap(), 1);
    let refused = eventually(Duration::from_secs(2), || async {
        (gw.post(&json!({"model": MODEL, "prompt": "x", "max_tokens": 1}))
            .await
            .status()
            == 401)
            .then_some(())
    })
    .await;
    assert!(refused.is_some(), "revoked key refused");
    pool.close().await;
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_serves_edge_b_what_edge_a_computed() {
    let services = services!();
    let sim_a = Simulator::start(sim_config()).await.unwrap();
    let sim_b = Simulator::start(sim_config()).await.unwrap();
    let config_a = services.config(&sim_a.url(), "");
    let config_b = services.config(&sim_b.url(), "");
    let edge_a = TestGateway::start_config(sim_a, config_a).await;
    let edge_b = TestGateway::start_config(sim_b, config_b).await;

    let body =
        json!({"model": MODEL, "prompt": "shared through redis", "max_tokens": 6, "stream": true});
    let from_a = sse_events(edge_a.post(&body).await).await;
    // The same client (key), now through edge B: entries are scoped per key.
    let from_b = eventually(Duration::from_secs(3), || async {
        let response = edge_b
            .http
            .post(edge_b.completions_url())
            .bearer_auth(&edge_a.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let events = sse_events(response).await;
        (edge_b.sim.received().is_empty()).then_some(events)
    })
    .await
    .expect("edge B answered from the cache without calling its upstream");
    assert_eq!(
        ids_blanked(&from_a),
        ids_blanked(&from_b),
        "same chunks, same boundaries"
    );
    assert_eq!(edge_a.sim.received().len(), 1);
    assert!(
        edge_b
            .metrics()
            .await
            .contains(r#"sluice_cache_lookups_total{result="hit"} 1"#)
    );
    edge_a.stop().await;
    edge_b.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gauges_follow_an_outage_without_anyone_asking() {
    let services = services!();
    let port = free_port();
    let mut redis = start_redis(port);
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(
        &sim.url(),
        &format!("[cache]\nurl = \"redis://127.0.0.1:{port}\"\n"),
    );
    let gw = TestGateway::start_config(sim, config).await;
    let cache_up = |metrics: &str| metric(metrics, r#"sluice_backend_up{backend="cache"}"#);
    assert_eq!(cache_up(&gw.metrics().await), Some(1.0));
    redis.kill().unwrap();
    redis.wait().unwrap();
    // No request and no call to /ready: the background check notices.
    let down = eventually(Duration::from_secs(15), || async {
        (cache_up(&gw.metrics().await) == Some(0.0)).then_some(())
    })
    .await;
    assert!(down.is_some(), "the gauge followed the outage");
    assert_eq!(
        metric(&gw.metrics().await, r#"sluice_backend_up{backend="store"}"#),
        Some(1.0)
    );
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_succeed_while_redis_is_down_and_the_cache_comes_back_by_itself() {
    let services = services!();
    let port = free_port();
    let mut redis = start_redis(port);
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(
        &sim.url(),
        &format!("[cache]\nurl = \"redis://127.0.0.1:{port}\"\n"),
    );
    let gw = TestGateway::start_config(sim, config).await;
    let body =
        |prompt: &str| json!({"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": true});

    assert!(
        gw.until_hit(&body("before"), Duration::from_secs(3)).await,
        "cache works while Redis is up"
    );

    redis.kill().unwrap();
    redis.wait().unwrap();
    for i in 0..5 {
        let events = sse_events(gw.post(&body(&format!("during outage {i}"))).await).await;
        assert_eq!(events.last().unwrap(), "[DONE]");
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"sluice_cache_lookups_total{result="error"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_backend_up{backend="cache"} 0"#),
        "{metrics}"
    );

    let mut redis = start_redis(port);
    let hits_after = eventually(Duration::from_secs(15), || async {
        // Traffic is what probes a Redis that is backing off.
        sse_events(gw.post(&body("probe")).await).await;
        let metrics = gw.metrics().await;
        metrics
            .contains(r#"sluice_backend_up{backend="cache"} 1"#)
            .then_some(())
    })
    .await;
    assert!(
        hits_after.is_some(),
        "the cache recovered without a restart"
    );
    assert!(
        gw.until_hit(&body("after recovery"), Duration::from_secs(5))
            .await,
        "answers are cached again"
    );
    redis.kill().unwrap();
    let _ = redis.wait();
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_clearly_when_a_required_backend_is_unreachable() {
    let services = services!();
    let bad_store =
        config_from_toml("[store]\nurl = \"postgres://sluice:hunter2@127.0.0.1:1/db\"\n");
    let err = sluice::Gateway::start(bad_store)
        .await
        .err()
        .expect("startup fails")
        .to_string();
    assert!(
        err.contains("PostgreSQL") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "credentials never appear: {err}");

    let bad_queue = services.config(
        "http://127.0.0.1:9",
        "[queue]\nurl = \"kafka://127.0.0.1:1\"\n[worker]\nin_process = false\n",
    );
    let err = sluice::Gateway::start(bad_queue)
        .await
        .err()
        .expect("startup fails")
        .to_string();
    assert!(
        err.contains("Kafka") && err.contains("127.0.0.1:1"),
        "{err}"
    );

    // Redis is optional: an unreachable cache does not stop startup.
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(&sim.url(), "[cache]\nurl = \"redis://127.0.0.1:1\"\n");
    let gw = TestGateway::start_config(sim, config).await;
    let events = sse_events(
        gw.post(&json!({"model": MODEL, "prompt": "no redis", "max_tokens": 2, "stream": true}))
            .await,
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    gw.stop().await;
    services.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_every_documented_family_is_exposed_from_startup() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let mut config = services.config(&sim.url(), &services.kafka_queue(true));
    config.plugins = vec![plugin(
        "censor",
        "token_censor",
        sluice::config::OnError::FailOpen,
        json!({"words": ["x"]}),
    )];
    config.upstream.models = vec![MODEL.to_string()];
    let gw = TestGateway::start_config(sim, config).await;
    let metrics = gw.metrics().await;
    let families = crate::observability::documented_families();
    let missing = crate::observability::missing_families(&metrics, &families);
    assert!(missing.is_empty(), "{missing:?} in {metrics}");
    let skipped = format!(
        r#"sluice_queue_messages_skipped_total{{reason="version",topic="sluice-test-{}.requests"}} 0"#,
        services.id
    );
    assert!(metrics.contains(&skipped), "{metrics}");
    gw.stop().await;
    services.drop_database().await;
}
