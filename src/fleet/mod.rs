//! The fleet: the vLLM endpoints of each model with their health and load
//! ([`endpoints`]), the client that streams from them ([`upstream`]), and the
//! [`worker`] that takes jobs from the queue and relays every chunk.

pub mod endpoints;
pub mod upstream;
pub mod worker;

pub use endpoints::{Fleet, InFlight};
