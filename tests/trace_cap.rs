//! A client cannot make the gateway trace everything: its `traceparent`'s
//! sampled flag is followed for at most `telemetry.max_client_sampled_per_second`
//! requests a second. (Its own test binary: the trace pipeline is global.)

// A test's unwrap is its assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::*;
use futures::future::join_all;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sampled_flags_are_followed_only_up_to_the_cap() {
    let names: Arc<Mutex<Vec<String>>> = Default::default();
    let sink = names.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                if let Ok(request) = ExportTraceServiceRequest::decode(body) {
                    let mut names = sink.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            names.extend(scope.spans.into_iter().map(|s| s.name));
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let mut telemetry_config = sluice::Config::default().telemetry;
    telemetry_config.otlp_endpoint = Some(endpoint);
    telemetry_config.max_client_sampled_per_second = 3;
    let telemetry =
        sluice::observe::telemetry::init(&sluice::Config::default().log, &telemetry_config);
    let gw = TestGateway::start().await;

    // Twenty requests at once, each from a client that asks for tracing.
    let requests = (0..20).map(|i| {
        let gw = &gw;
        async move {
            let trace_id = format!("{:032x}", 0x4bf9_2f35_77b3_4da6_u128 * 1000 + i);
            gw.http
                .post(gw.completions_url())
                .bearer_auth(&gw.key)
                .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
                .json(&json!({"model": MODEL, "prompt": format!("traced {i}"), "max_tokens": 2}))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
    });
    join_all(requests).await;
    let traced = eventually(Duration::from_secs(10), || {
        telemetry.flush();
        let traced = names
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == "POST /v1/completions")
            .count();
        async move { (traced >= 3).then_some(traced) }
    })
    .await
    .expect("requests within the cap are traced");
    // The cap admits 3 at once and one more every third of a second.
    assert!(traced <= 5, "{traced} of 20 traced");
    // vLLM is told that the others are not sampled.
    let unsampled = gw
        .sim
        .received()
        .iter()
        .filter(|r| r.headers["traceparent"].to_str().unwrap().ends_with("-00"))
        .count();
    assert!(unsampled >= 15, "{unsampled}");
}
