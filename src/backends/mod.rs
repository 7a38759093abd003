//! The backends behind traits, each with an embedded and a production
//! implementation chosen by URL: the [`store`] (API keys, teams, inference
//! logs: SQLite or PostgreSQL), the [`cache`] (in process or Redis), the
//! [`queue`] (in-process channels or Kafka), the [`affinity`] of stored
//! responses to their replicas (in process or Redis), and the shared
//! [`redis`] client.

pub mod affinity;
pub mod cache;
pub mod queue;
pub mod redis;
pub mod replay;
pub mod store;
