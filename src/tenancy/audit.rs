//! Who changed what: the actor of a change to keys and teams (a console
//! session, the admin token, the command line) and the audit entry each
//! change in [`super::tenants`] writes, with the record before and after.

use std::fmt;

use serde::Serialize;

use crate::backends::store::Store;
use crate::backends::store::audit::NewAuditEntry;

use super::tenants::TenantError;

/// Who makes a change, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A console session, by the first characters of its id's hash (never the id).
    Console { session: String },
    /// A request to the admin API with the admin token.
    AdminApi,
    /// `sluice keys` and `sluice teams`, run by this OS user.
    Cli { user: String },
}

impl Actor {
    /// The command line's actor: the OS user running it.
    pub fn cli() -> Self {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into());
        Self::Cli { user }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Console { session } => write!(f, "console session {session}"),
            Actor::AdminApi => f.write_str("admin API token"),
            Actor::Cli { user } => write!(f, "command line ({user})"),
        }
    }
}

/// Records one change; `before` and `after` are the record as listed.
pub(super) async fn record<T: Serialize>(
    store: &dyn Store,
    actor: &Actor,
    action: &'static str,
    target: &str,
    before: Option<&T>,
    after: Option<&T>,
) -> Result<(), TenantError> {
    let json = |value: Option<&T>| value.and_then(|v| serde_json::to_value(v).ok());
    let entry = NewAuditEntry {
        actor: actor.to_string(),
        action,
        target: target.to_string(),
        before: json(before),
        after: json(after),
    };
    store.record_audit(&entry).await.map_err(|err| {
        tracing::error!(%err, action, target, "a change was made but could not be written to the audit log");
        TenantError::Store(err)
    })
}
