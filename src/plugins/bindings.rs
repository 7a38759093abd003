//! The host side of the WIT interface (`wit/plugin.wit`): generated bindings,
//! and the implementation of what the host exports to plugins (`host.log`).
//!
//! Two versions of the package are served: `sluice:plugin@0.2.0`
//! (`wit/plugin.wit`, both routes) and `sluice:plugin@0.1.0`
//! (`wit/legacy/plugin-0.1.0.wit`, completions only). The [`Versioned`]
//! guests below call either with the 0.2.0 types, converting for 0.1.0.

use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

// Exports are called asynchronously: a plugin running long yields to the
// executor at each epoch tick instead of holding a runtime thread.
pub mod v1 {
    wasmtime::component::bindgen!({
        path: "wit/legacy/plugin-0.1.0.wit",
        world: "full-plugin",
        exports: { default: async },
    });
}

pub mod v2 {
    wasmtime::component::bindgen!({
        path: "wit/plugin.wit",
        world: "full-plugin",
        exports: { default: async },
    });
}

use v1::exports::sluice::plugin as v1_hooks;
use v2::exports::sluice::plugin as v2_hooks;

pub use v2::sluice::plugin::host::LogLevel;
pub use v2::sluice::plugin::types::{
    ChatMessage, ChatRequest, CompletionRequest, InferenceRequest, RequestContext,
};
pub use v2_hooks::cache_key_hook::CacheKeyDecision;
pub use v2_hooks::request_hook::{Rejection, RequestDecision};
pub use v2_hooks::token_hook::TokenAction;

/// The version of the WIT package a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WitVersion {
    V0_1,
    V0_2,
}

impl WitVersion {
    pub fn package(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "sluice:plugin@0.1.0",
            WitVersion::V0_2 => "sluice:plugin@0.2.0",
        }
    }
}

/// A hook's export (or loaded function) from a 0.1.0 or a 0.2.0 component.
pub enum Versioned<A, B> {
    V1(A),
    V2(B),
}

/// The export indices and loaded guest of one hook interface, either version.
macro_rules! versioned_indices {
    ($name:ident, $guest:ident, $hook:ident) => {
        pub type $name = Versioned<v1_hooks::$hook::GuestIndices, v2_hooks::$hook::GuestIndices>;
        pub type $guest = Versioned<v1_hooks::$hook::Guest, v2_hooks::$hook::Guest>;

        impl $name {
            /// The hook of `version`, if the component exports it.
            pub fn find(
                version: WitVersion,
                pre: &wasmtime::component::InstancePre<PluginState>,
            ) -> Option<Self> {
                match version {
                    WitVersion::V0_1 => v1_hooks::$hook::GuestIndices::new(pre)
                        .ok()
                        .map(Versioned::V1),
                    WitVersion::V0_2 => v2_hooks::$hook::GuestIndices::new(pre)
                        .ok()
                        .map(Versioned::V2),
                }
            }

            /// Looks up and type-checks the hook's functions in an instance.
            pub fn load(
                &self,
                store: &mut Store<PluginState>,
                instance: &wasmtime::component::Instance,
            ) -> wasmtime::Result<$guest> {
                Ok(match self {
                    Versioned::V1(indices) => Versioned::V1(indices.load(store, instance)?),
                    Versioned::V2(indices) => Versioned::V2(indices.load(store, instance)?),
                })
            }
        }
    };
}

versioned_indices!(LifecycleIndices, LifecycleGuest, lifecycle);
versioned_indices!(RequestIndices, RequestGuest, request_hook);
versioned_indices!(CacheKeyIndices, CacheKeyGuest, cache_key_hook);
versioned_indices!(TokenIndices, TokenGuest, token_hook);
versioned_indices!(TokenBatchIndices, TokenBatchGuest, token_batch_hook);

/// `tool-call-hook`, which only 0.2.0 components can export.
pub type ToolCallIndices = v2_hooks::tool_call_hook::GuestIndices;
pub type ToolCallGuest = v2_hooks::tool_call_hook::Guest;
pub use v2_hooks::tool_call_hook::{ToolCallAction, ToolCallPiece};

/// The component's `tool-call-hook`, if it exports one.
pub fn find_tool_call(
    version: WitVersion,
    pre: &wasmtime::component::InstancePre<PluginState>,
) -> Option<ToolCallIndices> {
    match version {
        WitVersion::V0_1 => None,
        WitVersion::V0_2 => ToolCallIndices::new(pre).ok(),
    }
}

impl LifecycleIndices {
    /// The component's `lifecycle` export and so its version, newest first.
    pub fn detect(pre: &wasmtime::component::InstancePre<PluginState>) -> Option<Self> {
        Self::find(WitVersion::V0_2, pre).or_else(|| Self::find(WitVersion::V0_1, pre))
    }

    pub fn version(&self) -> WitVersion {
        match self {
            Versioned::V1(_) => WitVersion::V0_1,
            Versioned::V2(_) => WitVersion::V0_2,
        }
    }
}

impl LifecycleGuest {
    pub async fn init(
        &self,
        store: &mut Store<PluginState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Versioned::V1(guest) => guest.call_init(store, config).await,
            Versioned::V2(guest) => guest.call_init(store, config).await,
        }
    }
}

impl RequestGuest {
    /// `on-request`; `None` when the component (0.1.0) cannot read this kind of request.
    pub async fn on_request(
        &self,
        store: &mut Store<PluginState>,
        ctx: &RequestContext,
        request: &InferenceRequest,
    ) -> wasmtime::Result<Option<RequestDecision>> {
        match (self, request) {
            (Versioned::V2(guest), _) => guest.call_on_request(store, ctx, request).await.map(Some),
            (Versioned::V1(guest), InferenceRequest::Completion(completion)) => {
                let decision = guest
                    .call_on_request(store, &v1_context(ctx), &v1_completion(completion))
                    .await?;
                use v1_hooks::request_hook::RequestDecision as Old;
                Ok(Some(match decision {
                    Old::Proceed => RequestDecision::Proceed,
                    Old::Modify(modified) => RequestDecision::Modify(InferenceRequest::Completion(
                        v2_completion(modified),
                    )),
                    Old::Reject(rejection) => RequestDecision::Reject(Rejection {
                        status: rejection.status,
                        message: rejection.message,
                    }),
                }))
            }
            (Versioned::V1(_), InferenceRequest::Chat(_)) => Ok(None),
        }
    }
}

impl CacheKeyGuest {
    /// `cache-key`; `None` when the component (0.1.0) cannot read this kind of request.
    pub async fn cache_key(
        &self,
        store: &mut Store<PluginState>,
        ctx: &RequestContext,
        request: &InferenceRequest,
        default_key: &str,
    ) -> wasmtime::Result<Option<CacheKeyDecision>> {
        match (self, request) {
            (Versioned::V2(guest), _) => guest
                .call_cache_key(store, ctx, request, default_key)
                .await
                .map(Some),
            (Versioned::V1(guest), InferenceRequest::Completion(completion)) => {
                let decision = guest
                    .call_cache_key(
                        store,
                        &v1_context(ctx),
                        &v1_completion(completion),
                        default_key,
                    )
                    .await?;
                use v1_hooks::cache_key_hook::CacheKeyDecision as Old;
                Ok(Some(match decision {
                    Old::UseDefault => CacheKeyDecision::UseDefault,
                    Old::Custom(key) => CacheKeyDecision::Custom(key),
                    Old::Bypass => CacheKeyDecision::Bypass,
                }))
            }
            (Versioned::V1(_), InferenceRequest::Chat(_)) => Ok(None),
        }
    }
}

fn v2_action(action: v1_hooks::token_hook::TokenAction) -> TokenAction {
    use v1_hooks::token_hook::TokenAction as Old;
    match action {
        Old::Pass => TokenAction::Pass,
        Old::Replace(text) => TokenAction::Replace(text),
        Old::Hold => TokenAction::Hold,
        Old::Stop(text) => TokenAction::Stop(text),
    }
}

impl TokenGuest {
    pub async fn on_token(
        &self,
        store: &mut Store<PluginState>,
        index: u32,
        text: &str,
    ) -> wasmtime::Result<TokenAction> {
        match self {
            Versioned::V1(guest) => guest.call_on_token(store, index, text).await.map(v2_action),
            Versioned::V2(guest) => guest.call_on_token(store, index, text).await,
        }
    }

    pub async fn on_end(
        &self,
        store: &mut Store<PluginState>,
        index: u32,
    ) -> wasmtime::Result<String> {
        match self {
            Versioned::V1(guest) => guest.call_on_end(store, index).await,
            Versioned::V2(guest) => guest.call_on_end(store, index).await,
        }
    }
}

impl TokenBatchGuest {
    pub async fn on_tokens(
        &self,
        store: &mut Store<PluginState>,
        index: u32,
        text: &str,
        ends: &[u32],
    ) -> wasmtime::Result<Vec<TokenAction>> {
        match self {
            Versioned::V1(guest) => guest
                .call_on_tokens(store, index, text, ends)
                .await
                .map(|actions| actions.into_iter().map(v2_action).collect()),
            Versioned::V2(guest) => guest.call_on_tokens(store, index, text, ends).await,
        }
    }
}

fn v1_context(ctx: &RequestContext) -> v1::sluice::plugin::types::RequestContext {
    v1::sluice::plugin::types::RequestContext {
        request_id: ctx.request_id.clone(),
        key_id: ctx.key_id.clone(),
        key_name: ctx.key_name.clone(),
        route: ctx.route.clone(),
        transport: ctx.transport.clone(),
    }
}

fn v1_completion(request: &CompletionRequest) -> v1::sluice::plugin::types::CompletionRequest {
    v1::sluice::plugin::types::CompletionRequest {
        model: request.model.clone(),
        prompts: request.prompts.clone(),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        user: request.user.clone(),
        body_json: request.body_json.clone(),
    }
}

fn v2_completion(request: v1::sluice::plugin::types::CompletionRequest) -> CompletionRequest {
    CompletionRequest {
        model: request.model,
        prompts: request.prompts,
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        user: request.user,
        body_json: request.body_json,
    }
}

/// Longest log line a plugin may write.
const MAX_LOG_LINE: usize = 4096;

/// Per-instance state: a WASI context that grants nothing, the memory limiter,
/// and what log lines are tagged with.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub plugin: std::sync::Arc<str>,
    pub request_id: String,
    /// Epoch ticks the current call may still run for. Counted only while
    /// the guest runs: time spent waiting for the executor after a yield is
    /// not the plugin's.
    pub ticks_left: u64,
}

impl PluginState {
    pub fn new(plugin: std::sync::Arc<str>, max_memory_bytes: usize) -> Self {
        // No preopened directories, no environment, no arguments, stdio to nowhere, no sockets.
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(max_memory_bytes)
                .instances(64)
                .tables(64)
                .memories(8)
                .build(),
            plugin,
            request_id: String::new(),
            ticks_left: 0,
        }
    }

    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl v1::sluice::plugin::types::Host for PluginState {}
impl v2::sluice::plugin::types::Host for PluginState {}

impl v1::sluice::plugin::host::Host for PluginState {
    fn log(&mut self, level: v1::sluice::plugin::host::LogLevel, message: String) {
        use v1::sluice::plugin::host::LogLevel as Old;
        let level = match level {
            Old::Trace => LogLevel::Trace,
            Old::Debug => LogLevel::Debug,
            Old::Info => LogLevel::Info,
            Old::Warn => LogLevel::Warn,
            Old::Error => LogLevel::Error,
        };
        v2::sluice::plugin::host::Host::log(self, level, message);
    }
}

impl v2::sluice::plugin::host::Host for PluginState {
    fn log(&mut self, level: LogLevel, message: String) {
        let mut end = message.len().min(MAX_LOG_LINE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        let (plugin, request_id) = (&*self.plugin, self.request_id.as_str());
        match level {
            LogLevel::Trace => tracing::trace!(plugin, request_id, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, request_id, "{message}"),
            LogLevel::Info => tracing::info!(plugin, request_id, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, request_id, "{message}"),
            LogLevel::Error => tracing::error!(plugin, request_id, "{message}"),
        }
    }
}

/// A linker with WASI (granting nothing) and the `host` interface of both versions.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    v1::sluice::plugin::host::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    v1::sluice::plugin::types::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    v2::sluice::plugin::host::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    v2::sluice::plugin::types::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    Ok(linker)
}
