//! Tenancy: who may call and how much. API keys ([`keys`]) and teams
//! ([`tenants`], the operations the CLI, the admin API and the console
//! share, each recorded in the [`audit`] log), verifying a presented key
//! ([`auth`]), and the per-key and per-team [`limits`].

pub mod audit;
pub mod auth;
pub mod keys;
pub mod limits;
mod metrics;
pub mod tenants;

pub use crate::backends::store::Limits;
pub use metrics::TenancyMetrics;

/// Who is making a request, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub key_name: String,
    /// The key's limits, the configured defaults filling in what it does not set.
    pub limits: Limits,
    pub team: Option<TeamIdentity>,
}

/// The team a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamIdentity {
    pub id: String,
    pub name: String,
    pub limits: Limits,
}

impl Identity {
    /// A key without limits (tools and tests).
    pub fn unlimited(key_id: &str, key_name: &str) -> Self {
        Self {
            key_id: key_id.to_string(),
            key_name: key_name.to_string(),
            limits: Limits::default(),
            team: None,
        }
    }

    /// Its tenant, `team:<id>` or `key:<id>`: whose share of a full pool its
    /// requests take, and who owns its files and batches (every key of a
    /// team sees them).
    pub fn tenant(&self) -> String {
        match &self.team {
            Some(team) => format!("team:{}", team.id),
            None => format!("key:{}", self.key_id),
        }
    }

    /// Its priority class: the key's own (or the configured default's),
    /// else its team's, else normal.
    pub fn priority(&self) -> crate::backends::queue::Priority {
        self.limits
            .priority
            .or_else(|| self.team.as_ref().and_then(|t| t.limits.priority))
            .unwrap_or_default()
    }

    /// Whether the key (and its team) may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.limits.allows_model(model)
            && self
                .team
                .as_ref()
                .is_none_or(|t| t.limits.allows_model(model))
    }
}
