//! The edge under hostile or careless clients: slow headers, a stalled body,
//! idle keep-alive connections and idle WebSockets are closed at their
//! deadlines; connections over the cap are refused at once while the others
//! keep being served; a WebSocket close completes its handshake.

mod common;

use std::time::{Duration, Instant};

use common::*;
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
async fn over_the_connection_cap_new_clients_are_refused_at_once_and_the_rest_served() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.max_connections = Some(3);
    })
    .await;
    // Two connections hold their places with unfinished headers.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(host(&gw)).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        holders.push(stream);
    }
    // The third place serves a keep-alive client, request after request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let health = format!("{}/health", gw.url);
    assert_eq!(client.get(&health).send().await.unwrap().status(), 200);

    // A fourth connection is answered 503 at once, in the OpenAI shape.
    let mut extra = TcpStream::connect(host(&gw)).await.unwrap();
    let refused = closed_within(&mut extra, Duration::from_secs(5))
        .await
        .expect("a connection over the cap was left hanging");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let body: Value = serde_json::from_str(refused.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], 503);
    assert_eq!(client.get(&health).send().await.unwrap().status(), 200);

    // A freed place is taken again.
    drop(holders.pop());
    let served = eventually(Duration::from_secs(5), || async {
        let response = reqwest::Client::new().get(&health).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(served.is_some(), "a freed connection place was not reused");
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_websocket_is_closed_with_going_away() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.server.ws_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut request = gw.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", gw.key).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
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
    let mut request = gw.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", gw.key).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
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
