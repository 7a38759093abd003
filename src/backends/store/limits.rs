//! The limits a key or a team carries, as the store keeps them (a JSON
//! column); the limiter in `tenancy::limits` counts requests against them.

use serde::{Deserialize, Serialize};

/// The limits of one key or team; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    /// The models the key may use (`None`: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Its class when a model's endpoints are full (`None`: normal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<crate::backends::queue::Priority>,
}

/// Limits in one line, as the command line and the console show them:
/// `60 requests/min, models a, b`, or `defaults` when none is set.
impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.requests_per_minute {
            parts.push(format!("{n} requests/min"));
        }
        if let Some(n) = self.tokens_per_minute {
            parts.push(format!("{n} tokens/min"));
        }
        if let Some(n) = self.max_concurrent {
            parts.push(format!("{n} at once"));
        }
        if let Some(models) = &self.models {
            parts.push(format!("models {}", models.join(", ")));
        }
        if let Some(priority) = self.priority {
            parts.push(format!("priority {}", priority.name()));
        }
        match parts.is_empty() {
            true => f.write_str("defaults"),
            false => f.write_str(&parts.join(", ")),
        }
    }
}

impl Limits {
    /// Refuses limits that make no sense, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("max_concurrent", self.max_concurrent),
        ] {
            if value == Some(0) {
                return Err(format!(
                    "{name} must be at least 1; to set no limit of its own, remove it (null in the admin API, `none` on the command line, left out of gateway.toml)"
                ));
            }
        }
        if let Some(models) = &self.models
            && models.iter().any(|m| m.trim().is_empty())
        {
            return Err("models must not contain an empty name".into());
        }
        Ok(())
    }

    /// These limits with `defaults` filling in what is not set.
    pub fn or(&self, defaults: &Limits) -> Limits {
        Limits {
            requests_per_minute: self.requests_per_minute.or(defaults.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(defaults.tokens_per_minute),
            max_concurrent: self.max_concurrent.or(defaults.max_concurrent),
            models: self.models.clone().or_else(|| defaults.models.clone()),
            priority: self.priority.or(defaults.priority),
        }
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }

    /// Whether any rate or concurrency limit is set (the model list aside).
    pub fn counts(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || self.max_concurrent.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_validate_and_merge() {
        let zero = Limits {
            requests_per_minute: Some(0),
            ..Limits::default()
        };
        assert!(zero.validate().unwrap_err().contains("requests_per_minute"));
        let own = Limits {
            tokens_per_minute: Some(1000),
            ..Limits::default()
        };
        let defaults = Limits {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(10),
            models: Some(vec!["a".into()]),
            ..Limits::default()
        };
        let merged = own.or(&defaults);
        assert_eq!(merged.tokens_per_minute, Some(1000));
        assert_eq!(merged.requests_per_minute, Some(60));
        assert!(merged.allows_model("a") && !merged.allows_model("b"));
    }
}
