//! The wasmtime side of the plugin host: one engine (component model, pooling
//! allocator, epoch interruption), compiled plugins ready to instantiate, and
//! instances with a memory cap and a CPU deadline per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{
    Config as EngineConfig, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
    Trap, UpdateDeadline,
};

pub use super::bindings::RequestKind;
use super::bindings::{
    self, CacheKeyGuest, CacheKeyIndices, LifecycleIndices, PluginState, RequestGuest,
    RequestIndices, TokenBatchGuest, TokenBatchIndices, TokenGuest, TokenIndices, ToolCallGuest,
    ToolCallIndices, WitVersion,
};
use super::{PluginConfig, PluginHostConfig};

/// Engine-wide ceiling on a plugin instance's linear memory (config validation enforces it).
pub const MAX_PLUGIN_MEMORY: usize = super::config::MAX_PLUGIN_MEMORY as usize;
/// Linear memory kept resident (and zeroed by memset) when a pool slot is
/// recycled. Zero: zeroing a Rust guest's ~1 MiB initial memory
/// per instance cost more than batched madvise.
const KEEP_RESIDENT: usize = 0;

/// Why a plugin call did not produce a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum PluginFailure {
    #[error("exceeded its CPU deadline")]
    Timeout,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned an invalid result: {0}")]
    Invalid(String),
    #[error("init failed: {0}")]
    Init(String),
}

impl PluginFailure {
    pub fn from_wasmtime(err: wasmtime::Error) -> Self {
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Self::Timeout,
            Some(trap) => Self::Trap(trap.to_string()),
            // Lifting a result can fail without a trap: invalid UTF-8, out-of-bounds lists.
            None => Self::Invalid(format!("{err:#}")),
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {reason}")]
    Read {
        path: String,
        reason: std::io::Error,
    },
    #[error("{path} is not a WebAssembly component: {reason}")]
    NotAComponent { path: String, reason: String },
    #[error("{path} does not export {interface}; build it against wit/plugin.wit")]
    MissingExport {
        path: String,
        interface: &'static str,
    },
    #[error("{path} exports no hook (request-hook, cache-key-hook, token-hook or tool-call-hook)")]
    NoHooks { path: String },
    #[error("{path} cannot be instantiated: {reason}")]
    Instantiate { path: String, reason: String },
    #[error("{0}")]
    Runtime(String),
}

/// Which hooks a component implements, and against which WIT version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooks {
    pub version: WitVersion,
    pub on_request: bool,
    pub cache_key: bool,
    pub on_token: bool,
    /// `token-batch-hook`: several chunks per call (only used with `token-hook`).
    pub on_tokens: bool,
    /// `tool-call-hook`: the tool calls of chat answers.
    pub on_tool_call: bool,
}

impl Hooks {
    fn any(&self) -> bool {
        self.on_request || self.cache_key || self.on_token || self.on_tool_call
    }

    /// Whether the request hooks read requests of `kind` (older components
    /// have no record for the kinds added after them).
    pub fn reads(&self, kind: RequestKind) -> bool {
        self.version.reads(kind)
    }
}

/// Stops the epoch ticker thread when dropped.
struct EpochTicker(Arc<AtomicBool>);

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The engine, the linker and the epoch ticker that enforces CPU deadlines.
/// One per process ([`Runtime::shared`]): engines are meant to be shared, and
/// the pooling allocator reserves address space per engine.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    /// Compiled components by the SHA-256 of their bytes: reloading an
    /// unchanged file (a config-only change) or loading it twice costs nothing.
    compiled: std::sync::Mutex<std::collections::HashMap<[u8; 32], Component>>,
    /// Idle instances kept per plugin and pool (`plugin_host.max_idle_instances`).
    max_idle: usize,
    epoch_tick: Duration,
    _ticker: EpochTicker,
}

static SHARED: std::sync::OnceLock<Result<Runtime, String>> = std::sync::OnceLock::new();

impl Runtime {
    /// The process's runtime, created on first use with these settings.
    pub fn shared(host: &PluginHostConfig) -> anyhow::Result<&'static Runtime> {
        SHARED
            .get_or_init(|| Runtime::new(host).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("cannot start the plugin runtime: {e}"))
    }

    fn new(host: &PluginHostConfig) -> anyhow::Result<Self> {
        let (instances, epoch_tick) = (host.max_instances, host.epoch_tick);
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_component_instances(instances)
            .total_core_instances(instances * 8)
            .total_memories(instances)
            .total_tables(instances * 4)
            .max_memory_size(MAX_PLUGIN_MEMORY)
            .max_core_instances_per_component(16)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .total_stacks(instances)
            // Reset small instances with memset instead of madvise: an instance per
            // request made madvise's TLB shootdowns the top cost (measured with perf).
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 << 10)
            .async_stack_keep_resident(64 << 10)
            // Whatever still needs decommitting is done in batches.
            .decommit_batch_size(8);
        let mut config = EngineConfig::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .memory_reservation(MAX_PLUGIN_MEMORY as u64)
            .memory_guard_size(2 << 20)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        // For plugin authors: names JIT-compiled plugin functions in
        // /tmp/perf-PID.map, which perf (and a callgrind run) can resolve.
        if std::env::var_os("SLUICE_PLUGIN_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let linker = bindings::linker(&engine)?;
        let stop = Arc::new(AtomicBool::new(false));
        // Deadlines must advance even when every request task is stuck in a plugin,
        // so the ticker is a thread of its own.
        let ticking = engine.clone();
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("sluice-plugin-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(epoch_tick);
                    ticking.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            linker,
            compiled: Default::default(),
            max_idle: host.idle_instances(),
            epoch_tick,
            _ticker: EpochTicker(stop),
        })
    }

    /// Compiles a component and checks its exports. CPU-heavy: call off the request path.
    pub fn compile(
        &self,
        path: &str,
        bytes: &[u8],
    ) -> Result<(Component, InstancePre<PluginState>, Exports), LoadError> {
        let not_a_component = |reason: String| LoadError::NotAComponent {
            path: path.to_string(),
            reason,
        };
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
                return Err(not_a_component(
                    "it is a core WebAssembly module; build a component (cargo build --target wasm32-wasip2)".into(),
                ));
            }
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(not_a_component("it is not a WebAssembly file".into())),
        }
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        let cached = self
            .compiled
            .lock()
            .ok()
            .and_then(|c| c.get(&digest).cloned());
        let component = match cached {
            Some(component) => component,
            None => {
                let component = self.compile_new(bytes, &not_a_component)?;
                if let Ok(mut compiled) = self.compiled.lock() {
                    if compiled.len() >= 64 {
                        compiled.clear();
                    }
                    compiled.insert(digest, component.clone());
                }
                component
            }
        };
        self.instantiate_pre(path, component)
    }

    fn compile_new(
        &self,
        bytes: &[u8],
        not_a_component: &dyn Fn(String) -> LoadError,
    ) -> Result<Component, LoadError> {
        Component::from_binary(&self.engine, bytes).map_err(|err| {
            let reason = format!("{err:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            not_a_component(reason.chars().take(300).collect())
        })
    }

    /// Links a compiled component and finds which hooks it exports.
    fn instantiate_pre(
        &self,
        path: &str,
        component: Component,
    ) -> Result<(Component, InstancePre<PluginState>, Exports), LoadError> {
        let pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|err| LoadError::Instantiate {
                    path: path.to_string(),
                    reason: format!("{err:#}"),
                })?;
        let lifecycle = LifecycleIndices::detect(&pre).ok_or_else(|| LoadError::MissingExport {
            path: path.to_string(),
            interface: "sluice:plugin/lifecycle@0.4.0",
        })?;
        let version = lifecycle.version();
        let exports = Exports {
            lifecycle,
            request: RequestIndices::find(version, &pre),
            cache_key: CacheKeyIndices::find(version, &pre),
            token: TokenIndices::find(version, &pre),
            token_batch: TokenBatchIndices::find(version, &pre),
            tool_call: ToolCallIndices::find(version, &pre),
        };
        if !exports.hooks().any() {
            return Err(LoadError::NoHooks {
                path: path.to_string(),
            });
        }
        Ok((component, pre, exports))
    }
}

/// Where a component's exported functions are.
pub struct Exports {
    lifecycle: LifecycleIndices,
    pub request: Option<RequestIndices>,
    pub cache_key: Option<CacheKeyIndices>,
    pub token: Option<TokenIndices>,
    pub token_batch: Option<TokenBatchIndices>,
    pub tool_call: Option<ToolCallIndices>,
}

impl Exports {
    pub fn hooks(&self) -> Hooks {
        Hooks {
            version: self.lifecycle.version(),
            on_request: self.request.is_some(),
            cache_key: self.cache_key.is_some(),
            on_token: self.token.is_some(),
            on_tokens: self.token.is_some() && self.token_batch.is_some(),
            on_tool_call: self.tool_call.is_some(),
        }
    }
}

/// A compiled plugin before its first instantiation.
pub struct Compiled {
    config: PluginConfig,
    digest: [u8; 32],
    exports: Exports,
    pre: InstancePre<PluginState>,
}

/// A compiled, validated plugin, ready to instantiate. Immutable: a reload
/// builds a new one, and requests in flight keep the one they started with.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    pub config: PluginConfig,
    pub digest: [u8; 32],
    pub exports: Exports,
    pre: InstancePre<PluginState>,
    max_memory: usize,
    max_idle: usize,
    epoch_tick: Duration,
    engine: Engine,
    /// Initialised instances for `on-request` and `cache-key`, each tagged
    /// with the API key whose requests it served: reused only for that key.
    idle: std::sync::Mutex<Vec<(Arc<str>, Live)>>,
    /// Instances whose stream ended cleanly (`on-end` called), reused by
    /// later streams of the same API key.
    idle_token: std::sync::Mutex<Vec<(Arc<str>, Live)>>,
    /// This plugin's metric handles, resolved on first use.
    pub metrics: std::sync::OnceLock<super::PluginMetrics>,
}

/// A live instance: its store, and its hook functions, initialised.
pub struct Live {
    pub store: Store<PluginState>,
    pub guests: Guests,
    /// The plugin's `timeout` in epoch ticks.
    ticks_per_call: u64,
}

/// The hooks of one instance, looked up and type-checked once when it is
/// created, not on every call.
pub struct Guests {
    pub request: Option<RequestGuest>,
    pub cache_key: Option<CacheKeyGuest>,
    pub token: Option<TokenGuest>,
    pub token_batch: Option<TokenBatchGuest>,
    pub tool_call: Option<ToolCallGuest>,
}

impl Live {
    /// Arms the CPU deadline for the next call. At every epoch tick the
    /// running guest uses up one tick of its budget and yields to the
    /// executor; with the budget spent, the call traps.
    pub fn arm(&mut self) {
        self.arm_for(1);
    }

    /// Arms the deadline of a call that does the work of `calls` calls (a batch).
    pub fn arm_for(&mut self, calls: u32) {
        self.store.data_mut().ticks_left = self.ticks_per_call.saturating_mul(calls.max(1).into());
        self.store.set_epoch_deadline(1);
    }
}

impl Compiled {
    /// Reads and compiles a plugin. CPU-heavy: run it off the request path.
    pub fn compile(runtime: &Runtime, config: &PluginConfig) -> Result<Self, LoadError> {
        let path = config.path.display().to_string();
        let bytes = std::fs::read(&config.path).map_err(|reason| LoadError::Read {
            path: path.clone(),
            reason,
        })?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let (_, pre, exports) = runtime.compile(&path, &bytes)?;
        Ok(Self {
            config: config.clone(),
            digest,
            exports,
            pre,
        })
    }

    /// Validates the plugin by instantiating it once (with `init`).
    pub async fn validate(self, runtime: &Runtime) -> Result<LoadedPlugin, LoadError> {
        let mut plugin = LoadedPlugin {
            name: Arc::from(self.config.name.as_str()),
            max_memory: (self.config.max_memory_bytes as usize).min(MAX_PLUGIN_MEMORY),
            config: self.config,
            digest: self.digest,
            exports: self.exports,
            pre: self.pre,
            engine: runtime.engine.clone(),
            max_idle: runtime.max_idle,
            epoch_tick: runtime.epoch_tick,
            idle: std::sync::Mutex::new(Vec::new()),
            idle_token: std::sync::Mutex::new(Vec::new()),
            metrics: std::sync::OnceLock::new(),
        };
        let live =
            plugin
                .instantiate("load-check")
                .await
                .map_err(|err| LoadError::Instantiate {
                    path: plugin.config.path.display().to_string(),
                    reason: err.to_string(),
                })?;
        if plugin.exports.token_batch.is_some() && live.guests.token_batch.is_none() {
            tracing::warn!(
                path = %plugin.config.path.display(),
                "the plugin exports token-batch-hook with another signature (built against an \
                 older wit/plugin.wit?); cached answers go through its on-token chunk by chunk"
            );
            plugin.exports.token_batch = None;
        }
        Ok(plugin)
    }
}

impl LoadedPlugin {
    /// Whether the plugin runs for requests made with this key.
    pub fn applies_to(&self, key_name: &str) -> bool {
        self.config.keys.is_empty() || self.config.keys.iter().any(|k| k == key_name)
    }

    fn pool(&self, token: bool) -> &std::sync::Mutex<Vec<(Arc<str>, Live)>> {
        if token { &self.idle_token } else { &self.idle }
    }

    /// An initialised instance for a request of API key `key_id`: an idle one
    /// that served only that key, else a new one. No state a plugin keeps in
    /// an instance ever reaches another key's requests. `token` selects the
    /// pool of `on-token` instances (kept apart: a stream holds its instance
    /// for the whole response).
    pub async fn checkout(
        &self,
        request_id: &str,
        key_id: &str,
        token: bool,
    ) -> Result<Live, PluginFailure> {
        let idle = self.pool(token).lock().ok().and_then(|mut idle| {
            let at = idle.iter().rposition(|(key, _)| &**key == key_id)?;
            Some(idle.remove(at).1)
        });
        match idle {
            Some(mut live) => {
                let tag = &mut live.store.data_mut().request_id;
                tag.clear();
                tag.push_str(request_id);
                Ok(live)
            }
            None => self.instantiate(request_id).await,
        }
    }

    /// Returns an instance whose last call succeeded, for later requests of
    /// the same key (one that failed is just dropped). Past the pool's size
    /// the instance idle longest makes room.
    pub fn checkin(&self, live: Live, key_id: &str, token: bool) {
        if self.max_idle == 0 {
            return;
        }
        if let Ok(mut idle) = self.pool(token).lock() {
            if idle.len() >= self.max_idle {
                idle.remove(0);
            }
            let key = idle
                .iter()
                .find(|(key, _)| &**key == key_id)
                .map_or_else(|| Arc::from(key_id), |(key, _)| key.clone());
            idle.push((key, live));
        }
    }

    /// The plugin's `timeout` in epoch ticks (at least one).
    fn ticks_per_call(&self) -> u64 {
        let tick = self.epoch_tick.as_micros().max(1);
        let ticks = self.config.timeout.as_micros().div_ceil(tick);
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }

    /// A fresh, initialised instance.
    pub async fn instantiate(&self, request_id: &str) -> Result<Live, PluginFailure> {
        let mut state = PluginState::new(self.name.clone(), self.max_memory);
        state.request_id = request_id.to_string();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| state.limiter());
        store.epoch_deadline_callback(|mut store| {
            let ticks_left = &mut store.data_mut().ticks_left;
            Ok(if *ticks_left == 0 {
                UpdateDeadline::Interrupt
            } else {
                *ticks_left -= 1;
                UpdateDeadline::Yield(1)
            })
        });
        let ticks_per_call = self.ticks_per_call();
        store.data_mut().ticks_left = ticks_per_call;
        store.set_epoch_deadline(1);
        let instance = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(PluginFailure::from_wasmtime)?;
        let exports = &self.exports;
        // A hook's functions, if the component exports the hook (each
        // interface has its own generated `GuestIndices` type).
        macro_rules! load {
            ($indices:expr) => {
                $indices
                    .as_ref()
                    .map(|indices| indices.load(&mut store, &instance))
                    .transpose()
            };
        }
        let guests = Guests {
            request: load!(exports.request).map_err(PluginFailure::from_wasmtime)?,
            cache_key: load!(exports.cache_key).map_err(PluginFailure::from_wasmtime)?,
            token: load!(exports.token).map_err(PluginFailure::from_wasmtime)?,
            // Optional: a component built against an earlier signature of
            // `on-tokens` is still served, through `on-token` (see `validate`).
            token_batch: load!(exports.token_batch).unwrap_or(None),
            tool_call: load!(exports.tool_call).map_err(PluginFailure::from_wasmtime)?,
        };
        let lifecycle = exports
            .lifecycle
            .load(&mut store, &instance)
            .map_err(PluginFailure::from_wasmtime)?;
        let mut live = Live {
            store,
            guests,
            ticks_per_call,
        };
        live.arm();
        lifecycle
            .init(&mut live.store, &self.config.config_json)
            .await
            .map_err(PluginFailure::from_wasmtime)?
            .map_err(PluginFailure::Init)?;
        Ok(live)
    }
}
