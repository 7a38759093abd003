//! Resumable streams: a client whose connection is cut comes back with
//! `Last-Event-ID` (on the route it used, or `GET /v1/streams/{id}`), or
//! with a resume message on a WebSocket, and gets the rest of the same
//! generation, exactly once; a client that never comes back has its
//! generation cancelled after the grace period; another key cannot resume
//! it; a stream that outgrew its buffer says so. Waits kept alive through
//! a proxy with an idle timeout are here too.

use std::time::Duration;

use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice_simulator::SimulatorConfig;
use tokio_tungstenite::tungstenite::Message;

/// One SSE event as a client reads it: its `id:` field and its `data:`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub id: Option<String>,
    pub data: String,
}

/// Reads SSE events with their ids from a streamed response.
pub(crate) struct EventReader {
    response: reqwest::Response,
    buffer: String,
}

impl EventReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event {
                    id: None,
                    data: String::new(),
                };
                for line in block.lines() {
                    if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.to_string());
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        event.data.push_str(data);
                    }
                }
                if event.data.is_empty() {
                    continue; // a comment (keepalive)
                }
                return Some(event);
            }
            let chunk = self.response.chunk().await.ok()??;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    pub async fn rest(mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

pub(crate) fn datas(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.data.clone()).collect()
}

/// The ids `<stream>.<from>` to `<stream>.<to>`.
pub(crate) fn ids(stream: &str, from: usize, to: usize) -> Vec<Option<String>> {
    (from..=to).map(|n| Some(format!("{stream}.{n}"))).collect()
}

/// Reads the first `n` events of a streamed answer, then cuts the
/// connection: the stream's id and the events read.
pub(crate) async fn cut_after(response: reqwest::Response, n: usize) -> (String, Vec<Event>) {
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let mut reader = EventReader::new(response);
    let mut first = Vec::new();
    while first.len() < n {
        first.push(reader.next().await.expect("an event"));
    }
    (id, first)
}

/// A resumed stream of `reference`'s answer, cut after `first`: every
/// later event once, in order, and with `first` the whole answer.
pub(crate) async fn assert_resumed(
    resumed: reqwest::Response,
    id: &str,
    first: &[Event],
    reference: &[String],
    what: &str,
) {
    assert_eq!(resumed.status(), 200, "{what}");
    let rest = EventReader::new(resumed).rest().await;
    let ids_rest: Vec<_> = rest.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        ids_rest,
        ids(id, first.len() + 1, reference.len()),
        "{what}: each once, in order"
    );
    let whole = [datas(first), datas(&rest)].concat();
    assert_eq!(texts(&whole), texts(reference), "{what}: the whole answer");
    assert_eq!(whole.last().map(String::as_str), Some("[DONE]"), "{what}");
}

fn slow_tokens() -> SimulatorConfig {
    SimulatorConfig {
        token_delay: Duration::from_millis(8),
        ..sim_config()
    }
}

pub(crate) fn long_completion() -> Value {
    json!({"model": MODEL, "prompt": "a long story", "max_tokens": 200, "ignore_eos": true,
        "temperature": 0, "stream": true})
}

/// Cut at chunk 20 of 200, a client comes back with `Last-Event-ID`, on
/// its own route (the same POST) and on `GET /v1/streams/{id}`: it gets
/// chunks 21 to 200 and the end exactly once, from the one generation.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_at_chunk_20_resumes_with_last_event_id() {
    let gw = TestGateway::start_with(slow_tokens(), |c| {
        c.cache.url = "off".to_string().into();
    })
    .await;
    let body = long_completion();
    let reference = sse_events(direct(&gw.sim, &body, "reference").await).await;
    assert_eq!(reference.len(), 201, "200 tokens and [DONE]");
    for resume_on in ["the same route", "the resume URL"] {
        let before = gw.sim.received().len();
        let (id, first) = cut_after(gw.post(&body).await, 20).await;
        let ids_seen: Vec<_> = first.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids_seen, ids(&id, 1, 20));
        let resumed = match resume_on {
            "the same route" => gw.http.post(gw.completions_url()).json(&body),
            _ => gw.http.get(format!("{}/v1/streams/{id}", gw.url)),
        };
        let resumed = resumed
            .bearer_auth(&gw.key)
            .header("last-event-id", format!("{id}.20"))
            .send()
            .await
            .unwrap();
        assert_resumed(resumed, &id, &first, &reference, resume_on).await;
        assert_eq!(
            gw.sim.received().len(),
            before + 1,
            "{resume_on}: one generation"
        );
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_stream_resumes_total{outcome="resumed"}"#
        ),
        Some(2.0)
    );
}

/// A client that never comes back: its generation is cancelled once the
/// grace period has passed, and logged as the client's leaving.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_nobody_resumes_is_cancelled_after_the_grace_period() {
    let sim = SimulatorConfig {
        token_delay: Duration::from_millis(20),
        ..sim_config()
    };
    let gw = TestGateway::start_with(sim, |c| {
        c.cache.url = "off".to_string().into();
        c.resume.grace = Duration::from_millis(400);
    })
    .await;
    // 2,000 tokens: 40 s if nobody stopped it.
    let body = json!({"model": MODEL, "prompt": "an endless story", "max_tokens": 2000,
        "ignore_eos": true, "stream": true});
    let response = gw.post(&body).await;
    let id = request_id(&response);
    let mut reader = EventReader::new(response);
    for _ in 0..5 {
        reader.next().await.expect("an event");
    }
    drop(reader);
    let running = || async {
        let metrics = scrape_metrics(&gw.sim.url()).await.unwrap_or_default();
        metric(
            &metrics,
            r#"vllm:num_requests_running{model_name="sim-llama"}"#,
        )
    };
    assert_eq!(
        running().await,
        Some(1.0),
        "still generating in the grace period"
    );
    let stopped = eventually(Duration::from_secs(10), || async {
        (running().await == Some(0.0)).then_some(())
    })
    .await;
    assert!(stopped.is_some(), "the generation was cancelled");
    let row = eventually(Duration::from_secs(5), || async {
        gw.store.inferences_for(&id).await.unwrap().pop()
    })
    .await
    .expect("an inference-log row");
    assert_eq!(row.status, 499, "{row:?}");
    assert!(row.completion_tokens < 2000, "{row:?}");
    assert_eq!(
        metric(&gw.metrics().await, "sluice_streams_abandoned_total"),
        Some(1.0)
    );
    // Coming back too late: what was sent, then the reason it stopped.
    let late = gw
        .http
        .get(format!("{}/v1/streams/{id}?after=5", gw.url))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 200);
    let events = EventReader::new(late).rest().await;
    assert!(
        events
            .iter()
            .rev()
            .nth(1)
            .unwrap()
            .data
            .contains("resume.grace_ms"),
        "{events:?}"
    );
}

/// Only the key that made a stream may resume it: another key gets the
/// 404 an unknown id gets, by either way of resuming.
#[tokio::test(flavor = "multi_thread")]
async fn another_key_cannot_resume_a_stream() {
    let gw = TestGateway::start_with(slow_tokens(), |c| {
        c.cache.url = "off".to_string().into();
    })
    .await;
    let other = sluice::tenancy::keys::create_key(gw.store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    let body = long_completion();
    let response = gw.post(&body).await;
    let id = request_id(&response);
    let mut reader = EventReader::new(response);
    reader.next().await.expect("an event");
    let by_get = |key: &str, id: &str| {
        gw.http
            .get(format!("{}/v1/streams/{id}", gw.url))
            .bearer_auth(key)
            .header("last-event-id", format!("{id}.1"))
            .send()
    };
    for (key, stream, what) in [
        (&other, id.as_str(), "another key"),
        (&gw.key, "nope", "an unknown id"),
    ] {
        let refused = by_get(key, stream).await.unwrap();
        assert_eq!(refused.status(), 404, "{what}");
        let error: Value = refused.json().await.unwrap();
        assert_eq!(
            error["error"]["message"],
            format!("no stream '{stream}' to resume")
        );
    }
    let refused = gw
        .http
        .post(gw.completions_url())
        .bearer_auth(&other)
        .header("last-event-id", format!("{id}.1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let resumed = by_get(&gw.key, &id).await.unwrap();
    assert_eq!(resumed.status(), 200);
    assert_eq!(
        EventReader::new(resumed).rest().await.last().unwrap().data,
        "[DONE]"
    );
    assert_eq!(gw.sim.received().len(), 1, "nothing was generated again");
}

/// A stream larger than `resume.max_stream_bytes` is delivered whole to its
/// client, but can no longer be resumed: a clear 410.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_outgrew_its_buffer_says_so_on_resume() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.cache.url = "off".to_string().into();
        c.resume.max_stream_bytes = std::num::NonZeroUsize::new(4096).unwrap();
    })
    .await;
    let body = long_completion();
    let response = gw.post(&body).await;
    let id = request_id(&response);
    let events = EventReader::new(response).rest().await;
    assert_eq!(events.len(), 201, "the live client gets it all");
    let resumed = gw
        .http
        .get(format!("{}/v1/streams/{id}?after=1", gw.url))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 410);
    let error: Value = resumed.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("resume.max_stream_bytes"), "{message}");
}

/// A WebSocket client whose socket closed mid-answer opens another and
/// sends a resume message: the frames after the last one it had.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_resumes_on_a_new_socket() {
    let gw = TestGateway::start_with(slow_tokens(), |c| {
        c.cache.url = "off".to_string().into();
    })
    .await;
    let body = long_completion();
    let reference = sse_events(direct(&gw.sim, &body, "reference").await).await;
    let mut ws = gw.ws().await;
    ws.send(Message::text(body.to_string())).await.unwrap();
    let mut frames = vec![];
    while frames.len() < 20 {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => frames.push(text.to_string()),
            other => panic!("{other:?}"),
        }
    }
    drop(ws);
    // The stream's id is the request id, the tail of each chunk's `id`.
    let chunk_id: Value = serde_json::from_str(&frames[0]).unwrap();
    let id = chunk_id["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("cmpl-")
        .to_string();
    let mut ws = gw.ws().await;
    ws.send(Message::text(
        json!({"resume": id, "after": 20}).to_string(),
    ))
    .await
    .unwrap();
    let rest = ws_frames(&mut ws).await;
    assert_eq!(rest.len(), 181, "frames 21 to 200, then [DONE]");
    let whole = [frames, rest].concat();
    assert_eq!(texts(&whole), texts(&reference));
    assert_eq!(
        gw.sim.received().len(),
        2,
        "the reference and one generation"
    );
}

/// A TCP proxy that closes a connection when no byte has crossed it, either
/// way, for `idle` (as load balancers do). Returns its URL.
async fn idle_proxy(target: &str, idle: Duration) -> String {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = target.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let started = tokio::time::Instant::now();
            let last = Arc::new(AtomicU64::new(0));
            let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                        mut to: tokio::net::tcp::OwnedWriteHalf,
                        last: Arc<AtomicU64>| async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = from.read(&mut buf).await {
                    last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            let (client_read, client_write) = client.into_split();
            let (upstream_read, upstream_write) = upstream.into_split();
            let up = tokio::spawn(pipe(client_read, upstream_write, last.clone()));
            let down = tokio::spawn(pipe(upstream_read, client_write, last.clone()));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(idle / 10).await;
                    let quiet = started.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                    if quiet >= idle.as_millis() as u64 || (up.is_finished() && down.is_finished())
                    {
                        up.abort();
                        down.abort();
                        return;
                    }
                }
            });
        }
    });
    url
}

/// A first token three times as slow as a proxy's idle timeout (scaled
/// down from 30 s and 10 s) reaches the client through the proxy, because
/// the stream sends SSE comments while it waits; the openai SDK reads it
/// through the same proxy. Without the comments, the proxy cuts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_first_token_arrives_through_a_proxy_that_cuts_idle_connections() {
    let idle = Duration::from_millis(1500);
    let delay_ms = 4500;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "think first"}],
        "max_tokens": 5, "stream": true, "sim_first_token_delay_ms": delay_ms});
    for keepalive in [Duration::from_millis(400), Duration::ZERO] {
        let gw = TestGateway::start_with(sim_config(), |c| {
            c.server.wait_keepalive = keepalive;
            c.upstream.first_chunk_timeout = Duration::from_secs(20);
            c.cache.url = "off".to_string().into();
        })
        .await;
        let proxy = idle_proxy(&gw.url, idle).await;
        let sent = gw
            .http
            .post(format!("{proxy}/v1/chat/completions"))
            .bearer_auth(&gw.key)
            .json(&body)
            .send()
            .await;
        let text = match sent {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if keepalive.is_zero() {
            assert!(
                !text.contains("[DONE]"),
                "the proxy cut the silent wait: {text}"
            );
            continue;
        }
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let direct = sse_events(direct_chat(&gw.sim, &body, "direct").await).await;
        let through: Vec<String> = without_ids(&text)
            .split("\n\n")
            .filter_map(|e| e.split_once("data: ").map(|(_, data)| data.to_string()))
            .collect();
        assert_eq!(texts(&through), texts(&direct));
        if let Some(python) = python_with_openai() {
            let result = run_sdk_script(
                &python,
                "openai_keepalive.py",
                &[&proxy, &gw.key, MODEL, &delay_ms.to_string()],
            )
            .await;
            let script = json!({"model": MODEL, "max_tokens": 6,
                "messages": [{"role": "user", "content": "take your time"}], "stream": true});
            let undelayed = sse_events(direct_chat(&gw.sim, &script, "sdk").await).await;
            assert_eq!(result["text"], texts(&undelayed)[0].as_str(), "{result}");
        }
    }
}
