//! The vocabulary every config section is written in: durations in
//! milliseconds or seconds, non-empty strings and secrets, http(s) URL lists,
//! backend URLs (their scheme, and redacted for logs), and [`Invalid`], what
//! a section's validation returns. Sections live next to the code they
//! configure; the root `config` module loads them and names where a bad value
//! came from.

use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};
use url::Url;

/// A config value that makes no sense: its key (`queue.max_outbox_bytes`)
/// and why. The loader adds where the value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A number of milliseconds.
pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// A number of seconds.
pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

/// A number of milliseconds greater than 0.
pub fn positive_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be greater than 0")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// A number of seconds greater than 0.
pub fn positive_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be greater than 0")),
        s => Ok(Duration::from_secs(s)),
    }
}

/// An empty string is the same as leaving the key out.
pub fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.trim().is_empty()))
}

/// A secret; empty is the same as leaving the key out.
pub fn non_empty_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(non_empty(d)?.map(SecretString::from))
}

/// A list of http(s) URLs, or one string of comma-separated URLs (as an
/// environment variable gives it).
pub fn urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Url>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    };
    list.iter()
        .map(|u| {
            let url = Url::parse(u).map_err(|e| serde::de::Error::custom(format!("`{u}`: {e}")))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(serde::de::Error::custom(format!(
                    "`{u}` must be http:// or https://"
                )));
            }
            Ok(url)
        })
        .collect()
}

/// The scheme of a backend URL (`redis` of `redis://h:6379`).
pub fn scheme(url: &str) -> Option<&str> {
    url.split_once("://").map(|(scheme, _)| scheme)
}

/// `url` when it names Redis (`redis://` or `rediss://`).
pub fn redis_url(url: &str) -> Option<&str> {
    matches!(scheme(url), Some("redis" | "rediss")).then_some(url)
}

/// Checks that `key`'s `url`, if set, is `memory://` or a Redis URL.
pub fn memory_or_redis(key: &str, url: Option<&SecretString>) -> Result<(), Invalid> {
    use secrecy::ExposeSecret;
    match url.map(|url| url.expose_secret()) {
        None => Ok(()),
        Some(url) if scheme(url) == Some("memory") || redis_url(url).is_some() => Ok(()),
        Some(url) => Err(Invalid::new(
            key,
            format!(
                "`{}` must be memory:// or redis://HOST:PORT",
                redact_url(url)
            ),
        )),
    }
}

/// Whether `url` is set to `memory://` (the in-process implementation).
pub fn names_memory(url: Option<&SecretString>) -> bool {
    use secrecy::ExposeSecret;
    url.is_some_and(|url| scheme(url.expose_secret()) == Some("memory"))
}

/// A URL with any password replaced by `***`, safe for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }
}
