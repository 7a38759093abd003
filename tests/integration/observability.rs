//! What an operator sees: the metrics after known traffic.

use crate::common::*;
use serde_json::json;
use sluice::config::OnError::FailOpen;

fn value(metrics: &str, series: &str) -> f64 {
    metric(metrics, series).unwrap_or_else(|| panic!("no series {series} in\n{metrics}"))
}

#[tokio::test]
async fn metrics_show_hits_misses_a_plugin_trap_and_an_upstream_error() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.plugins = vec![plugin(
            "trapper",
            "misbehave",
            FailOpen,
            json!({"mode": "trap", "hook": "cache-key"}),
        )];
        c.plugin_host.watch = false;
    })
    .await;
    let body = json!({"model": MODEL, "prompt": "observe", "max_tokens": 5, "stream": true});
    sse_events(gw.post(&body).await).await; // miss
    gw.wait_cached(1).await;
    sse_events(gw.post(&body).await).await; // hit
    let failed = gw
        .post(&json!({"model": MODEL, "prompt": "x", "sim_error_status": 503}))
        .await;
    assert_eq!(failed.status(), 503);
    failed.bytes().await.unwrap();

    let m = gw.metrics().await;
    let route = r#"route="/v1/completions""#;
    assert_eq!(
        value(
            &m,
            &format!(r#"sluice_requests_total{{{route},status="2xx",transport="sse"}}"#)
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            &format!(r#"sluice_requests_total{{{route},status="5xx",transport="json"}}"#)
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            &format!(
                r#"sluice_request_duration_seconds_count{{{route},status="2xx",transport="sse"}}"#
            )
        ),
        2.0
    );
    assert_eq!(
        value(&m, r#"sluice_cache_lookups_total{result="hit"}"#),
        1.0
    );
    assert_eq!(
        value(&m, r#"sluice_cache_lookups_total{result="miss"}"#),
        2.0
    );
    assert_eq!(
        value(
            &m,
            r#"sluice_time_to_first_token_seconds_count{cache="hit",transport="sse"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            r#"sluice_time_to_first_token_seconds_count{cache="miss",transport="sse"}"#
        ),
        1.0
    );
    // Five chunks per stream: four gaps each.
    assert_eq!(value(&m, "sluice_inter_token_latency_seconds_count"), 8.0);
    assert_eq!(
        value(&m, r#"sluice_completion_tokens_total{model="sim-llama"}"#),
        10.0
    );
    assert_eq!(
        value(
            &m,
            r#"sluice_plugin_traps_total{hook="cache-key",plugin="trapper"}"#
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            r#"sluice_plugin_calls_total{hook="cache-key",plugin="trapper"}"#
        ),
        3.0
    );
    assert_eq!(
        value(&m, r#"sluice_upstream_errors_total{kind="status"}"#),
        1.0
    );
    assert_eq!(
        value(&m, r#"sluice_worker_requests_total{outcome="completed"}"#),
        1.0
    );
    assert_eq!(
        value(
            &m,
            r#"sluice_worker_requests_total{outcome="upstream_error"}"#
        ),
        1.0
    );
    assert_eq!(value(&m, "sluice_queue_first_chunk_seconds_count"), 2.0);
    assert_eq!(value(&m, "sluice_active_streams"), 0.0);
    assert_eq!(value(&m, "sluice_worker_inflight_requests"), 0.0);
    assert_eq!(value(&m, r#"sluice_backend_up{backend="store"}"#), 1.0);
    assert!(m.contains("# TYPE sluice_time_to_first_token_seconds histogram"));
    // Nothing with unbounded values is a label.
    assert!(!m.contains("request_id") && !m.contains(&gw.key) && !m.contains("observe"));
}

/// Every metric family the README's metrics table documents.
pub(crate) fn documented_families() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let families: Vec<String> = readme
        .lines()
        .filter(|line| line.starts_with("| `sluice_"))
        .flat_map(|line| {
            let names = line.split('|').nth(1).unwrap_or_default();
            names
                .split(',')
                .map(|name| name.trim().trim_matches('`').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(families.len() > 30, "{families:?}");
    families
}

/// The families of `metrics` with no series (absent from the page).
pub(crate) fn missing_families(metrics: &str, families: &[String]) -> Vec<String> {
    families
        .iter()
        .filter(|family| !metrics.contains(&format!("# TYPE {family} ")))
        .cloned()
        .collect()
}

#[tokio::test]
async fn every_documented_family_is_exposed_from_startup_with_its_known_labels_at_zero() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.plugins = vec![plugin(
            "censor",
            "token_censor",
            FailOpen,
            json!({"words": ["x"]}),
        )];
        c.plugin_host.watch = false;
        c.upstream.models = vec![MODEL.to_string()];
    })
    .await;
    let metrics = gw.metrics().await;
    // Only Kafka has topics to count skipped messages on (the production suite checks it).
    let missing = missing_families(&metrics, &documented_families());
    assert_eq!(
        missing,
        ["sluice_queue_messages_skipped_total"],
        "{metrics}"
    );
    for series in [
        r#"sluice_limited_requests_total{reason="tokens"} 0"#,
        r#"sluice_requests_total{route="/v1/chat/completions",status="5xx",transport="ws"} 0"#,
        r#"sluice_cache_lookups_total{result="error"} 0"#,
        r#"sluice_completion_tokens_total{model="sim-llama"} 0"#,
        r#"sluice_plugin_traps_total{hook="on-token",plugin="censor"} 0"#,
        r#"sluice_plugin_reloads_total{plugin="censor",result="failed"} 0"#,
        r#"sluice_worker_requests_total{outcome="expired"} 0"#,
        r#"sluice_upstream_errors_total{kind="truncated"} 0"#,
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
}
