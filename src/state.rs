//! What every request handler shares: the stages a request goes through,
//! built once by [`crate::app`]. It sits below the pipeline and the HTTP
//! layer, which both read it, so neither depends on the wiring above them.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::config::Config;
use crate::inference_log::InferenceLogger;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::queue::Queue;
use crate::store::Store;

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
}
