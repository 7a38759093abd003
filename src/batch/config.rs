//! `[batch]`: OpenAI's Files and Batch APIs: what a file and an owner may
//! hold, how long files are kept, and how a gateway runs batch lines.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{Invalid, positive_millis, positive_secs};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Whether `/v1/files` and `/v1/batches` are served and batches run.
    pub enabled: bool,
    /// The largest file one upload may be.
    pub max_file_bytes: NonZeroU64,
    /// What one key's files (or one team's) may hold together.
    pub max_owner_bytes: NonZeroU64,
    /// The most lines one batch may have (OpenAI's limit: 50,000).
    pub max_requests: NonZeroU32,
    /// How long a file is kept after it is written; then it is deleted.
    #[serde(rename = "file_retention_secs", deserialize_with = "positive_secs")]
    pub file_retention: Duration,
    /// The longest `completion_window` a batch may ask for.
    #[serde(
        rename = "max_completion_window_secs",
        deserialize_with = "positive_secs"
    )]
    pub max_completion_window: Duration,
    /// Lines this gateway runs at once (all batches together); the worker
    /// starts them only where interactive traffic leaves room.
    pub concurrency: NonZeroUsize,
    /// How long a claimed line stays with its gateway without being
    /// renewed: after a gateway dies, its lines run elsewhere after this.
    #[serde(rename = "lease_ms", deserialize_with = "positive_millis")]
    pub lease: Duration,
    /// How often a gateway looks for new batches and lines.
    #[serde(rename = "poll_ms", deserialize_with = "positive_millis")]
    pub poll: Duration,
    /// Runs of a line that failed for the gateway's own reasons (no
    /// capacity, a worker or replica lost) before its failure is written.
    pub max_attempts: NonZeroU32,
    /// The size of the parts a file is stored in.
    pub file_part_bytes: NonZeroUsize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_file_bytes: const { NonZeroU64::new(200 << 20).expect("not zero") },
            max_owner_bytes: const { NonZeroU64::new(10 << 30).expect("not zero") },
            max_requests: const { NonZeroU32::new(50_000).expect("not zero") },
            file_retention: Duration::from_secs(30 * 24 * 3600),
            max_completion_window: Duration::from_secs(7 * 24 * 3600),
            concurrency: const { NonZeroUsize::new(256).expect("not zero") },
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(250),
            max_attempts: const { NonZeroU32::new(3).expect("not zero") },
            file_part_bytes: const { NonZeroUsize::new(1 << 20).expect("not zero") },
        }
    }
}

impl BatchConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.max_file_bytes > self.max_owner_bytes {
            return Err(Invalid::new(
                "batch.max_file_bytes",
                format!(
                    "{} is more than batch.max_owner_bytes ({})",
                    self.max_file_bytes, self.max_owner_bytes
                ),
            ));
        }
        if self.lease < self.poll * 2 {
            return Err(Invalid::new(
                "batch.lease_ms",
                format!(
                    "{:?} is less than twice batch.poll_ms ({:?}): leases would run out between renewals",
                    self.lease, self.poll
                ),
            ));
        }
        Ok(())
    }
}

/// A `completion_window` (`24h`, `90m`, `30s`, `2d`) as a duration.
pub fn parse_window(window: &str) -> Option<Duration> {
    let unit = window.chars().last()?;
    let count: u64 = window[..window.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        's' => count,
        'm' => count.checked_mul(60)?,
        'h' => count.checked_mul(3600)?,
        'd' => count.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_counts_of_a_unit() {
        assert_eq!(parse_window("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_window("90m"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse_window("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_window("1d"), Some(Duration::from_secs(86_400)));
        for bad in ["", "h", "0h", "24", "24x", "-1h", "1.5h", "24hh"] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
    }
}
