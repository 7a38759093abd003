//! Resuming a stream on another edge: the replay buffer in Redis, shared
//! by the edges, the generation through Kafka.

use super::*;
use crate::resume::{assert_resumed, cut_after, long_completion};

/// Cut at chunk 20 of 200 on one edge, a client resumes on the other with
/// `Last-Event-ID`: chunks 21 to 200 and the end, exactly once, from the
/// one generation; the first edge keeps it going while the client reads
/// from the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_on_one_edge_resumes_on_the_other() {
    let services = services!();
    let sim = Simulator::start(SimulatorConfig {
        token_delay: Duration::from_millis(8),
        ..sim_config()
    })
    .await
    .unwrap();
    // A short grace period: the resumed client must keep the stream alive from the other edge.
    let extra = format!(
        "{}\n[resume]\ngrace_ms = 300\n",
        services.kafka_queue(false)
    );
    let config = || services.config(&sim.url(), &extra);
    let worker = Isolated::new("worker");
    worker.start_worker(config()).await;
    let (edge_a, edge_b) = (Isolated::new("edge-a"), Isolated::new("edge-b"));
    let (url_a, store) = edge_a.start_edge(config()).await;
    let (url_b, _) = edge_b.start_edge(config()).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "resumer")
        .await
        .unwrap()
        .secret;
    let http = reqwest::Client::new();
    let body = long_completion();
    let reference = sse_events(direct(&sim, &body, "reference").await).await;
    let response = http
        .post(format!("{url_a}/v1/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (id, first) = cut_after(response, 20).await;
    let resumed = http
        .get(format!("{url_b}/v1/streams/{id}"))
        .bearer_auth(&key)
        .header("last-event-id", format!("{id}.20"))
        .send()
        .await
        .unwrap();
    assert_resumed(resumed, &id, &first, &reference, "on the other edge").await;
    assert_eq!(sim.received().len(), 2, "the reference and one generation");
    // Resumed after its last event, on the edge that did not run it: nothing more, at once.
    let after_the_end = http
        .get(format!("{url_b}/v1/streams/{id}?after=201"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(after_the_end.status(), 200);
    let nothing = tokio::time::timeout(Duration::from_secs(5), after_the_end.text())
        .await
        .expect("the resumed stream ends")
        .unwrap();
    assert_eq!(nothing, "");
    // Another key, on either edge: not found.
    let other = sluice::tenancy::keys::create_key(store.as_ref(), "other")
        .await
        .unwrap()
        .secret;
    for url in [&url_a, &url_b] {
        let refused = http
            .get(format!("{url}/v1/streams/{id}"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 404);
    }
    for rt in [edge_a, edge_b, worker] {
        rt.kill();
    }
    services.drop_database().await;
}

/// Fifty concurrent streams through Kafka and two workers, one replica
/// SIGKILLed mid-answer: every stream continues on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_streams_through_kafka_survive_a_replica_dying() {
    let services = services!();
    let args = ["--token-delay-ms", "25", "--first-token-delay-ms", "20"];
    let mut replicas = [
        SimulatorProcess::start(&args),
        SimulatorProcess::start(&args),
    ];
    let extra = format!(
        "{}\n[upstream]\nurls = [\"{}\", \"{}\"]\nbalance = \"round_robin\"\n[cache]\nurl = \"off\"\n",
        services.kafka_queue(false),
        replicas[0].url,
        replicas[1].url
    );
    let config = || services.config(&replicas[0].url, &extra);
    let (worker_1, worker_2) = (Isolated::new("worker-1"), Isolated::new("worker-2"));
    worker_1.start_worker(config()).await;
    worker_2.start_worker(config()).await;
    let edge = Isolated::new("edge");
    let (url, store) = edge.start_edge(config()).await;
    let key = sluice::tenancy::keys::create_key(store.as_ref(), "fifty")
        .await
        .unwrap()
        .secret;
    let ids = crate::fleet::fifty_streams_survive_a_replica_kill(&url, &key, &mut replicas).await;
    // The worker's count reached the edge's inference log through Kafka.
    let continued = crate::fleet::continued_in_the_log(store.as_ref(), &ids).await;
    assert!(
        (1..50).contains(&continued),
        "{continued} of 50 logged as continued"
    );
    for rt in [edge, worker_1, worker_2] {
        rt.kill();
    }
    services.drop_database().await;
}
