//! Trace export over OTLP/gRPC (`telemetry.protocol = "grpc"`, the port most
//! collectors listen on): an OTLP gRPC receiver in this process collects the
//! spans of one request in embedded mode. (Its own test binary: the tracer
//! is global.)

// A test's unwrap is its assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::json;
use sluice::config::{Config, OtlpProtocol};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// (span name, trace id) of every span received.
type Received = Arc<Mutex<Vec<(String, String)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let trace_id = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    received.push((span.name, trace_id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_grpc_collector() {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Collector(received.clone())))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let mut config = Config::default();
    config.telemetry.otlp_endpoint = Some(endpoint);
    config.telemetry.protocol = OtlpProtocol::Grpc;
    let telemetry = sluice::observe::telemetry::init(&config.log, &config.telemetry);
    assert!(telemetry.is_exporting());
    let gw = TestGateway::start().await;

    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = gw
        .http
        .post(gw.completions_url())
        .bearer_auth(&gw.key)
        .header("traceparent", format!("00-{client_trace}-00f067aa0ba902b7-01"))
        .json(&json!({"model": MODEL, "prompt": "trace me over grpc", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(sse_events(response).await.len(), 4);

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
        let have_all = names.iter().all(|n| spans.iter().any(|(s, _)| s == n));
        async move { have_all.then_some(spans) }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "spans not exported over gRPC: {:?}",
            received.lock().unwrap()
        )
    });
    assert!(
        spans.iter().all(|(_, trace)| trace == client_trace),
        "one trace, the client's: {spans:?}"
    );

    // A refused WebSocket login is traced like a refused REST request.
    let refused_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = format!("{}?api_key=sk-sluice-wrong", gw.ws_url())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "traceparent",
        format!("00-{refused_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    let (_ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let refused = eventually(Duration::from_secs(10), || {
        telemetry.flush();
        let names: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, trace)| trace == refused_trace)
            .map(|(name, _)| name.clone())
            .collect();
        let traced = names.iter().any(|n| n == "auth") && names.len() >= 2;
        async move { traced.then_some(names) }
    })
    .await;
    assert!(refused.is_some(), "the refused login was not traced");
    gw.stop().await;
}
