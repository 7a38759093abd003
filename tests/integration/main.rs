//! The integration suite, in one binary (each test binary links wasmtime,
//! librdkafka and sqlx; one link instead of ten). Every module is one area a
//! user would notice: the edge under hostile clients, embedded mode, the
//! production mode on PostgreSQL, Redis and Kafka, the fleet, tenants and
//! limits, plugins, the official OpenAI SDK, vLLM's routes beside generation,
//! OpenAI's Batch API, a browser. The tracing suites
//! install a global tracer and stay binaries of their own.

// A test's unwrap is its assertion: a failure fails the test with the value.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod audio;
mod batch;
mod browser;
mod chat;
mod console;
mod demo;
mod edge;
mod embedded;
mod fleet;
mod lanes;
mod layering;
mod messages;
mod observability;
mod openai_sdk;
mod plugins;
mod production;
mod responses;
mod resume;
mod routes;
mod tenants;
