//! A client that stops reading a stream served through Kafka: the edge holds a
//! bounded part of the answer, then cuts the client off and stops the
//! generation, while other clients are served.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_its_generation_stopped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut services = services!();
    // A broker of its own: the flood below (tens of thousands of chunks as
    // fast as the broker takes them) would hold up the shared broker, and
    // with it the tests running beside this one.
    let port = free_port();
    let _broker = start_tansu(port);
    services.kafka = format!("127.0.0.1:{port}");
    // A context long enough for the flood below.
    let sim = Simulator::start(SimulatorConfig {
        max_model_len: 100_000,
        ..sim_config()
    })
    .await
    .unwrap();
    // The default worker timeout: the flood below (50,000 tokens as fast as
    // the simulator makes them) can hold tansu up for longer than the tests'
    // usual 1.5 s, which the edge would take for a lost worker.
    let (edge, worker, url, key) = edge_and_worker_with(
        &services,
        &sim,
        "stalled",
        "[queue]\nworker_timeout_ms = 10000\n",
    )
    .await;

    // A client that sends its request and then reads nothing, with a small
    // receive buffer: the edge cannot hold back the worker across Kafka, so it
    // holds a bounded number of the answer's chunks, then gives up on it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(url.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let body = json!({"model": MODEL, "prompt": "never read", "max_tokens": 50000, "ignore_eos": true, "stream": true, "sim_token_delay_ms": 0}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    let id = eventually(Duration::from_secs(10), || async {
        sim.received().first().map(|r| r.request_id.clone())
    })
    .await
    .expect("the request reached vLLM");
    assert!(
        sim.wait_for_abort(&id, Duration::from_secs(60)).await,
        "the generation nobody reads was stopped"
    );
    assert!(
        !sim.completed().contains(&id),
        "the generation ran to its end"
    );

    // Other clients are served meanwhile.
    let other = json!({"model": MODEL, "prompt": "read promptly", "max_tokens": 5, "stream": true});
    let events = stream_from(&reqwest::Client::new(), &url, &key, &other).await;
    assert_eq!(texts(&events), sim.expected_texts(&other));

    // Reading at last, the stalled client finds its stream ended: an error
    // event that says why, then [DONE].
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n = stalled.read(&mut buffer).await.unwrap();
            if n == 0 {
                return;
            }
            // Only the new bytes (and a marker's length before them) can hold the end.
            let from = received.len().saturating_sub(b"data: [DONE]".len());
            received.extend_from_slice(&buffer[..n]);
            if memchr::memmem::find(&received[from..], b"data: [DONE]").is_some() {
                return;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received);
    assert!(
        ended.is_ok(),
        "the stalled stream never ended ({} bytes read): {}",
        received.len(),
        text.get(text.len().saturating_sub(600)..).unwrap_or(&text)
    );
    assert!(
        text.contains("the client read too slowly"),
        "no error event before the end: {}",
        text.get(text.len().saturating_sub(600)..).unwrap_or(&text)
    );
    assert!(text.contains("data: [DONE]"));
    edge.kill();
    worker.kill();
    services.drop_database().await;
}
