//! The operator console in headless Chromium, driven as an operator would:
//! sign in (a wrong token refused), create a key and find it, set a limit
//! and see the API enforce it, revoke it and see the API refuse it, read
//! the usage of the requests made, watch a replica go down when its
//! process is killed, stream an answer in the playground, read the plugins,
//! create a team, and find every change in the audit log. Requests without
//! a session or without the CSRF token are refused. Run against the
//! embedded mode (SQLite; this run also writes the screenshots in
//! `docs/console/`) and against PostgreSQL.

mod flows;

use std::time::Duration;

use serde_json::json;

use crate::common::chromium::Browser;
use crate::common::services::Services;
use crate::common::*;

const TOKEN: &str = "console-admin-token-0123456789";

/// The admin listener with its token, a second replica as a process of its
/// own (killed by the test), fast health checks, and one plugin.
fn console_config(config: &mut sluice::config::Config, replica: &str) {
    config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    config.admin.token = Some(TOKEN.to_string().into());
    config.upstream.urls.push(replica.parse().unwrap());
    config.upstream.health_interval = Duration::from_millis(300);
    config.plugins = vec![plugin(
        "pii-redactor",
        "pii_redactor",
        sluice::config::OnError::FailOpen,
        json!({}),
    )];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_gateway_from_the_console_embedded() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let replica = SimulatorProcess::start(&["--token-delay-ms", "2"]);
    let url = replica.url.clone();
    let gw = TestGateway::start_with(sim_config(), |c| console_config(c, &url)).await;
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console");
    flows::operate(browser, &gw, replica, Some(&shots)).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_gateway_from_the_console_on_postgresql() {
    let Some(services) = Services::fresh().await else {
        return;
    };
    let Some(browser) = Browser::start().await else {
        return;
    };
    let replica = SimulatorProcess::start(&["--token-delay-ms", "2"]);
    let sim = sluice_simulator::Simulator::start(sim_config())
        .await
        .unwrap();
    let mut config = services.config(&sim.url(), "");
    console_config(&mut config, &replica.url);
    let gw = TestGateway::start_config(sim, config).await;
    flows::operate(browser, &gw, replica, None).await;
    gw.stop().await;
    services.drop_database().await;
}
