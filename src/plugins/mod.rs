//! The WebAssembly plugin host: loads the `[[plugins]]` of `gateway.toml`,
//! runs them at the pipeline's three hook points (as the [`Policy`]), and
//! hot-reloads them when their files or the config change.
//!
//! `on-request` and `cache-key` run on initialised instances taken from a
//! small per-plugin pool (an instance serves one call at a time and may serve
//! many requests in turn); `on-token` gets an instance of its own per stream
//! and choice, returned to a pool once `on-end` has flushed it.
//! Every call has a CPU deadline and every instance a memory cap. A plugin
//! that traps, times out or returns something invalid is handled by its
//! `on_error` policy, and its instance is thrown away, never reused.

mod bindings;
mod config;
mod metrics;
mod reload;
mod request_hooks;
mod runtime;
mod status;
mod token_filter;
mod watch;

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use crate::error::GatewayError;
use crate::pipeline::policy::{Policy, RequestContext, TokenFilter};
use crate::protocol::InferenceRequest;
use request_hooks::{hooked, request_kind, wit_context, wit_request};
use runtime::{LoadedPlugin, PluginFailure};
use token_filter::WasmTokenFilter;

pub use config::{
    HostSetup, MAX_PLUGIN_MEMORY, OnError, PluginConfig, PluginHostConfig, PluginSection,
    PluginSource, PluginsLoader, chain,
};
pub use metrics::PluginFamilies;
pub use reload::check;
pub use runtime::{Hooks, RequestKind};
pub use status::{HookStatus, HostStatus, PluginStatus, ReloadReport};

use metrics::{HookMetrics, PluginMetrics};

/// Largest text a plugin may return for one chunk, and largest custom cache key.
const MAX_PLUGIN_TEXT: usize = 64 * 1024;

/// The plugins in chain order, as loaded at one moment.
pub(crate) struct Chain {
    pub plugins: Vec<Arc<LoadedPlugin>>,
    pub version: u64,
}

pub struct PluginHost {
    /// The wasmtime runtime is created with the first plugin: a gateway
    /// without plugins reserves no instance pool and runs no epoch ticker.
    runtime_config: PluginHostConfig,
    chain: ArcSwap<Chain>,
    metrics: Arc<PluginFamilies>,
    source: Option<PluginSource>,
    max_body_bytes: usize,
    /// Held while reloading; holds the versions that failed to load (config
    /// and file digest by plugin name), so a broken file is reported once,
    /// not again on every later reload while it is still in place.
    reloading: tokio::sync::Mutex<std::collections::HashMap<String, FailedVersion>>,
    /// How the last load or reload went, for [`PluginHost::status`].
    last_reload: std::sync::Mutex<Option<ReloadReport>>,
}

/// A plugin version that failed to load: its config and the digest of its file.
type FailedVersion = (PluginConfig, [u8; 32]);

pub(super) fn checked_text(text: String) -> Result<String, PluginFailure> {
    if text.len() > MAX_PLUGIN_TEXT {
        return Err(PluginFailure::Invalid(format!(
            "returned {} bytes of text; the limit is {MAX_PLUGIN_TEXT}",
            text.len()
        )));
    }
    Ok(text)
}

#[async_trait]
impl Policy for PluginHost {
    /// Both request hooks from one chain version, converting the request for
    /// plugins once rather than once per hook.
    async fn admit(
        &self,
        ctx: &RequestContext,
        request: &mut InferenceRequest,
        cached: bool,
    ) -> Result<Option<String>, GatewayError> {
        let chain = self.chain();
        let rewriters = hooked(&chain, ctx, |e| e.request.is_some());
        let keyers = match cached {
            true => hooked(&chain, ctx, |e| e.cache_key.is_some()),
            false => Vec::new(),
        };
        if rewriters.is_empty() && keyers.is_empty() {
            return Ok(cached.then(|| request.default_cache_key()));
        }
        let Some(mut wit_req) = wit_request(request) else {
            let hooks = rewriters.iter().map(|p| (p, "on-request"));
            for (plugin, hook) in hooks.chain(keyers.iter().map(|p| (p, "cache-key"))) {
                Self::cannot_read_route(plugin, hook, ctx.route, &ctx.request_id)?;
            }
            return Ok(cached.then(|| request.default_cache_key()));
        };
        let wit_ctx = wit_context(ctx);
        let kind = request_kind(request);
        self.rewrite(&rewriters, ctx, &wit_ctx, request, &mut wit_req)
            .await?;
        if !cached {
            return Ok(None);
        }
        let default_key = request.default_cache_key();
        self.choose_key(&keyers, ctx, &wit_ctx, (&wit_req, kind), default_key)
            .await
    }

    fn token_filters(&self, ctx: &RequestContext) -> Vec<Box<dyn TokenFilter>> {
        let chain = self.chain();
        chain
            .plugins
            .iter()
            .filter(|p| {
                use crate::protocol::Route;
                // The routes whose answers carry tool calls.
                let tools = [Route::ChatCompletions, Route::Messages, Route::Responses]
                    .iter()
                    .any(|route| ctx.route == route.path());
                (p.exports.token.is_some() || (tools && p.exports.tool_call.is_some()))
                    && p.applies_to(&ctx.identity.key_name)
            })
            .map(|plugin| {
                Box::new(WasmTokenFilter::new(
                    plugin.clone(),
                    self.metrics.clone(),
                    ctx,
                )) as Box<dyn TokenFilter>
            })
            .collect()
    }
}

/// A hook the chain selected the plugin for is missing from its instance
/// (cannot happen: the exports are checked at load).
pub(super) fn no_hook() -> PluginFailure {
    PluginFailure::Invalid("the instance lacks the hook".into())
}
