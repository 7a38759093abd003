//! Production mode against real PostgreSQL, Redis and Kafka (tansu in CI):
//! each test gets its own database, Redis key prefix and Kafka topics.

mod common;

use std::time::Duration;

use common::services::{Services, config_from_toml, merge_toml};
use common::*;
use serde_json::json;
use sluice::simulator::Simulator;

macro_rules! services {
    () => {
        match Services::fresh().await {
            Some(services) => services,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_smoke_one_edge_with_in_process_worker() {
    let services = services!();
    let sim = Simulator::start(sim_config()).await.unwrap();
    let config = services.config(&sim.url(), &services.kafka_queue(true));
    let gw = TestGateway::start_config(sim, config).await;
    let body = json!({"model": MODEL, "prompt": "through kafka", "max_tokens": 8, "stream": true});
    let events = sse_events(gw.post(&body).await).await;
    assert_eq!(events.len(), 9, "{events:?}");
    assert_eq!(texts(&events), gw.sim.expected_texts(&body));
    gw.stop().await;
    services.drop_database().await;
}
