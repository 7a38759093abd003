//! The pages that show state: the overview (live figures and the backends'
//! health), the fleet (each model's endpoints) and the plugins.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use askama::Template;
use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::history::{INTERVAL, Sample};
use super::session::SignedIn;
use super::{Console, Layout, Page, Shared, html};

/// One backend's state, as the overview lists it.
pub struct Backend {
    pub name: &'static str,
    pub up: bool,
    pub detail: String,
}

/// One endpoint of one model, as the fleet page lists it.
pub struct EndpointRow {
    pub url: String,
    /// `up`, `ejected` or `down`.
    pub state: &'static str,
    pub detail: String,
    pub in_flight: usize,
    pub load: u64,
    pub answered: u64,
    pub failed: u64,
}

pub struct PoolRow {
    pub model: String,
    pub capacity: u64,
    pub running: usize,
    pub waiting: usize,
    pub available: usize,
    pub endpoints: Vec<EndpointRow>,
}

fn fleet_rows(console: &Console) -> Option<Vec<PoolRow>> {
    let fleet = console.edge.stages.fleet.as_ref()?;
    Some(
        fleet
            .models()
            .into_iter()
            .map(|pool| {
                let (running, waiting) = pool.occupancy();
                PoolRow {
                    model: match pool.name.is_empty() {
                        true => "every model (upstream.urls)".into(),
                        false => pool.name.clone(),
                    },
                    capacity: pool.capacity,
                    running,
                    waiting,
                    available: pool.healthy(),
                    endpoints: pool
                        .endpoints
                        .iter()
                        .map(|endpoint| {
                            let (answered, failed) = endpoint.outcomes();
                            let (state, detail) = match (endpoint.healthy(), endpoint.ejected_for())
                            {
                                (false, _) => ("down", "its health check fails".to_string()),
                                (true, Some(left)) => {
                                    let until = chrono::Utc::now() + left;
                                    let until = until.format("%H:%M:%S UTC");
                                    let left = seconds(left);
                                    (
                                        "ejected",
                                        format!("after failures, until {until} ({left} more)"),
                                    )
                                }
                                (true, None) => ("up", String::new()),
                            };
                            EndpointRow {
                                url: endpoint.url.as_str().trim_end_matches('/').to_string(),
                                state,
                                detail,
                                in_flight: endpoint.in_flight(),
                                load: endpoint.load(),
                                answered,
                                failed,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    )
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    layout: Layout,
    /// The samples as JSON, for the charts.
    samples: String,
    latest: Option<Sample>,
    backends: Vec<Backend>,
    pools: Option<Vec<PoolRow>>,
    interval_secs: u64,
}

impl OverviewPage {
    /// The latest sample's figure, as the page's script formats it ("–": none yet).
    fn figure(&self, name: &str) -> String {
        let Some(s) = &self.latest else {
            return "–".into();
        };
        let (value, unit, scale) = match name {
            "requests_per_s" => (Some(s.requests_per_s), "", 1.0),
            "tokens_per_s" => (Some(s.tokens_per_s), "", 1.0),
            "ttft_p50_ms" => (s.ttft_p50_ms, " ms", 1.0),
            "ttft_p99_ms" => (s.ttft_p99_ms, " ms", 1.0),
            "error_rate" => (s.error_rate, " %", 100.0),
            _ => (s.cache_hit_ratio, " %", 100.0),
        };
        value.map_or_else(|| "–".into(), |v| format!("{:.1}{unit}", v * scale))
    }
}

async fn backends(console: &Console) -> Vec<Backend> {
    let checks = crate::edge::ops::check_backends(&console.edge.stages).await;
    let row = |name, check: &Result<(), String>| Backend {
        name,
        up: check.is_ok(),
        detail: check.as_ref().err().cloned().unwrap_or_default(),
    };
    let mut rows = vec![row("store", &checks.store), row("queue", &checks.queue)];
    if let Some(cache) = &checks.cache {
        rows.push(row("cache", cache));
    }
    rows
}

pub async fn overview(State(console): Shared, Extension(signed_in): Extension<SignedIn>) -> Page {
    let samples = console.history.samples();
    html(&OverviewPage {
        layout: Layout::new("overview", "Overview", &signed_in),
        samples: serde_json::to_string(&samples).unwrap_or_default(),
        latest: samples.last().cloned(),
        backends: backends(&console).await,
        pools: fleet_rows(&console),
        interval_secs: INTERVAL.as_secs(),
    })
}

/// The samples alone, which the overview's script polls.
pub async fn overview_json(State(console): Shared) -> Response {
    Json(console.history.samples()).into_response()
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    layout: Layout,
    pools: Option<Vec<PoolRow>>,
}

pub async fn fleet(State(console): Shared, Extension(signed_in): Extension<SignedIn>) -> Page {
    html(&FleetPage {
        layout: Layout::new("fleet", "Fleet", &signed_in),
        pools: fleet_rows(&console),
    })
}

#[derive(Template)]
#[template(path = "plugins.html")]
struct PluginsPage {
    layout: Layout,
    host: Option<crate::plugins::HostStatus>,
}

impl PluginsPage {
    fn when(at: &SystemTime) -> String {
        chrono::DateTime::<chrono::Utc>::from(*at)
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string()
    }

    fn short(digest: &str) -> &str {
        &digest[..digest.len().min(16)]
    }
}

pub async fn plugins(
    State(console): State<Arc<Console>>,
    Extension(signed_in): Extension<SignedIn>,
) -> Page {
    html(&PluginsPage {
        layout: Layout::new("plugins", "Plugins", &signed_in),
        host: console.plugins.as_ref().map(|host| host.status()),
    })
}
