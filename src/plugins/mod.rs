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

pub mod bindings;
mod runtime;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::spans::StageSpan;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use crate::config::{Config, OnError, PluginConfig};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::policy::{Policy, RequestContext, TokenAction, TokenFilter};
use crate::protocol::{CompletionRequest, Prompt};
use bindings::{
    CacheKeyDecision, CompletionRequest as WitRequest, RequestContext as WitContext,
    RequestDecision, TokenAction as WitAction,
};

pub use runtime::{Compiled, Hooks, LoadError, LoadedPlugin, PluginFailure, Runtime};

/// Largest text a plugin may return for one chunk, and largest custom cache key.
const MAX_PLUGIN_TEXT: usize = 64 * 1024;

/// The plugins in chain order, as loaded at one moment.
pub struct Chain {
    pub plugins: Vec<Arc<LoadedPlugin>>,
    pub version: u64,
}

pub struct PluginHost {
    /// The wasmtime runtime is created with the first plugin: a gateway
    /// without plugins reserves no instance pool and runs no epoch ticker.
    runtime_config: crate::config::PluginHostConfig,
    chain: ArcSwap<Chain>,
    metrics: Arc<Metrics>,
    source: Option<PathBuf>,
    max_body_bytes: usize,
    reloading: tokio::sync::Mutex<()>,
}

impl PluginHost {
    /// Loads every configured plugin; any that fails stops startup with its reason.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let host = Arc::new(Self {
            runtime_config: config.plugin_host.clone(),
            chain: ArcSwap::from_pointee(Chain {
                plugins: Vec::new(),
                version: 0,
            }),
            metrics,
            source: config.source.clone(),
            max_body_bytes: config.server.max_body_bytes,
            reloading: tokio::sync::Mutex::new(()),
        });
        let mut plugins = Vec::new();
        for plugin in &config.plugins {
            let loaded = host
                .load(plugin.clone())
                .await
                .map_err(|err| anyhow::anyhow!("plugin `{}`: {err}", plugin.name))?;
            host.metrics
                .plugin_reloads
                .with_label_values(&[&plugin.name, "ok"])
                .inc();
            tracing::info!(plugin = %plugin.name, hooks = ?loaded.exports.hooks(), "plugin loaded");
            plugins.push(Arc::new(loaded));
        }
        host.chain.store(Arc::new(Chain {
            plugins,
            version: 1,
        }));
        if config.plugin_host.watch {
            watch::spawn(host.clone(), config);
        }
        Ok(host)
    }

    /// The chain new requests use.
    pub fn chain(&self) -> Arc<Chain> {
        self.chain.load_full()
    }

    async fn load(self: &Arc<Self>, config: PluginConfig) -> Result<LoadedPlugin, LoadError> {
        let runtime = Runtime::shared(&self.runtime_config)
            .map_err(|e| LoadError::Runtime(format!("{e:#}")))?;
        load(runtime, config).await
    }

    /// Re-reads the config and the plugin files, reloads what changed, and
    /// swaps the chain. A plugin that fails to load keeps its previous version.
    pub async fn reload(self: &Arc<Self>) {
        let _one_at_a_time = self.reloading.lock().await;
        let configs = match &self.source {
            Some(path) => match Config::load(Some(path)) {
                Ok(config) => config.plugins,
                Err(err) => {
                    tracing::error!(%err, "config changed but is invalid; plugins unchanged");
                    self.metrics
                        .plugin_reloads
                        .with_label_values(&["config", "failed"])
                        .inc();
                    return;
                }
            },
            None => self
                .chain()
                .plugins
                .iter()
                .map(|p| p.config.clone())
                .collect(),
        };
        let current = self.chain();
        let mut next = Vec::with_capacity(configs.len());
        let mut changed = current.plugins.len() != configs.len();
        for config in configs {
            let previous = current
                .plugins
                .iter()
                .find(|p| p.config.name == config.name)
                .cloned();
            let unchanged = match (&previous, std::fs::read(&config.path)) {
                (Some(p), Ok(bytes)) => {
                    p.config == config && p.digest[..] == Sha256::digest(&bytes)[..]
                }
                _ => false,
            };
            if unchanged {
                next.push(previous.expect("checked above"));
                continue;
            }
            changed = true;
            let name = config.name.clone();
            match self.load(config).await {
                Ok(loaded) => {
                    tracing::info!(plugin = %name, hooks = ?loaded.exports.hooks(), "plugin reloaded");
                    self.metrics
                        .plugin_reloads
                        .with_label_values(&[&name, "ok"])
                        .inc();
                    next.push(Arc::new(loaded));
                }
                Err(err) => {
                    self.metrics
                        .plugin_reloads
                        .with_label_values(&[&name, "failed"])
                        .inc();
                    match previous {
                        Some(previous) => {
                            tracing::error!(plugin = %name, %err, "plugin reload failed; the previous version keeps serving");
                            next.push(previous);
                        }
                        None => {
                            tracing::error!(plugin = %name, %err, "new plugin failed to load; not added")
                        }
                    }
                }
            }
        }
        if changed {
            let version = current.version + 1;
            self.chain.store(Arc::new(Chain {
                plugins: next,
                version,
            }));
            tracing::info!(version, "plugin chain swapped");
        }
    }

    fn metrics_of<'p>(&self, plugin: &'p LoadedPlugin) -> &'p PluginMetrics {
        PluginMetrics::of(plugin, &self.metrics)
    }

    /// One request-hook call on a pooled instance: check one out, arm its
    /// deadline, run `call`, and return the instance to the pool only if the
    /// call succeeded. Records the call's metrics and span.
    async fn pooled_call<T>(
        &self,
        plugin: &LoadedPlugin,
        metrics: &HookMetrics,
        span_name: &'static str,
        ctx: &RequestContext,
        call: impl AsyncFnOnce(&mut runtime::Live) -> Result<T, PluginFailure>,
    ) -> Result<T, PluginFailure> {
        let started = Instant::now();
        let mut span = StageSpan::child_of(ctx.trace.as_ref(), span_name);
        span.set_with("plugin", || plugin.name.to_string());
        let result = span
            .during(async {
                let mut live = plugin.checkout(&ctx.request_id, false).await?;
                live.arm();
                let value = call(&mut live).await?;
                plugin.checkin(live, false);
                Ok(value)
            })
            .await;
        metrics.observe(started, result.as_ref().err());
        result
    }

    /// Applies the plugin's `on_error` policy: `Ok` to skip it, `Err` to fail the request.
    fn on_failure(
        plugin: &LoadedPlugin,
        hook: &str,
        request_id: &str,
        failure: PluginFailure,
    ) -> Result<(), GatewayError> {
        tracing::warn!(plugin = %plugin.name, hook, request_id, %failure, "plugin failed");
        match plugin.config.on_error {
            OnError::FailOpen => Ok(()),
            OnError::FailClosed => Err(GatewayError::Plugin {
                plugin: plugin.name.to_string(),
                reason: format!("{hook} {failure}"),
            }),
        }
    }
}

/// Compiles (on a blocking thread) and validates a plugin.
pub async fn load(
    runtime: &'static Runtime,
    config: PluginConfig,
) -> Result<LoadedPlugin, LoadError> {
    let path = config.path.display().to_string();
    let compiled = tokio::task::spawn_blocking(move || Compiled::compile(runtime, &config))
        .await
        .map_err(|err| LoadError::Instantiate {
            path,
            reason: err.to_string(),
        })??;
    compiled.validate(runtime).await
}

/// One plugin's metrics for one hook.
pub struct HookMetrics {
    calls: prometheus::IntCounter,
    latency: prometheus::Histogram,
    traps: prometheus::IntCounter,
    timeouts: prometheus::IntCounter,
}

impl HookMetrics {
    fn new(metrics: &Metrics, plugin: &str, hook: &str) -> Self {
        let labels = [plugin, hook];
        Self {
            calls: metrics.plugin_calls.with_label_values(&labels),
            latency: metrics.plugin_call_duration.with_label_values(&labels),
            traps: metrics.plugin_traps.with_label_values(&labels),
            timeouts: metrics.plugin_timeouts.with_label_values(&labels),
        }
    }

    /// Counts a call, its latency, and a failure as a timeout or a trap
    /// (invalid results count as traps).
    fn observe(&self, started: Instant, failure: Option<&PluginFailure>) {
        self.calls.inc();
        self.latency.observe(started.elapsed().as_secs_f64());
        match failure {
            Some(f) if f.is_timeout() => self.timeouts.inc(),
            Some(_) => self.traps.inc(),
            None => {}
        }
    }
}

/// A plugin's metric handles per hook, resolved once: looking a labelled
/// series up hashes its labels and takes a lock.
pub struct PluginMetrics {
    on_request: HookMetrics,
    cache_key: HookMetrics,
    on_token: HookMetrics,
}

impl PluginMetrics {
    /// The plugin's handles, resolved on first use for each loaded version.
    fn of<'p>(plugin: &'p LoadedPlugin, metrics: &Metrics) -> &'p Self {
        plugin.metrics.get_or_init(|| {
            let name = &*plugin.name;
            Self {
                on_request: HookMetrics::new(metrics, name, "on-request"),
                cache_key: HookMetrics::new(metrics, name, "cache-key"),
                on_token: HookMetrics::new(metrics, name, "on-token"),
            }
        })
    }
}

fn wit_context(ctx: &RequestContext) -> WitContext {
    WitContext {
        request_id: ctx.request_id.clone(),
        key_id: ctx.identity.key_id.clone(),
        key_name: ctx.identity.key_name.clone(),
        route: ctx.route.to_string(),
        transport: ctx.transport.to_string(),
    }
}

fn wit_request(request: &CompletionRequest) -> WitRequest {
    WitRequest {
        model: request.model.clone(),
        prompts: request.prompt.texts(),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        user: request.user.clone(),
        body_json: serde_json::to_string(request).unwrap_or_default(),
    }
}

/// Applies a plugin's rewritten request, refusing results the gateway could not send.
fn apply(
    request: &mut CompletionRequest,
    modified: WitRequest,
    max_bytes: usize,
) -> Result<(), PluginFailure> {
    let size = modified.model.len() + modified.prompts.iter().map(String::len).sum::<usize>();
    if size > max_bytes {
        return Err(PluginFailure::Invalid(format!(
            "rewritten request is {size} bytes, over the {max_bytes}-byte limit"
        )));
    }
    if modified.model.trim().is_empty() {
        return Err(PluginFailure::Invalid(
            "rewritten request has an empty model".into(),
        ));
    }
    match &request.prompt {
        Prompt::Text(_) | Prompt::Texts(_) => {
            if modified.prompts.is_empty() || modified.prompts.iter().any(String::is_empty) {
                return Err(PluginFailure::Invalid(
                    "rewritten request has an empty prompt".into(),
                ));
            }
            request.prompt = match (&request.prompt, modified.prompts.len()) {
                (Prompt::Text(_), 1) => {
                    Prompt::Text(modified.prompts.into_iter().next().unwrap_or_default())
                }
                _ => Prompt::Texts(modified.prompts),
            };
        }
        Prompt::Tokens(_) | Prompt::TokenBatches(_) => {}
    }
    request.model = modified.model;
    request.max_tokens = modified.max_tokens;
    request.temperature = modified.temperature;
    request.top_p = modified.top_p;
    request.user = modified.user;
    Ok(())
}

/// A hook the chain selected the plugin for is missing from its instance
/// (cannot happen: the exports are checked at load).
fn no_hook() -> PluginFailure {
    PluginFailure::Invalid("the instance lacks the hook".into())
}

fn checked_text(text: String) -> Result<String, PluginFailure> {
    if text.len() > MAX_PLUGIN_TEXT {
        return Err(PluginFailure::Invalid(format!(
            "returned {} bytes of text; the limit is {MAX_PLUGIN_TEXT}",
            text.len()
        )));
    }
    Ok(text)
}

/// The plugins of `chain` that run `hook` for this request's key, in chain order.
fn hooked<'c>(
    chain: &'c Chain,
    ctx: &RequestContext,
    hook: impl Fn(&runtime::Exports) -> bool,
) -> Vec<&'c Arc<LoadedPlugin>> {
    chain
        .plugins
        .iter()
        .filter(|p| hook(&p.exports) && p.applies_to(&ctx.identity.key_name))
        .collect()
}

impl PluginHost {
    /// `on-request` through `plugins`; `wit_req` is kept equal to `request`
    /// as plugins see it (rebuilt only after a plugin changed it).
    async fn rewrite(
        &self,
        plugins: &[&Arc<LoadedPlugin>],
        ctx: &RequestContext,
        wit_ctx: &WitContext,
        request: &mut CompletionRequest,
        wit_req: &mut WitRequest,
    ) -> Result<(), GatewayError> {
        for plugin in plugins {
            let metrics = &self.metrics_of(plugin).on_request;
            let current: &WitRequest = wit_req;
            let result = self
                .pooled_call(plugin, metrics, "plugin.on_request", ctx, async |live| {
                    let guest = live.guests.request.as_ref().ok_or_else(no_hook)?;
                    guest
                        .call_on_request(&mut live.store, wit_ctx, current)
                        .await
                        .map_err(PluginFailure::from_wasmtime)
                })
                .await;
            match result {
                Ok(RequestDecision::Proceed) => {}
                Ok(RequestDecision::Modify(modified)) => {
                    match apply(request, modified, self.max_body_bytes) {
                        Ok(()) => *wit_req = wit_request(request),
                        Err(failure) => {
                            metrics.traps.inc();
                            Self::on_failure(plugin, "on-request", &ctx.request_id, failure)?;
                        }
                    }
                }
                Ok(RequestDecision::Reject(rejection)) => {
                    match StatusCode::from_u16(rejection.status) {
                        Ok(status) if (400..600).contains(&rejection.status) => {
                            return Err(GatewayError::Rejected {
                                status,
                                message: rejection.message.chars().take(4096).collect(),
                            });
                        }
                        _ => {
                            metrics.traps.inc();
                            let failure = PluginFailure::Invalid(format!(
                                "rejected with status {}, not 400..599",
                                rejection.status
                            ));
                            Self::on_failure(plugin, "on-request", &ctx.request_id, failure)?;
                        }
                    }
                }
                Err(failure) => Self::on_failure(plugin, "on-request", &ctx.request_id, failure)?,
            }
        }
        Ok(())
    }

    /// `cache-key` through `plugins`, starting from `key`: the key to use,
    /// or `None` when a plugin bypasses the cache.
    async fn choose_key(
        &self,
        plugins: &[&Arc<LoadedPlugin>],
        ctx: &RequestContext,
        wit_ctx: &WitContext,
        wit_req: &WitRequest,
        mut key: String,
    ) -> Result<Option<String>, GatewayError> {
        for plugin in plugins {
            let metrics = &self.metrics_of(plugin).cache_key;
            let result = self
                .pooled_call(plugin, metrics, "plugin.cache_key", ctx, async |live| {
                    let guest = live.guests.cache_key.as_ref().ok_or_else(no_hook)?;
                    let decision = guest
                        .call_cache_key(&mut live.store, wit_ctx, wit_req, &key)
                        .await
                        .map_err(PluginFailure::from_wasmtime)?;
                    match decision {
                        CacheKeyDecision::Custom(custom) if custom.len() > MAX_PLUGIN_TEXT => Err(
                            PluginFailure::Invalid(format!("cache key of {} bytes", custom.len())),
                        ),
                        decision => Ok(decision),
                    }
                })
                .await;
            match result {
                Ok(CacheKeyDecision::UseDefault) => {}
                Ok(CacheKeyDecision::Custom(custom)) => {
                    let mut digest = [0u8; 64];
                    hex::encode_to_slice(Sha256::digest(custom.as_bytes()), &mut digest)
                        .map_err(|err| GatewayError::Internal(err.to_string()))?;
                    key.clear();
                    key.push_str("plugin:");
                    key.extend(digest.iter().map(|&b| char::from(b)));
                }
                Ok(CacheKeyDecision::Bypass) => return Ok(None),
                Err(failure) => Self::on_failure(plugin, "cache-key", &ctx.request_id, failure)?,
            }
        }
        Ok(Some(key))
    }
}

#[async_trait]
impl Policy for PluginHost {
    /// Both request hooks from one chain version, converting the request for
    /// plugins once rather than once per hook.
    async fn admit(
        &self,
        ctx: &RequestContext,
        request: &mut CompletionRequest,
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
        let wit_ctx = wit_context(ctx);
        let mut wit_req = wit_request(request);
        self.rewrite(&rewriters, ctx, &wit_ctx, request, &mut wit_req)
            .await?;
        if !cached {
            return Ok(None);
        }
        let default_key = request.default_cache_key();
        self.choose_key(&keyers, ctx, &wit_ctx, &wit_req, default_key)
            .await
    }

    fn token_filters(&self, ctx: &RequestContext) -> Vec<Box<dyn TokenFilter>> {
        let chain = self.chain();
        chain
            .plugins
            .iter()
            .filter(|p| p.exports.token.is_some() && p.applies_to(&ctx.identity.key_name))
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

/// A token action from a plugin, checked.
fn token_action(action: WitAction) -> Result<TokenAction, PluginFailure> {
    Ok(match action {
        WitAction::Pass => TokenAction::Pass,
        WitAction::Replace(text) => TokenAction::Replace(checked_text(text)?),
        WitAction::Hold => TokenAction::Hold,
        WitAction::Stop(text) => TokenAction::Stop(checked_text(text)?),
    })
}

/// A stream's instance of one token plugin, per choice.
enum ChoiceInstance {
    Live(Box<runtime::Live>),
    /// Failed earlier in this stream (fail-open): text passes through.
    Skipped,
}

struct WasmTokenFilter {
    plugin: Arc<LoadedPlugin>,
    metrics: Arc<Metrics>,
    request_id: String,
    /// By choice index: one entry unless the request asked for `n` > 1.
    choices: Vec<(u32, ChoiceInstance)>,
    /// The texts of an `on-tokens` call, concatenated, and where each ends
    /// (kept to reuse their buffers).
    batch_text: String,
    batch_ends: Vec<u32>,
    /// One span for this plugin's filtering of the whole stream.
    _span: StageSpan,
}

impl WasmTokenFilter {
    fn new(plugin: Arc<LoadedPlugin>, metrics: Arc<Metrics>, ctx: &RequestContext) -> Self {
        Self {
            _span: {
                let mut span = StageSpan::child_of(ctx.trace.as_ref(), "plugin.on_token");
                span.set_with("plugin", || plugin.name.to_string());
                span
            },
            plugin,
            metrics,
            request_id: ctx.request_id.clone(),
            choices: Vec::new(),
            batch_text: String::new(),
            batch_ends: Vec::new(),
        }
    }

    fn observe(&self, started: Instant, failure: Option<&PluginFailure>) {
        PluginMetrics::of(&self.plugin, &self.metrics)
            .on_token
            .observe(started, failure);
    }

    async fn instance(&mut self, index: u32) -> Result<&mut ChoiceInstance, PluginFailure> {
        let found = self.choices.iter().position(|(i, _)| *i == index);
        let at = match found {
            Some(at) => at,
            None => {
                let live = Box::new(self.plugin.checkout(&self.request_id, true).await?);
                self.choices.push((index, ChoiceInstance::Live(live)));
                self.choices.len() - 1
            }
        };
        Ok(&mut self.choices[at].1)
    }

    async fn call_on_token(
        &mut self,
        index: u32,
        text: &str,
    ) -> Result<Option<TokenAction>, PluginFailure> {
        match self.instance(index).await? {
            ChoiceInstance::Skipped => Ok(None),
            ChoiceInstance::Live(live) => {
                live.arm();
                let guest = live.guests.token.as_ref().ok_or_else(no_hook)?;
                let action = guest
                    .call_on_token(&mut live.store, index, text)
                    .await
                    .map_err(PluginFailure::from_wasmtime)?;
                Ok(Some(token_action(action)?))
            }
        }
    }

    /// `on-tokens` with several texts; `None` when the plugin was skipped or
    /// has no batch form (the caller then goes text by text).
    async fn call_on_tokens(
        &mut self,
        index: u32,
        texts: &[&str],
    ) -> Result<Option<Vec<TokenAction>>, PluginFailure> {
        let (mut text, mut ends) = (
            std::mem::take(&mut self.batch_text),
            std::mem::take(&mut self.batch_ends),
        );
        text.clear();
        ends.clear();
        for piece in texts {
            text.push_str(piece);
            ends.push(u32::try_from(text.len()).unwrap_or(u32::MAX));
        }
        let result = match self.instance(index).await? {
            ChoiceInstance::Live(live) if live.guests.token_batch.is_some() => {
                live.arm_for(u32::try_from(texts.len()).unwrap_or(u32::MAX));
                let guest = live.guests.token_batch.as_ref().ok_or_else(no_hook)?;
                guest
                    .call_on_tokens(&mut live.store, index, &text, &ends)
                    .await
                    .map(Some)
            }
            _ => Ok(None),
        };
        (self.batch_text, self.batch_ends) = (text, ends);
        let Some(actions) = result.map_err(PluginFailure::from_wasmtime)? else {
            return Ok(None);
        };
        let ends_in_stop = matches!(actions.last(), Some(WitAction::Stop(_)));
        if actions.len() > texts.len() || (actions.len() < texts.len() && !ends_in_stop) {
            return Err(PluginFailure::Invalid(format!(
                "on-tokens answered {} texts with {} actions",
                texts.len(),
                actions.len()
            )));
        }
        actions
            .into_iter()
            .map(token_action)
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn has_batch_form(&self) -> bool {
        self.plugin.exports.token_batch.is_some()
    }

    fn fail(&mut self, index: u32, failure: PluginFailure) -> Result<(), GatewayError> {
        // The trapped instance is dropped here, never reused.
        match self.choices.iter_mut().find(|(i, _)| *i == index) {
            Some((_, choice)) => *choice = ChoiceInstance::Skipped,
            None => self.choices.push((index, ChoiceInstance::Skipped)),
        }
        PluginHost::on_failure(&self.plugin, "on-token", &self.request_id, failure)
    }
}

#[async_trait]
impl TokenFilter for WasmTokenFilter {
    async fn on_text(&mut self, index: u32, text: &str) -> Result<TokenAction, GatewayError> {
        let started = Instant::now();
        let result = self.call_on_token(index, text).await;
        match result {
            Ok(None) => Ok(TokenAction::Pass),
            Ok(Some(action)) => {
                self.observe(started, None);
                Ok(action)
            }
            Err(failure) => {
                self.observe(started, Some(&failure));
                self.fail(index, failure).map(|()| TokenAction::Pass)
            }
        }
    }

    async fn on_texts(
        &mut self,
        index: u32,
        texts: &[&str],
    ) -> Result<Vec<TokenAction>, GatewayError> {
        if texts.len() < 2 || !self.has_batch_form() {
            return crate::policy::on_each_text(self, index, texts).await;
        }
        let started = Instant::now();
        let result = self.call_on_tokens(index, texts).await;
        match result {
            Ok(None) => Ok(vec![TokenAction::Pass; texts.len()]),
            Ok(Some(actions)) => {
                self.observe(started, None);
                Ok(actions)
            }
            Err(failure) => {
                self.observe(started, Some(&failure));
                self.fail(index, failure)
                    .map(|()| vec![TokenAction::Pass; texts.len()])
            }
        }
    }

    async fn finish(&mut self, index: u32) -> Result<String, GatewayError> {
        let Some(at) = self.choices.iter().position(|(i, _)| *i == index) else {
            return Ok(String::new());
        };
        let ChoiceInstance::Live(mut live) = self.choices.swap_remove(at).1 else {
            return Ok(String::new());
        };
        let started = Instant::now();
        live.arm();
        let result = match live.guests.token.as_ref() {
            Some(guest) => guest
                .call_on_end(&mut live.store, index)
                .await
                .map_err(PluginFailure::from_wasmtime)
                .and_then(checked_text),
            None => Err(no_hook()),
        };
        match result {
            Ok(text) => {
                self.observe(started, None);
                // on-end has flushed this choice: the instance may serve a later stream.
                self.plugin.checkin(*live, true);
                Ok(text)
            }
            Err(failure) => {
                self.observe(started, Some(&failure));
                self.fail(index, failure).map(|()| String::new())
            }
        }
    }
}
