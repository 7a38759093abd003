//! What the edge's handlers share: the pipeline's stages, the edge's own
//! settings, and the count of open WebSockets per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::config::{CorsConfig, ServerConfig};
use crate::pipeline::state::Stages;

/// The edge: what every handler is given.
pub struct Edge {
    pub stages: Arc<Stages>,
    pub server: ServerConfig,
    pub cors: CorsConfig,
    /// How often an open WebSocket checks its key again (`auth.cache_ttl_ms`,
    /// at least 50 ms): a revoked key's socket closes within that.
    pub auth_recheck: Duration,
    /// Open WebSockets per API key.
    pub ws_sockets: Arc<SocketCounts>,
    /// The Files and Batch APIs (`None`: `batch.enabled` is false).
    pub batches: Option<Arc<crate::batch::Batches>>,
}

impl Edge {
    pub fn new(
        stages: Arc<Stages>,
        server: ServerConfig,
        cors: CorsConfig,
        auth_cache_ttl: Duration,
    ) -> Self {
        Self {
            stages,
            server,
            cors,
            auth_recheck: auth_cache_ttl.max(Duration::from_millis(50)),
            ws_sockets: Default::default(),
            batches: None,
        }
    }
}

/// Open WebSockets per API key, for `server.ws_max_sockets_per_key`.
#[derive(Debug, Default)]
pub struct SocketCounts(Mutex<HashMap<String, usize>>);

impl SocketCounts {
    /// A place for one more socket of `key_id`; `None` when it has `max` open.
    pub fn acquire(self: &Arc<Self>, key_id: &str, max: usize) -> Option<SocketPlace> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key_id.to_string()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(SocketPlace {
            counts: self.clone(),
            key_id: key_id.to_string(),
        })
    }
}

/// One open socket's place, given back when dropped.
#[derive(Debug)]
pub struct SocketPlace {
    counts: Arc<SocketCounts>,
    key_id: String,
}

impl Drop for SocketPlace {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key_id);
            }
        }
    }
}
