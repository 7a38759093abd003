//! sluice: an LLM inference gateway in front of vLLM.
//!
//! A request comes in at the [`edge`], goes through the [`pipeline`]'s
//! stages (the key's [`tenancy`]: auth and limits; policy hooks, which the
//! [`plugins`] implement; the cache), then through the queue in
//! [`backends`] to a [`fleet`] worker, which streams it from vLLM; its chunks
//! come back the same way. [`protocol`] holds the wire formats, [`observe`]
//! the metrics, traces and logs. [`batch`] runs OpenAI's Batch API on the
//! same pipeline, in the queue's batch lane. [`app`] builds all of it from a [`Config`].
//!
//! Modules are layered: each may use only those below it. The order is
//! declared once, in `docs/design.md` ("Layers"), and a test
//! (`tests/integration/layering.rs`) holds the code to it.

pub mod app;
pub mod backends;
pub mod batch;
pub mod config;
pub mod console;
pub mod edge;
pub mod error;
pub mod fleet;
pub mod observe;
pub mod pipeline;
pub mod plugins;
pub mod protocol;
pub mod settings;
pub mod tenancy;

pub use app::{Gateway, run};
pub use config::Config;
