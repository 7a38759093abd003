//! What one key cannot see of another: models, cache entries, sampled answers; a revoked key on an open socket.

use super::*;

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
