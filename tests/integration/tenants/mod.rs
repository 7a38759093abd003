//! Tenants: per-key and per-team limits (exact counts in process and across
//! two edges sharing Redis, token reservations settled with vLLM's usage,
//! concurrency, the models a key may use, expiry, OpenAI's 429 and headers,
//! what happens when the limiter's Redis goes away) and isolation between
//! keys (cache scope, sampled requests).
//!
//! [`limits`]: limits counted in process and across edges; [`isolation`]:
//! what one key cannot see of another's, and revocation; [`admin`]: the
//! admin API.

mod admin;
mod isolation;
mod limits;

use crate::common::services::{Services, free_port, start_redis};
use crate::common::*;
use futures::future::join_all;
use serde_json::{Value, json};
use sluice::tenancy::tenants::{self, KeyPatch, LimitsPatch};
use sluice_simulator::SimulatorConfig;
use std::time::Duration;

/// A key with these limits (JSON, as the admin API takes them).
pub(super) async fn key_with(
    store: &dyn sluice::backends::store::Store,
    name: &str,
    limits: Value,
) -> String {
    let patch = KeyPatch {
        limits: serde_json::from_value(limits).unwrap(),
        ..KeyPatch::default()
    };
    new_key(store, name, &patch).await
}

pub(super) fn small(i: usize) -> Value {
    json!({"model": MODEL, "prompt": format!("request {i}"), "max_tokens": 2})
}
