//! The host side of the WIT interface (`wit/plugin.wit`): generated bindings,
//! and the implementation of what the host exports to plugins (`host.log`).

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

// Exports are called asynchronously: a plugin running long yields to the
// executor at each epoch tick instead of holding a runtime thread.
wasmtime::component::bindgen!({
    path: "wit",
    world: "full-plugin",
    exports: { default: async },
});

pub use self::sluice::plugin::host::LogLevel;
pub use self::sluice::plugin::types::{CompletionRequest, RequestContext};
pub use exports::sluice::plugin::cache_key_hook::{self, CacheKeyDecision};
pub use exports::sluice::plugin::lifecycle;
pub use exports::sluice::plugin::request_hook::{self, RequestDecision};
pub use exports::sluice::plugin::token_batch_hook;
pub use exports::sluice::plugin::token_hook::{self, TokenAction};

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

impl self::sluice::plugin::types::Host for PluginState {}

impl self::sluice::plugin::host::Host for PluginState {
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

/// A linker with WASI (granting nothing) and the `host` interface.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    self::sluice::plugin::host::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    self::sluice::plugin::types::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    Ok(linker)
}
