//! `SLUICE_<SECTION>__<KEY>` environment variables as figment providers, and
//! where each key's value came from (the file or a variable), for errors.

use std::path::PathBuf;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use super::ENV_PREFIX;

/// One `SLUICE_<SECTION>__<KEY>` variable as a figment provider: its value
/// stays a string (figment's own `Env` would read `12345` as a number), and
/// errors name the variable.
pub(super) struct EnvOverride {
    var: String,
    path: Vec<String>,
    value: String,
}

impl EnvOverride {
    pub(super) fn parse(var: String, value: String) -> Option<Self> {
        // Every key lives in a section, so an override always has a `__`;
        // other SLUICE_* variables (SLUICE_CONFIG, tooling's own) are not config keys.
        let rest = var.strip_prefix(ENV_PREFIX).filter(|r| r.contains("__"))?;
        let mut path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        // librdkafka settings use dots (`fetch.wait.max.ms`), which variable names cannot.
        if let [queue, client, setting] = path.as_mut_slice()
            && queue == "queue"
            && (client == "producer" || client == "consumer")
        {
            *setting = setting.replace('_', ".");
        }
        Some(Self { var, path, value })
    }
}

impl Provider for EnvOverride {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").source(Source::Custom(self.var.clone()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut value = Value::from(self.value.clone());
        for segment in self.path.iter().rev() {
            value = Value::from(Dict::from([(segment.clone(), value)]));
        }
        let dict = value.into_dict().unwrap_or_default();
        Ok(Profile::Default.collect(dict))
    }
}

/// Where each key's value came from, for error messages.
pub struct Origins {
    pub(super) figment: Figment,
    pub(super) file: Option<PathBuf>,
}

impl Origins {
    /// ` (in FILE)` or ` (from $VAR)`, or nothing for a default.
    pub(super) fn describe(&self, key: &str) -> String {
        // figment's paths are dotted and find no list items: the value of
        // `models[1].name` is found as `models`' (the list came from one place).
        if !key.contains('[') {
            return describe(self.figment.find_metadata(key));
        }
        let mut path = key.replace('[', ".").replace(']', "");
        loop {
            if let Some(metadata) = self.figment.find_metadata(&path) {
                return describe(Some(metadata));
            }
            match path.rsplit_once('.') {
                Some((parent, _)) => path = parent.to_string(),
                None => return String::new(),
            }
        }
    }
}

pub(super) fn describe(metadata: Option<&Metadata>) -> String {
    match metadata.and_then(|m| m.source.as_ref()) {
        Some(Source::Custom(var)) => format!(" (from ${var})"),
        Some(Source::File(path)) => format!(" (in {})", path.display()),
        _ => String::new(),
    }
}
