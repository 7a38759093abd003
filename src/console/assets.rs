//! The console's static files, embedded in the binary: its own stylesheet
//! and script and the vendored chart library. Each is served under a path
//! holding a digest of its content, so browsers may cache it for a year
//! and still never run a stale one after an upgrade.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
    digest: String,
}

const FILES: &[(&str, &str, &[u8])] = &[
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/console.css"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/console.js"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/vendor/uPlot.min.css"),
    ),
];

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|(name, content_type, bytes)| Asset {
            name,
            content_type,
            bytes,
            digest: hex::encode(&Sha256::digest(bytes)[..8]),
        })
        .collect()
});

/// The URL an asset is served at.
pub fn url(name: &str) -> String {
    let digest = ASSETS
        .iter()
        .find(|a| a.name == name)
        .map_or("missing", |a| a.digest.as_str());
    format!("/console/assets/{digest}/{name}")
}

/// `GET /console/assets/{digest}/{name}`: immutable when the digest is the
/// file's, revalidated otherwise (a page cached from an older version).
pub async fn serve(Path((digest, name)): Path<(String, String)>) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let cache = match digest == asset.digest {
        true => "public, max-age=31536000, immutable",
        false => "no-cache",
    };
    (
        [
            (header::CONTENT_TYPE, asset.content_type),
            (header::CACHE_CONTROL, cache),
        ],
        asset.bytes,
    )
        .into_response()
}
