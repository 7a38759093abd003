//! The edge under hostile or careless clients: slow or no headers, a stalled body,
//! idle keep-alive connections and idle WebSockets are closed at their
//! deadlines; connections over the cap are refused at once while the others
//! keep being served; a WebSocket close completes its handshake.

use std::time::{Duration, Instant};

use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Reads until the server closes the connection; what it sent, or None when
/// it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut received = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

fn host(gw: &TestGateway) -> String {
    gw.url.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn slow_headers_and_idle_keep_alive_connections_are_closed_at_the_header_deadline() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.header_timeout = Duration::from_millis(300);
    })
    .await;

    // Headers that never finish.
    let mut slow = TcpStream::connect(host(&gw)).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let sent = closed_within(&mut slow, Duration::from_secs(10)).await;
    assert!(
        sent.is_some(),
        "a connection with unfinished headers stays open"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A keep-alive connection that goes quiet after one request.
    let mut idle = TcpStream::connect(host(&gw)).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let sent = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection stays open");
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");

    // A connection that never sends a byte is closed at the same deadline,
    // counted from accept.
    let mut silent = TcpStream::connect(host(&gw)).await.unwrap();
    let started = Instant::now();
    let sent = closed_within(&mut silent, Duration::from_secs(10))
        .await
        .expect("a connection that sends nothing stays open");
    assert!(sent.is_empty(), "{sent}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_body_gets_408_at_the_body_deadline() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.body_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = TcpStream::connect(host(&gw)).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\": \"sim-llama\"",
        gw.key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut response))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], 408);
    assert_eq!(body["error"]["type"], "RequestTimeoutError");
    gw.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_silent_clients_make_room_and_the_rest_are_refused_at_once() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.max_connections = Some(3.try_into().unwrap());
    })
    .await;
    let health = format!("{}/health", gw.url);
    // Three silent connections hold every place.
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(host(&gw)).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        silent.push(stream);
    }
    // A client that sends its request at once takes the oldest one's place.
    let started = Instant::now();
    let response = reqwest::Client::new().get(&health).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    let evicted = closed_within(&mut silent[0], Duration::from_secs(5)).await;
    assert!(
        evicted.is_some(),
        "the oldest silent connection was not closed"
    );

    // Served keep-alive connections are never evicted: with every place
    // held by one, a new connection is answered 503 at once, in the OpenAI shape.
    let mut served = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(host(&gw)).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        served.push(stream);
    }
    let mut extra = TcpStream::connect(host(&gw)).await.unwrap();
    let refused = closed_within(&mut extra, Duration::from_secs(5))
        .await
        .expect("a connection over the cap was left hanging");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let body: Value = serde_json::from_str(refused.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], 503);

    // A freed place is taken again.
    drop(served.pop());
    let again = eventually(Duration::from_secs(5), || async {
        let response = reqwest::Client::new().get(&health).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(again.is_some(), "a freed connection place was not reused");
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_websocket_is_closed_with_going_away() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.ws_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut ws = gw.ws().await;
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an idle WebSocket stays open");
    match frame {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_websocket_close_from_the_client_is_answered() {
    let gw = TestGateway::start().await;
    let mut ws = gw.ws().await;
    ws.send(Message::Text(
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": true})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.as_str() == "[DONE]" => break,
            Some(Ok(_)) => {}
            other => panic!("stream ended early: {other:?}"),
        }
    }
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no reply to the close");
    assert!(
        matches!(reply, Some(Ok(Message::Close(_)))),
        "the server did not answer the close: {reply:?}"
    );
    gw.stop().await;
}

async fn ws_connect(
    gw: &TestGateway,
    configure: impl FnOnce(&mut axum::http::Request<()>),
) -> (Ws, axum::http::Response<Option<Vec<u8>>>) {
    let mut request = gw.ws_url().into_client_request().unwrap();
    configure(&mut request);
    tokio_tungstenite::connect_async(request).await.unwrap()
}

async fn close_code_of(ws: &mut Ws) -> (Vec<String>, Option<u16>) {
    let mut texts = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => texts.push(text.to_string()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (texts, frame.map(|f| u16::from(f.code)));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("socket ended without a close frame: {other:?} after {texts:?}"),
        }
    }
}

#[tokio::test]
async fn a_websocket_message_over_the_size_limit_is_closed_with_1009() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.max_body_bytes = 1024.try_into().unwrap()
    })
    .await;
    let mut ws = gw.ws().await;
    let huge = json!({"model": MODEL, "prompt": "x".repeat(4096)}).to_string();
    ws.send(Message::Text(huge.into())).await.unwrap();
    let (_, code) = close_code_of(&mut ws).await;
    assert_eq!(code, Some(1009));
}

#[tokio::test]
async fn websocket_requests_queued_past_the_bound_get_an_error_and_1008() {
    let mut slow = sim_config();
    slow.token_delay = Duration::from_millis(50);
    let gw = TestGateway::start_with(slow, |c| {
        c.server.ws_max_queued_requests = 2.try_into().unwrap()
    })
    .await;
    let mut ws = gw.ws().await;
    let body = json!({"model": MODEL, "prompt": "queue", "max_tokens": 20, "stream": true});
    for _ in 0..4 {
        ws.send(Message::Text(body.to_string().into()))
            .await
            .unwrap();
    }
    let (texts, code) = close_code_of(&mut ws).await;
    assert_eq!(code, Some(1008), "{texts:?}");
    let error = texts
        .iter()
        .filter_map(|t| serde_json::from_str::<Value>(t).ok())
        .find(|v| v.get("error").is_some())
        .expect("an error frame before the close");
    assert_eq!(error["error"]["code"], 400);
}

#[tokio::test]
async fn a_browser_may_present_its_key_as_a_websocket_subprotocol() {
    let gw = TestGateway::start().await;
    let key = gw.key.clone();
    let (mut ws, response) = ws_connect(&gw, move |request| {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("sluice, sluice-key.{key}").parse().unwrap(),
        );
    })
    .await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "sluice");
    let body = json!({"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": true});
    ws.send(Message::Text(body.to_string().into()))
        .await
        .unwrap();
    let Some(Ok(Message::Text(first))) = ws.next().await else {
        panic!("no answer")
    };
    assert!(first.as_str().contains("text_completion"), "{first}");
}

#[tokio::test]
async fn cors_preflights_are_answered_without_a_key_and_origins_are_enforced() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.cors.allowed_origins = vec!["http://good.example".into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, gw.completions_url())
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("http://good.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "http://good.example"
    );
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization"), "{headers}");
    let denied = preflight("http://evil.example").await.unwrap();
    assert!(!denied.headers().contains_key("access-control-allow-origin"));

    // A real request from an allowed page can read the request id.
    let response = gw
        .http
        .post(gw.completions_url())
        .bearer_auth(&gw.key)
        .header("origin", "http://good.example")
        .json(&json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    // The same allow-list applies to WebSocket upgrades.
    let mut request = gw.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", gw.key).parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(request).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("a foreign origin opened a WebSocket: {other:?}"),
    }
    let (_ws, _) = ws_connect(&gw, |request| {
        request
            .headers_mut()
            .insert("origin", "http://good.example".parse().unwrap());
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", gw.key).parse().unwrap(),
        );
    })
    .await;
}

#[tokio::test]
async fn malformed_query_strings_and_oversized_requests_get_openai_errors() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.max_prompts = 2.try_into().unwrap()
    })
    .await;
    let duplicated = gw
        .http
        .get(format!(
            "{}?api_key=a&api_key=b",
            gw.ws_url().replacen("ws", "http", 1)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicated.status(), 400);
    let body: Value = duplicated.json().await.unwrap();
    assert_eq!(body["error"]["code"], 400, "{body}");

    let too_many_choices = gw
        .post(&json!({"model": MODEL, "prompt": "x", "max_tokens": 1, "n": 129}))
        .await;
    assert_eq!(too_many_choices.status(), 400);
    let body: Value = too_many_choices.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("`n`"),
        "{body}"
    );

    let too_many_prompts = gw
        .post(&json!({"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 1}))
        .await;
    assert_eq!(too_many_prompts.status(), 400);
    assert_eq!(gw.sim.received().len(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn one_key_may_hold_only_so_many_websockets() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.ws_max_sockets_per_key = 2.try_into().unwrap()
    })
    .await;
    let first = gw.ws().await;
    let _second = gw.ws().await;
    let mut third = gw.ws().await;
    let (texts, code) = close_code_of(&mut third).await;
    assert_eq!(code, Some(4429), "{texts:?}");
    let error: Value = serde_json::from_str(&texts[0]).unwrap();
    assert_eq!(error["error"]["code"], 429);
    assert_eq!(error["error"]["type"], "RateLimitError");

    // A closed socket gives its place back.
    drop(first);
    let reopened = eventually(Duration::from_secs(5), || async {
        let mut ws = gw.ws().await;
        let body = json!({"model": MODEL, "prompt": "again", "max_tokens": 1, "stream": true});
        ws.send(Message::Text(body.to_string().into())).await.ok()?;
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.as_str().contains("text_completion") => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        reopened.is_some(),
        "the place of a closed socket was not given back"
    );
}

#[tokio::test]
async fn a_flood_of_random_keys_is_bounded_and_locks_out_no_valid_key() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.auth.unknown_lookups_per_second = 5.try_into().unwrap();
    })
    .await;
    let health = json!({"model": MODEL, "prompt": "ok", "max_tokens": 1});
    assert_eq!(
        gw.post(&health).await.status(),
        200,
        "the valid key, seen once"
    );

    let flood = (0..200).map(|i| {
        gw.http
            .post(gw.completions_url())
            .bearer_auth(format!("sk-sluice-random-{i}"))
            .json(&health)
            .send()
    });
    let statuses: Vec<u16> = futures::future::join_all(flood)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 503),
        "{statuses:?}"
    );
    let metrics = gw.metrics().await;
    let unknown = metric(&metrics, r#"sluice_auth_lookups_total{result="unknown"}"#).unwrap_or(0.0);
    let limited = metric(&metrics, r#"sluice_auth_lookups_total{result="limited"}"#).unwrap_or(0.0);
    assert!(
        unknown <= 15.0,
        "{unknown} unknown keys reached the store\n{metrics}"
    );
    assert!(
        limited >= 150.0,
        "{limited} lookups were limited\n{metrics}"
    );

    // The valid key is still served while the flood goes on, also when its
    // cached answer expires (auth.cache_ttl_ms) and it must be looked up again.
    let ttl = Duration::from_millis(500);
    let started = Instant::now();
    let mut i = 1000;
    while started.elapsed() < 3 * ttl {
        for _ in 0..10 {
            i += 1;
            let response = gw
                .http
                .post(gw.completions_url())
                .bearer_auth(format!("sk-sluice-random-{i}"))
                .json(&health)
                .send()
                .await
                .unwrap();
            assert_ne!(response.status(), 200);
        }
        assert_eq!(gw.post(&health).await.status(), 200);
        tokio::time::sleep(ttl / 5).await;
    }
}

#[tokio::test]
async fn each_websocket_request_learns_its_id_from_its_chunks() {
    let gw = TestGateway::start().await;
    let mut ws = gw.ws().await;
    let body = json!({"model": MODEL, "prompt": "whose id", "max_tokens": 2, "stream": true});
    let mut ids = Vec::new();
    for _ in 0..2 {
        ws.send(Message::Text(body.to_string().into()))
            .await
            .unwrap();
        let mut first: Option<Value> = None;
        loop {
            let Some(Ok(Message::Text(text))) = ws.next().await else {
                panic!("stream ended early")
            };
            if text.as_str() == "[DONE]" {
                break;
            }
            first.get_or_insert_with(|| serde_json::from_str(text.as_str()).unwrap());
        }
        let id = first.unwrap()["id"].as_str().unwrap().to_string();
        ids.push(
            id.strip_prefix("cmpl-")
                .expect("vLLM's id form")
                .to_string(),
        );
        // The second request is answered from the cache.
        gw.wait_cached(1).await;
    }
    assert_eq!(
        gw.sim.received().len(),
        1,
        "the second answer was a cache hit"
    );
    assert_ne!(ids[0], ids[1], "a replayed answer names its own request");
    for (id, hit) in ids.iter().zip([false, true]) {
        let row = eventually(Duration::from_secs(5), || async {
            gw.store.inferences_for(id).await.unwrap().pop()
        })
        .await
        .unwrap_or_else(|| panic!("no inference-log row for {id}"));
        assert_eq!(row.cache_hit, hit);
    }
}

/// A stream whose first token is slow (a long queue or prefill) answers at
/// once and sends `: keepalive` comment lines until it comes (a WebSocket,
/// pings), so proxies with idle timeouts keep it; the openai SDK reads the
/// answer through them. A stream that then fails ends with the error event (its status
/// already sent), and one that answers in time has no comment at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_first_token_is_kept_alive_with_sse_comments() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.wait_keepalive = Duration::from_millis(100);
        c.upstream.first_chunk_timeout = Duration::from_millis(2500);
        c.cache.url = "off".to_string().into();
    })
    .await;
    let slow = json!({"model": MODEL, "messages": [{"role": "user", "content": "take your time"}],
        "max_tokens": 6, "stream": true, "sim_first_token_delay_ms": 2000});
    let started = Instant::now();
    let response = gw.post_chat(&slow).await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the headers come before the first token"
    );
    let body = response.text().await.unwrap();
    let comments = body.matches(": keepalive\n\n").count();
    assert!(comments >= 5, "{body}");
    let first_data = body.find("data: ").unwrap();
    assert_eq!(
        body[..first_data].matches(": keepalive").count(),
        comments,
        "only before the first event"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let direct = sse_events(direct_chat(&gw.sim, &slow, "direct").await).await;
    let through: Vec<String> = body
        .split("\n\n")
        .filter_map(|e| e.split_once("data: ").map(|(_, data)| data.to_string()))
        .collect();
    assert_eq!(texts(&through), texts(&direct), "the same answer");

    let fast = json!({"model": MODEL, "messages": [{"role": "user", "content": "quick"}],
        "max_tokens": 3, "stream": true});
    let body = gw.post_chat(&fast).await.text().await.unwrap();
    assert!(!body.contains(": keepalive"), "{body}");

    // Past the upstream's first-chunk deadline: the error, as an event.
    let too_slow = json!({"model": MODEL, "messages": [{"role": "user", "content": "too slow"}],
        "max_tokens": 3, "stream": true, "sim_first_token_delay_ms": 5000});
    let response = gw.post_chat(&too_slow).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.starts_with(": keepalive\n\n"), "{body}");
    assert!(body.contains("data: {\"error\":"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    // Over a WebSocket: pings while the first token is awaited, then the answer.
    let mut ws = gw.chat_ws().await;
    ws.send(Message::text(slow.to_string())).await.unwrap();
    let (mut pings, mut frames) = (0, Vec::new());
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Ping(_) if frames.is_empty() => pings += 1,
            Message::Text(text) if text.as_str() == "[DONE]" => {
                break;
            }
            Message::Text(text) => frames.push(text.to_string()),
            _ => {}
        }
    }
    assert!(pings >= 5, "{pings} pings before the first token");
    assert_eq!(
        texts(&frames),
        texts(&direct),
        "the same answer over the WebSocket"
    );

    if let Some(python) = python_with_openai() {
        let result = run_sdk_script(
            &python,
            "openai_keepalive.py",
            &[&gw.url, &gw.key, MODEL, "2000"],
        )
        .await;
        assert!(result["chunks"].as_u64().unwrap() > 1, "{result}");
        assert!(!result["text"].as_str().unwrap().is_empty(), "{result}");
    }
}
