//! `sluice keys` and `sluice teams`: the same operations as the admin API
//! (`sluice::tenancy::tenants`), printed for a terminal.

use clap::Subcommand;
use sluice::config::Config;
use sluice::tenancy::audit::Actor;

/// Limits given on the command line; a flag left out keeps the current
/// value, `none` removes it (the configured default applies). A limit is at
/// least 1, as in the admin API and `gateway.toml`.
#[derive(clap::Args, Default)]
pub(super) struct LimitFlags {
    /// Requests per minute, or `none`.
    #[arg(long, value_name = "N|none", value_parser = limit)]
    requests_per_minute: Option<Limit>,
    /// Prompt plus completion tokens per minute, or `none`.
    #[arg(long, value_name = "N|none", value_parser = limit)]
    tokens_per_minute: Option<Limit>,
    /// Requests running at once, or `none`.
    #[arg(long, value_name = "N|none", value_parser = limit)]
    max_concurrent: Option<Limit>,
    /// The models it may use, comma-separated ("" : any).
    #[arg(long)]
    models: Option<String>,
    /// Its class when a model's endpoints are full: high, normal, low, or `none`.
    #[arg(long, value_name = "high|normal|low|none", value_parser = priority)]
    priority: Option<PriorityFlag>,
}

#[derive(Clone, Copy)]
struct PriorityFlag(Option<sluice::backends::queue::Priority>);

fn priority(value: &str) -> Result<PriorityFlag, String> {
    match value {
        "none" => Ok(PriorityFlag(None)),
        name => sluice::backends::queue::Priority::parse(name)
            .map(|p| PriorityFlag(Some(p)))
            .ok_or_else(|| format!("`{name}` is not high, normal, low or `none`")),
    }
}

/// A limit as given: a number, or `none` (no limit of its own).
#[derive(Clone, Copy)]
struct Limit(Option<u64>);

/// Reads `none` or a number; whether it is a valid limit is the tenancy's
/// check, shared with the admin API.
fn limit(value: &str) -> Result<Limit, String> {
    match value {
        "none" => Ok(Limit(None)),
        number => number
            .parse()
            .map(|n| Limit(Some(n)))
            .map_err(|_| format!("`{number}` is not a number or `none`")),
    }
}

impl LimitFlags {
    fn patch(&self) -> sluice::tenancy::tenants::LimitsPatch {
        sluice::tenancy::tenants::LimitsPatch {
            requests_per_minute: self.requests_per_minute.map(|l| l.0),
            tokens_per_minute: self.tokens_per_minute.map(|l| l.0),
            max_concurrent: self.max_concurrent.map(|l| l.0),
            models: self.models.as_ref().map(|list| {
                let models: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect();
                (!models.is_empty()).then_some(models)
            }),
            priority: self.priority.map(|p| p.0),
        }
    }
}

#[derive(Subcommand)]
pub(super) enum KeysCommand {
    /// Create a key and print its secret once.
    Create {
        #[arg(long)]
        name: String,
        /// The team (id or name) whose limits it also counts against.
        #[arg(long)]
        team: Option<String>,
        /// When it stops working (RFC 3339, e.g. 2026-12-31T00:00:00Z).
        #[arg(long)]
        expires: Option<chrono::DateTime<chrono::Utc>>,
        /// Read the key's secret from standard input (one line) instead of
        /// making one: a key brought from another gateway or a GitOps repository.
        #[arg(long)]
        secret_stdin: bool,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Change a key's limits, team or expiry; takes effect within a second.
    Limit {
        id_or_name: String,
        /// Move it to this team (id or name; "" : no team).
        #[arg(long)]
        team: Option<String>,
        /// New expiry (RFC 3339).
        #[arg(long)]
        expires: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id or name; takes effect within a second.
    Revoke { id_or_name: String },
    /// Requests per key by outcome (served 2xx, refused 4xx, closed by the
    /// client 499, failed 5xx), cache hits and tokens, from the inference log.
    Usage {
        /// Only count requests since this RFC 3339 time (e.g. 2026-01-31T00:00:00Z).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Subcommand)]
pub(super) enum TeamsCommand {
    /// Create a team.
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Change a team's limits.
    Limit {
        id_or_name: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// List teams and their limits.
    List,
}

pub(super) async fn keys(command: KeysCommand, config: &Config) -> anyhow::Result<()> {
    let store = sluice::backends::store::open(&config.store).await?;
    match command {
        KeysCommand::Create {
            name,
            team,
            expires,
            secret_stdin,
            limits,
        } => {
            let patch = sluice::tenancy::tenants::KeyPatch {
                limits: limits.patch(),
                team: Some(team),
                expires_at: Some(expires),
            };
            let brought = match secret_stdin {
                true => Some(read_secret()?),
                false => None,
            };
            let key = sluice::tenancy::tenants::create_key(
                store.as_ref(),
                &Actor::cli(),
                &name,
                &patch,
                brought.as_deref(),
            )
            .await?;
            println!("created key {} ({})", key.id, key.name);
            if brought.is_none() {
                println!("secret (shown once, store it now): {}", key.secret);
            }
        }
        KeysCommand::Limit {
            id_or_name,
            team,
            expires,
            limits,
        } => {
            let patch = sluice::tenancy::tenants::KeyPatch {
                limits: limits.patch(),
                team: team.map(|t| (!t.is_empty()).then_some(t)),
                expires_at: expires.map(Some),
            };
            let key = sluice::tenancy::tenants::update_key(
                store.as_ref(),
                &Actor::cli(),
                &id_or_name,
                &patch,
            )
            .await?;
            println!("key {} ({}): {}", key.id, key.name, key.limits);
        }
        KeysCommand::List => {
            println!(
                "{:<18} {:<24} {:<21} {:<21} {:<18} limits",
                "id", "name", "created", "revoked", "team"
            );
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_else(|| "-".into())
            };
            for key in store.list_keys().await? {
                let mut limits = key.limits.to_string();
                if let Some(at) = key.expires_at {
                    limits.push_str(&format!(", expires {}", time(Some(at))));
                }
                println!(
                    "{:<18} {:<24} {:<21} {:<21} {:<18} {limits}",
                    key.id,
                    key.name,
                    time(Some(key.created_at)),
                    time(key.revoked_at),
                    key.team_id.as_deref().unwrap_or("-"),
                );
            }
        }
        KeysCommand::Revoke { id_or_name } => {
            let active = store
                .find_key(&id_or_name)
                .await?
                .filter(|k| k.revoked_at.is_none());
            if active.is_none() {
                anyhow::bail!("no active key with id or name `{id_or_name}`");
            }
            let key =
                sluice::tenancy::tenants::revoke_key(store.as_ref(), &Actor::cli(), &id_or_name)
                    .await?;
            println!(
                "revoked key {} ({}); it stops working within a second",
                key.id, key.name
            );
        }
        KeysCommand::Usage { since } => {
            println!(
                "{:<18} {:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>14} {:>18}",
                "key id",
                "name",
                "requests",
                "served",
                "refused",
                "closed",
                "failed",
                "cache hits",
                "prompt tokens",
                "completion tokens"
            );
            for usage in store.key_usage(since).await? {
                println!(
                    "{:<18} {:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>14} {:>18}",
                    usage.key_id,
                    usage.name.as_deref().unwrap_or("-"),
                    usage.requests,
                    usage.served,
                    usage.refused,
                    usage.client_closed,
                    usage.failed,
                    usage.cache_hits,
                    usage.prompt_tokens,
                    usage.completion_tokens
                );
            }
        }
    }
    Ok(())
}

pub(super) async fn teams(command: TeamsCommand, config: &Config) -> anyhow::Result<()> {
    let store = sluice::backends::store::open(&config.store).await?;
    match command {
        TeamsCommand::Create { name, limits } => {
            let team = sluice::tenancy::tenants::create_team(
                store.as_ref(),
                &Actor::cli(),
                &name,
                &limits.patch(),
            )
            .await?;
            println!("created team {} ({}): {}", team.id, team.name, team.limits);
        }
        TeamsCommand::Limit { id_or_name, limits } => {
            let team = sluice::tenancy::tenants::update_team(
                store.as_ref(),
                &Actor::cli(),
                &id_or_name,
                &limits.patch(),
            )
            .await?;
            println!("team {} ({}): {}", team.id, team.name, team.limits);
        }
        TeamsCommand::List => {
            println!("{:<18} {:<24} limits", "id", "name");
            for team in store.list_teams().await? {
                println!("{:<18} {:<24} {}", team.id, team.name, team.limits);
            }
        }
    }
    Ok(())
}

/// Limits in one line: `60 requests/min, 10000 tokens/min, 4 at once, models a, b`.
/// `sluice audit`: the audit log, newest first.
pub(super) async fn audit(
    target: Option<String>,
    limit: i64,
    config: &Config,
) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&limit) {
        anyhow::bail!("--limit must be 1 to 10000");
    }
    let store = sluice::backends::store::open(&config.store).await?;
    let query = sluice::backends::store::audit::AuditQuery {
        before_id: None,
        target,
        limit,
    };
    println!(
        "{:<20} {:<32} {:<12} {:<18} changes",
        "when (UTC)", "who", "what", "which"
    );
    for entry in store.audit_entries(&query).await? {
        println!(
            "{:<20} {:<32} {:<12} {:<18} {}",
            entry.at.format("%Y-%m-%d %H:%M:%S"),
            entry.actor,
            entry.action,
            entry.target,
            entry.changes().join("; ")
        );
    }
    Ok(())
}

/// One line of standard input, without its line ending.
fn read_secret() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
