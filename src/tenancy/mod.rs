//! Tenancy: who may call and how much. API keys and teams ([`tenants`],
//! shared by the CLI and the admin API), verifying a presented key
//! ([`auth`]), and the per-key and per-team [`limits`].

pub mod auth;
pub mod limits;
pub mod tenants;
