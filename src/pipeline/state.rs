//! What every request handler shares: the stages a request goes through,
//! built once by [`crate::app`]. It sits below the pipeline and the HTTP
//! layer, which both read it, so neither depends on the wiring above them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::backends::cache::Cache;
use crate::backends::queue::Queue;
use crate::backends::store::Store;
use crate::backends::store::inference_log::InferenceLogger;
use crate::config::Config;
use crate::observe::metrics::Metrics;
use crate::pipeline::policy::Policy;
use crate::tenancy::auth::Authenticator;

/// What every request handler shares.
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub store: Arc<dyn Store>,
    pub cache: Option<Arc<dyn Cache>>,
    pub queue: Arc<dyn Queue>,
    pub policy: Arc<dyn Policy>,
    pub metrics: Arc<Metrics>,
    pub inference_log: InferenceLogger,
    pub models: crate::pipeline::models::ModelCatalog,
    pub limiter: Arc<crate::tenancy::limits::Limiter>,
    /// The in-process worker's endpoints (`/ready` reports each model's).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Open WebSockets per API key.
    pub ws_sockets: Arc<SocketCounts>,
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
