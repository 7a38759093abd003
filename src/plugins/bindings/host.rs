//! What the host gives every plugin instance: a WASI context that grants
//! nothing, the memory limiter, and the `host` interface (`host.log`) of
//! every WIT version, linked once.

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::{LogLevel, v1, v2, v3, v4};

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

    fn log(&self, level: LogLevel, message: &str) {
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

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The `host` and `types` interfaces of one WIT version: the log levels are
/// the same enum in each.
macro_rules! host_interface {
    ($version:ident) => {
        impl $version::sluice::plugin::types::Host for PluginState {}

        impl $version::sluice::plugin::host::Host for PluginState {
            fn log(&mut self, level: $version::sluice::plugin::host::LogLevel, message: String) {
                use $version::sluice::plugin::host::LogLevel as Level;
                let level = match level {
                    Level::Trace => LogLevel::Trace,
                    Level::Debug => LogLevel::Debug,
                    Level::Info => LogLevel::Info,
                    Level::Warn => LogLevel::Warn,
                    Level::Error => LogLevel::Error,
                };
                PluginState::log(self, level, &message);
            }
        }
    };
}

host_interface!(v1);
host_interface!(v2);
host_interface!(v3);
host_interface!(v4);

/// A linker with WASI (granting nothing) and the `host` interface of every version.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    macro_rules! link {
        ($($version:ident),*) => {$(
            $version::sluice::plugin::host::add_to_linker::<PluginState, HasSelf<PluginState>>(
                &mut linker,
                |state| state,
            )?;
            $version::sluice::plugin::types::add_to_linker::<PluginState, HasSelf<PluginState>>(
                &mut linker,
                |state| state,
            )?;
        )*};
    }
    link!(v1, v2, v3, v4);
    Ok(linker)
}
