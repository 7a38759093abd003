//! OpenTelemetry traces: an OTLP/HTTP receiver (protobuf, the default
//! protocol) in this process collects the spans of one streamed request through Kafka, and the test checks that they
//! form one trace, continue the client's `traceparent`, and link the worker's
//! spans to the edge's. (Its own test binary: the trace pipeline is global.)

// A test's unwrap is its assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::services::Services;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde_json::{Value, json};
use sluice_simulator::Simulator;

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    /// OTLP's `SpanKind`: 2 server, 4 producer, 5 consumer.
    kind: i32,
    attributes: HashMap<String, Value>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn collect(request: ExportTraceServiceRequest, into: &mut Vec<Span>) {
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes = span
                    .attributes
                    .into_iter()
                    .map(|kv| {
                        let value = match kv.value.and_then(|v| v.value) {
                            Some(any_value::Value::StringValue(s)) => json!(s),
                            Some(any_value::Value::IntValue(i)) => json!(i),
                            Some(any_value::Value::DoubleValue(d)) => json!(d),
                            Some(any_value::Value::BoolValue(b)) => json!(b),
                            _ => Value::Null,
                        };
                        (kv.key, value)
                    })
                    .collect();
                into.push(Span {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes,
                });
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_kafka_is_one_trace_from_client_to_worker() {
    let Some(services) = Services::fresh().await else {
        return;
    };
    let received: Arc<Mutex<Vec<Span>>> = Default::default();
    let sink = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                if let Ok(request) = ExportTraceServiceRequest::decode(body) {
                    collect(request, &mut sink.lock().unwrap());
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let sim = Simulator::start(sim_config()).await.unwrap();
    let telemetry_toml = format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
    let config = services.config(
        &sim.url(),
        &services::merge_toml(&services.kafka_queue(true), &telemetry_toml),
    );
    let telemetry = sluice::observe::telemetry::init(&config.log, &config.telemetry);
    assert!(telemetry.is_exporting());
    let gw = TestGateway::start_config(sim, config).await;

    // A client that decided not to sample: no span of its trace is recorded
    // anywhere, and the decision travels on to the worker and to vLLM.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let unsampled_parent = format!("00-{unsampled_trace}-b7ad6b7169203331-00");
    let response = gw
        .http
        .post(gw.completions_url())
        .bearer_auth(&gw.key)
        .header("traceparent", &unsampled_parent)
        .json(
            &json!({"model": MODEL, "prompt": "do not trace me", "max_tokens": 3, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(sse_events(response).await.len(), 4);
    let upstream_unsampled = gw.sim.received()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        upstream_unsampled.starts_with(&format!("00-{unsampled_trace}-"))
            && upstream_unsampled.ends_with("-00"),
        "vLLM is told the same trace is not sampled: {upstream_unsampled}"
    );

    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let response = gw
        .http
        .post(gw.completions_url())
        .bearer_auth(&gw.key)
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .json(&json!({"model": MODEL, "prompt": "trace me", "max_tokens": 6, "stream": true}))
        .send()
        .await
        .unwrap();
    let request_id = request_id(&response);
    assert_eq!(sse_events(response).await.len(), 7);
    // vLLM is asked to continue the same trace.
    let upstream_parent = gw.sim.received()[1].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(upstream_parent.contains(client_trace), "{upstream_parent}");

    let names = [
        "POST /v1/completions",
        "auth",
        "cache.lookup",
        "queue.submit",
        "worker.upstream",
        "stream.delivery",
    ];
    let spans = eventually(Duration::from_secs(10), || {
        telemetry.flush();
        let spans = received.lock().unwrap().clone();
        let have_all = names.iter().all(|n| spans.iter().any(|s| s.name == *n));
        async move { have_all.then_some(spans) }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "spans not exported: {:?}",
            received
                .lock()
                .unwrap()
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
        )
    });
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span"))
    };

    assert!(
        spans.iter().all(|s| s.trace_id == client_trace),
        "one trace, the client's, and none of the unsampled request: {spans:#?}"
    );
    let request = find("POST /v1/completions");
    assert_eq!(
        request.parent, client_span,
        "the client's traceparent is continued"
    );
    assert_eq!(request.attributes["request_id"], json!(request_id));
    assert_eq!(request.attributes["model"], json!(MODEL));
    assert_eq!(request.attributes["cache"], json!("miss"));
    assert_eq!(request.attributes["status"], json!(200));
    assert_eq!(request.attributes["completion_tokens"], json!(6));
    assert_eq!(request.kind, 2, "server");
    assert_eq!(find("queue.submit").kind, 4, "producer");
    assert_eq!(find("worker.upstream").kind, 5, "consumer");
    assert_eq!(find("cache.lookup").attributes["result"], json!("miss"));
    for child in ["auth", "cache.lookup", "queue.submit", "stream.delivery"] {
        assert_eq!(
            find(child).parent,
            request.span_id,
            "{child} is a child of the request span"
        );
    }
    let worker = find("worker.upstream");
    assert_eq!(
        worker.parent,
        find("queue.submit").span_id,
        "the worker's span continues across Kafka"
    );
    assert_eq!(worker.attributes["outcome"], json!("completed"));
    assert!(
        upstream_parent.contains(&worker.span_id),
        "vLLM's parent is the worker span"
    );

    // A chat is traced the same way, under its own route's name.
    let chat_parent = "b7ad6b7169203331";
    let response = gw
        .http
        .post(gw.chat_url())
        .bearer_auth(&gw.key)
        .header("traceparent", format!("00-{client_trace}-{chat_parent}-01"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "trace this chat"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let spans = route_spans(
        &received,
        &telemetry,
        "POST /v1/chat/completions",
        chat_parent,
    )
    .await;
    let (chat, worker) = spans.expect("the chat's request span and its worker span across Kafka");
    assert_eq!(chat.parent, chat_parent);
    assert_eq!(chat.trace_id, client_trace);
    assert_eq!(chat.attributes["completion_tokens"], json!(4));
    assert_eq!(worker.attributes["outcome"], json!("completed"));

    // So are an embedding, a transcription (a multipart upload) and a message.
    let embedding_parent = "c7ad6b7169203332";
    let response = gw
        .http
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(&gw.key)
        .header(
            "traceparent",
            format!("00-{client_trace}-{embedding_parent}-01"),
        )
        .json(&json!({"model": MODEL, "input": ["trace", "this batch"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let (embedding, _) = route_spans(
        &received,
        &telemetry,
        "POST /v1/embeddings",
        embedding_parent,
    )
    .await
    .expect("the embedding's request span and its worker span across Kafka");
    assert_eq!(embedding.attributes["status"], json!(200));
    let transcription_parent = "d7ad6b7169203333";
    let file = reqwest::multipart::Part::bytes(sluice_simulator::wav(500, 2)).file_name("a.wav");
    let form = reqwest::multipart::Form::new()
        .part("file", file)
        .text("model", MODEL)
        .text("stream", "true");
    let response = gw
        .http
        .post(format!("{}/v1/audio/transcriptions", gw.url))
        .bearer_auth(&gw.key)
        .header(
            "traceparent",
            format!("00-{client_trace}-{transcription_parent}-01"),
        )
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let (transcription, worker) = route_spans(
        &received,
        &telemetry,
        "POST /v1/audio/transcriptions",
        transcription_parent,
    )
    .await
    .expect("the transcription's request span and its worker span across Kafka");
    assert_eq!(transcription.attributes["completion_tokens"], json!(1));
    assert_eq!(worker.attributes["outcome"], json!("completed"));

    // And an Anthropic message, authenticated by x-api-key.
    let message_parent = "e7ad6b7169203334";
    let response = gw
        .http
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &gw.key)
        .header(
            "traceparent",
            format!("00-{client_trace}-{message_parent}-01"),
        )
        .json(&json!({"model": MODEL, "max_tokens": 3, "stream": true,
            "messages": [{"role": "user", "content": "trace this message"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let (message, worker) = route_spans(&received, &telemetry, "POST /v1/messages", message_parent)
        .await
        .expect("the message's request span and its worker span across Kafka");
    assert_eq!(message.attributes["completion_tokens"], json!(3));
    assert_eq!(worker.attributes["outcome"], json!("completed"));

    // And a streamed response of the Responses API, then a retrieve of it.
    let response_parent = "f8be7c827a314445";
    let response = gw
        .http
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(&gw.key)
        .header(
            "traceparent",
            format!("00-{client_trace}-{response_parent}-01"),
        )
        .json(
            &json!({"model": MODEL, "max_output_tokens": 3, "stream": true,
            "input": "trace this response"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    let (created, worker) =
        route_spans(&received, &telemetry, "POST /v1/responses", response_parent)
            .await
            .expect("the response's request span and its worker span across Kafka");
    assert_eq!(created.attributes["completion_tokens"], json!(3));
    assert_eq!(worker.attributes["outcome"], json!("completed"));
    let id = events
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    let retrieve_parent = "09cf8d938b425556";
    let response = gw
        .http
        .get(format!("{}/v1/responses/{id}", gw.url))
        .bearer_auth(&gw.key)
        .header(
            "traceparent",
            format!("00-{client_trace}-{retrieve_parent}-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    route_spans(
        &received,
        &telemetry,
        "GET /v1/responses/{response_id}",
        retrieve_parent,
    )
    .await
    .expect("the retrieve's request span and its worker span");
    gw.stop().await;
    services.drop_database().await;
}

/// The request span named `name` whose parent is `parent`, and the worker
/// span under its `queue.submit`, once both are exported.
async fn route_spans(
    received: &Arc<Mutex<Vec<Span>>>,
    telemetry: &sluice::observe::telemetry::Telemetry,
    name: &str,
    parent: &str,
) -> Option<(Span, Span)> {
    eventually(Duration::from_secs(10), || {
        telemetry.flush();
        let spans = received.lock().unwrap().clone();
        let request = spans
            .iter()
            .find(|s| s.name == name && s.parent == parent)
            .cloned();
        let submit = request.as_ref().and_then(|request| {
            spans
                .iter()
                .find(|s| s.name == "queue.submit" && s.parent == request.span_id)
                .cloned()
        });
        let worker = submit.as_ref().and_then(|submit| {
            spans
                .iter()
                .find(|s| s.name == "worker.upstream" && s.parent == submit.span_id)
                .cloned()
        });
        async move { request.zip(worker) }
    })
    .await
}
