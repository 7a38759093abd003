//! The plugin platform end to end: every example plugin through REST and
//! WebSocket, on cache misses and hits; misbehaving plugins; hot reload.
//!
//! [`examples`]: the example plugins on completions; [`chat`]: on
//! conversations and tool calls; [`faults`]: plugins that trap, hoard, fail
//! to load or are replaced while streams run; [`agents`]: token filters on
//! the Messages and Responses APIs.

mod agents;
mod chat;
mod examples;
mod faults;
mod pooling;

use crate::common::*;
use futures::SinkExt;
use serde_json::{Value, json};
use sluice::config::OnError::{FailClosed, FailOpen};
use sluice_simulator::{Simulator, SimulatorConfig};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub(super) async fn gateway_with(plugins: Vec<sluice::config::PluginConfig>) -> TestGateway {
    TestGateway::start_with(sim_config(), move |c| {
        c.plugins = plugins;
        c.plugin_host.watch = false;
    })
    .await
}

pub(super) async fn ws_request(gw: &TestGateway, body: &Value) -> Vec<String> {
    let url = format!("{}?api_key={}", gw.ws_url(), gw.key);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text(body.to_string().into()))
        .await
        .unwrap();
    ws_frames(&mut ws).await
}

pub(super) fn censored(text: &str, phrase: &str, mask: &str) -> String {
    text.replace(phrase, mask)
}

pub(super) fn misbehaving(
    mode: &str,
    hook: &str,
    on_error: sluice::config::OnError,
) -> sluice::config::PluginConfig {
    plugin(
        "bad",
        "misbehave",
        on_error,
        json!({"mode": mode, "hook": hook}),
    )
}
