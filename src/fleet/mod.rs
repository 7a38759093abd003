//! The fleet: the vLLM endpoints of each model with their health and load
//! ([`endpoints`]), the client that streams from them ([`upstream`]), and the
//! [`worker`] that takes jobs from the queue and relays every chunk.

mod admission;
mod config;
mod continuation;
pub mod endpoints;
mod metrics;
pub mod upstream;
pub mod worker;

pub use config::{Balance, ModelConfig, UpstreamConfig, WorkerConfig};
pub use endpoints::{Fleet, InFlight};
pub use metrics::FleetMetrics;
