//! sluice: an LLM inference gateway in front of vLLM.
//!
//! Requests flow through one module per stage:
//! [`http`] → [`auth`] → [`policy`] hooks → [`cache`] → [`queue`] → [`worker`]
//! → [`upstream`], and back through the [`pipeline`] to the client.
//! [`run`] starts everything from a [`Config`]; the binary and the tests share it.

pub mod app;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod filter_chain;
pub mod fleet;
pub mod http;
pub mod inference_log;
pub mod limits;
pub mod log_format;
pub mod metrics;
pub mod models;
pub mod outage;
pub mod pipeline;
pub mod plugins;
pub mod policy;
pub mod protocol;
pub mod queue;
pub mod redis_client;
pub mod simulator;
pub mod sse;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tenants;
pub mod upstream;
pub mod worker;

pub use app::{Gateway, run};
pub use config::Config;
