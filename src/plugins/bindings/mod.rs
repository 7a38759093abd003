//! The host side of the WIT interface: generated bindings for each version
//! of `sluice:plugin` a component may be built against, and the
//! [`Versioned`] guests that call any of them with the current types.
//!
//! Four versions are served: `sluice:plugin@0.4.0` (`wit/plugin.wit`,
//! every route plugins can read, the agent APIs' conversations too),
//! `0.3.0` (`wit/legacy/plugin-0.3.0.wit`, no agent APIs), `0.2.0`
//! (`wit/legacy/plugin-0.2.0.wit`, completions and chat) and `0.1.0`
//! (`wit/legacy/plugin-0.1.0.wit`, completions only). A request an older component cannot read makes its
//! request hooks answer `None`; the caller applies the plugin's policy.

mod convert;
mod host;

pub use host::{PluginState, linker};

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
        path: "wit/legacy/plugin-0.2.0.wit",
        world: "full-plugin",
        exports: { default: async },
    });
}

pub mod v3 {
    wasmtime::component::bindgen!({
        path: "wit/legacy/plugin-0.3.0.wit",
        world: "full-plugin",
        exports: { default: async },
    });
}

pub mod v4 {
    wasmtime::component::bindgen!({
        path: "wit/plugin.wit",
        world: "full-plugin",
        exports: { default: async },
    });
}

use convert::{legacy_v1, legacy_v2, legacy_v3};
use v1::exports::sluice::plugin as v1_hooks;
use v2::exports::sluice::plugin as v2_hooks;
use v3::exports::sluice::plugin as v3_hooks;
use v4::exports::sluice::plugin as v4_hooks;
use wasmtime::Store;
use wasmtime::component::{Instance, InstancePre};

pub use v4::sluice::plugin::host::LogLevel;
pub use v4::sluice::plugin::types::{
    ChatMessage, ChatRequest, CompletionRequest, InferenceRequest, PoolingRequest, RequestContext,
};
pub use v4_hooks::cache_key_hook::CacheKeyDecision;
pub use v4_hooks::request_hook::{Rejection, RequestDecision};
pub use v4_hooks::token_hook::TokenAction;
pub use v4_hooks::tool_call_hook::{ToolCallAction, ToolCallPiece};

/// The version of the WIT package a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WitVersion {
    V0_1,
    V0_2,
    V0_3,
    V0_4,
}

/// The kinds of request the request hooks are given, by the version that added each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Completion,
    Chat,
    Pooling,
    /// An agent API's conversation (Messages, Responses), as a chat record.
    Conversation,
}

impl WitVersion {
    pub fn package(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "sluice:plugin@0.1.0",
            WitVersion::V0_2 => "sluice:plugin@0.2.0",
            WitVersion::V0_3 => "sluice:plugin@0.3.0",
            WitVersion::V0_4 => "sluice:plugin@0.4.0",
        }
    }

    /// Whether a component of this version has a record for `kind`.
    pub fn reads(self, kind: RequestKind) -> bool {
        self >= match kind {
            RequestKind::Completion => WitVersion::V0_1,
            RequestKind::Chat => WitVersion::V0_2,
            RequestKind::Pooling => WitVersion::V0_3,
            RequestKind::Conversation => WitVersion::V0_4,
        }
    }
}

impl InferenceRequest {
    /// The record's kind (a conversation arrives as a chat: its route tells).
    pub fn kind(&self) -> RequestKind {
        match self {
            InferenceRequest::Completion(_) => RequestKind::Completion,
            InferenceRequest::Chat(_) => RequestKind::Chat,
            InferenceRequest::Pooling(_) => RequestKind::Pooling,
        }
    }
}

/// A hook's export (or loaded function) from a component of any version.
pub enum Versioned<A, B, C, D> {
    V1(A),
    V2(B),
    V3(C),
    V4(D),
}

/// The export indices and loaded guest of one hook interface, any version.
macro_rules! versioned_indices {
    ($name:ident, $guest:ident, $hook:ident) => {
        pub type $name = Versioned<
            v1_hooks::$hook::GuestIndices,
            v2_hooks::$hook::GuestIndices,
            v3_hooks::$hook::GuestIndices,
            v4_hooks::$hook::GuestIndices,
        >;
        pub type $guest = Versioned<
            v1_hooks::$hook::Guest,
            v2_hooks::$hook::Guest,
            v3_hooks::$hook::Guest,
            v4_hooks::$hook::Guest,
        >;

        impl $name {
            /// The hook of `version`, if the component exports it.
            pub fn find(version: WitVersion, pre: &InstancePre<PluginState>) -> Option<Self> {
                match version {
                    WitVersion::V0_1 => v1_hooks::$hook::GuestIndices::new(pre)
                        .ok()
                        .map(Versioned::V1),
                    WitVersion::V0_2 => v2_hooks::$hook::GuestIndices::new(pre)
                        .ok()
                        .map(Versioned::V2),
                    WitVersion::V0_3 => v3_hooks::$hook::GuestIndices::new(pre)
                        .ok()
                        .map(Versioned::V3),
                    WitVersion::V0_4 => v4_hooks::$hook::GuestIndices::new(pre)
                        .ok()
                        .map(Versioned::V4),
                }
            }

            /// Looks up and type-checks the hook's functions in an instance.
            pub fn load(
                &self,
                store: &mut Store<PluginState>,
                instance: &Instance,
            ) -> wasmtime::Result<$guest> {
                Ok(match self {
                    Versioned::V1(indices) => Versioned::V1(indices.load(store, instance)?),
                    Versioned::V2(indices) => Versioned::V2(indices.load(store, instance)?),
                    Versioned::V3(indices) => Versioned::V3(indices.load(store, instance)?),
                    Versioned::V4(indices) => Versioned::V4(indices.load(store, instance)?),
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

/// `tool-call-hook`, which 0.1.0 components cannot export (its 0.2.0,
/// 0.3.0 and 0.4.0 forms are the same).
pub enum ToolCallIndices {
    V2(v2_hooks::tool_call_hook::GuestIndices),
    V3(v3_hooks::tool_call_hook::GuestIndices),
    V4(v4_hooks::tool_call_hook::GuestIndices),
}

pub enum ToolCallGuest {
    V2(v2_hooks::tool_call_hook::Guest),
    V3(v3_hooks::tool_call_hook::Guest),
    V4(v4_hooks::tool_call_hook::Guest),
}

impl ToolCallIndices {
    /// The component's `tool-call-hook`, if it exports one.
    pub fn find(version: WitVersion, pre: &InstancePre<PluginState>) -> Option<Self> {
        match version {
            WitVersion::V0_1 => None,
            WitVersion::V0_2 => v2_hooks::tool_call_hook::GuestIndices::new(pre)
                .ok()
                .map(Self::V2),
            WitVersion::V0_3 => v3_hooks::tool_call_hook::GuestIndices::new(pre)
                .ok()
                .map(Self::V3),
            WitVersion::V0_4 => v4_hooks::tool_call_hook::GuestIndices::new(pre)
                .ok()
                .map(Self::V4),
        }
    }

    pub fn load(
        &self,
        store: &mut Store<PluginState>,
        instance: &Instance,
    ) -> wasmtime::Result<ToolCallGuest> {
        Ok(match self {
            Self::V2(indices) => ToolCallGuest::V2(indices.load(store, instance)?),
            Self::V3(indices) => ToolCallGuest::V3(indices.load(store, instance)?),
            Self::V4(indices) => ToolCallGuest::V4(indices.load(store, instance)?),
        })
    }
}

impl LifecycleIndices {
    /// The component's `lifecycle` export and so its version, newest first.
    pub fn detect(pre: &InstancePre<PluginState>) -> Option<Self> {
        [
            WitVersion::V0_4,
            WitVersion::V0_3,
            WitVersion::V0_2,
            WitVersion::V0_1,
        ]
        .into_iter()
        .find_map(|version| Self::find(version, pre))
    }

    pub fn version(&self) -> WitVersion {
        match self {
            Versioned::V1(_) => WitVersion::V0_1,
            Versioned::V2(_) => WitVersion::V0_2,
            Versioned::V3(_) => WitVersion::V0_3,
            Versioned::V4(_) => WitVersion::V0_4,
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
            Versioned::V3(guest) => guest.call_init(store, config).await,
            Versioned::V4(guest) => guest.call_init(store, config).await,
        }
    }
}

impl RequestGuest {
    /// `on-request`; `None` when the component's version cannot read this kind of request.
    pub async fn on_request(
        &self,
        store: &mut Store<PluginState>,
        ctx: &RequestContext,
        request: &InferenceRequest,
    ) -> wasmtime::Result<Option<RequestDecision>> {
        Ok(match self {
            Versioned::V4(guest) => Some(guest.call_on_request(store, ctx, request).await?),
            Versioned::V3(guest) => match convert::to_v3(request) {
                None => None,
                Some(old) => {
                    let ctx = legacy_v3::context(ctx);
                    let decision = guest.call_on_request(store, &ctx, &old).await?;
                    Some(legacy_v3::decision_back(decision, convert::from_v3))
                }
            },
            Versioned::V2(guest) => match convert::to_v2(request) {
                None => None,
                Some(old) => {
                    let ctx = legacy_v2::context(ctx);
                    let decision = guest.call_on_request(store, &ctx, &old).await?;
                    Some(legacy_v2::decision_back(decision, convert::from_v2))
                }
            },
            Versioned::V1(guest) => match convert::to_v1(request) {
                None => None,
                Some(old) => {
                    let ctx = legacy_v1::context(ctx);
                    let decision = guest.call_on_request(store, &ctx, &old).await?;
                    Some(legacy_v1::decision_back(decision, |modified| {
                        InferenceRequest::Completion(legacy_v1::completion_back(&modified))
                    }))
                }
            },
        })
    }
}

impl CacheKeyGuest {
    /// `cache-key`; `None` when the component's version cannot read this kind of request.
    pub async fn cache_key(
        &self,
        store: &mut Store<PluginState>,
        ctx: &RequestContext,
        request: &InferenceRequest,
        default_key: &str,
    ) -> wasmtime::Result<Option<CacheKeyDecision>> {
        Ok(match self {
            Versioned::V4(guest) => Some(
                guest
                    .call_cache_key(store, ctx, request, default_key)
                    .await?,
            ),
            Versioned::V3(guest) => match convert::to_v3(request) {
                None => None,
                Some(old) => {
                    let ctx = legacy_v3::context(ctx);
                    let key = guest.call_cache_key(store, &ctx, &old, default_key).await?;
                    Some(legacy_v3::key_back(key))
                }
            },
            Versioned::V2(guest) => match convert::to_v2(request) {
                None => None,
                Some(old) => {
                    let ctx = legacy_v2::context(ctx);
                    let key = guest.call_cache_key(store, &ctx, &old, default_key).await?;
                    Some(legacy_v2::key_back(key))
                }
            },
            Versioned::V1(guest) => match convert::to_v1(request) {
                None => None,
                Some(old) => {
                    let ctx = legacy_v1::context(ctx);
                    let key = guest.call_cache_key(store, &ctx, &old, default_key).await?;
                    Some(legacy_v1::key_back(key))
                }
            },
        })
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
            Versioned::V1(guest) => guest
                .call_on_token(store, index, text)
                .await
                .map(legacy_v1::action_back),
            Versioned::V2(guest) => guest
                .call_on_token(store, index, text)
                .await
                .map(legacy_v2::action_back),
            Versioned::V3(guest) => guest
                .call_on_token(store, index, text)
                .await
                .map(legacy_v3::action_back),
            Versioned::V4(guest) => guest.call_on_token(store, index, text).await,
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
            Versioned::V3(guest) => guest.call_on_end(store, index).await,
            Versioned::V4(guest) => guest.call_on_end(store, index).await,
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
        let actions = match self {
            Versioned::V1(guest) => guest
                .call_on_tokens(store, index, text, ends)
                .await?
                .into_iter()
                .map(legacy_v1::action_back)
                .collect(),
            Versioned::V2(guest) => guest
                .call_on_tokens(store, index, text, ends)
                .await?
                .into_iter()
                .map(legacy_v2::action_back)
                .collect(),
            Versioned::V3(guest) => guest
                .call_on_tokens(store, index, text, ends)
                .await?
                .into_iter()
                .map(legacy_v3::action_back)
                .collect(),
            Versioned::V4(guest) => guest.call_on_tokens(store, index, text, ends).await?,
        };
        Ok(actions)
    }
}

impl ToolCallGuest {
    pub async fn on_tool_call(
        &self,
        store: &mut Store<PluginState>,
        index: u32,
        piece: &ToolCallPiece,
    ) -> wasmtime::Result<ToolCallAction> {
        match self {
            ToolCallGuest::V2(guest) => guest
                .call_on_tool_call(store, index, &convert::v2_piece(piece))
                .await
                .map(convert::tool_action_back),
            ToolCallGuest::V3(guest) => guest
                .call_on_tool_call(store, index, &convert::v3_piece(piece))
                .await
                .map(convert::v3_tool_action_back),
            ToolCallGuest::V4(guest) => guest.call_on_tool_call(store, index, piece).await,
        }
    }
}
