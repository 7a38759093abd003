//! The Redis client the cache and the limiter each use: connected in the
//! background, reconnecting by itself, TCP_NODELAY, and one attempt per
//! command within a timeout (callers decide what a failure means).

use std::time::Duration;

use fred::prelude::*;
use fred::types::config::Options;

/// A client for `url` that is already connecting (given half a second to
/// finish, so the first requests can use it). Never fails: an invalid URL
/// or an unreachable Redis shows as failing commands. `user` names the
/// component in log lines.
pub async fn connect(url: &str, timeout: Duration, user: &'static str) -> Client {
    let config = Config::from_url(url).unwrap_or_else(|err| {
        let url = crate::settings::redact_url(url);
        tracing::error!(%url, %err, user, "invalid Redis URL; every command will fail");
        Config::default()
    });
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.tcp = TcpConfig {
                nodelay: Some(true),
                ..Default::default()
            };
        })
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
        .unwrap_or_else(|_| Client::default());
    client.on_error(move |(error, _server)| async move {
        tracing::debug!(%error, user, "redis connection error");
        Ok(())
    });
    let _connection = client.connect();
    let _ = tokio::time::timeout(Duration::from_millis(500), client.wait_for_connect()).await;
    client
}

/// Per-command options: one attempt, failing fast, within `timeout`.
pub fn one_attempt(timeout: Duration) -> Options {
    Options {
        fail_fast: true,
        max_attempts: Some(1),
        timeout: Some(timeout),
        ..Default::default()
    }
}
