//! The wasmtime side: one engine, one `InstancePre` per role, a fresh
//! `Store` per call with the role's limits and a WASI context that grants
//! only what the manifest names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, PoolConcurrencyLimitError, Store, Trap, UpdateDeadline};

use crate::acl::sha256_hex;
use crate::backend::{Backend, Metered, Write};
use crate::bindings::{Role as RoleWorld, RolePre};
use crate::cache::CompileCache;
use crate::error::{CallError, StateError};
use crate::limits::{Grants, RoleLimits, MAX_CONCURRENCY};
use crate::metrics::{Metrics, RoleMetrics};
use crate::namespace::{validate_global_prefix, validate_identity, Namespace};
use crate::slots::Slots;
use crate::state::log::CallLog;
use crate::state::{CallCtx, CallLimiter, OpRate, RoleInfo};

/// How often the engine's epoch advances: the granularity of deadlines,
/// and the longest a guest computes before it yields its thread.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Where a granted directory appears inside the guest.
pub const GUEST_DIR: &str = "/data";

/// A role to load: its identity, its component, and how it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSpec {
    /// The identity: `[a-z0-9][a-z0-9_-]{0,62}`, unique among loaded roles.
    pub name: String,
    /// Path of the component file.
    pub wasm: PathBuf,
    /// If set, the file's sha256 (hex) must be this.
    pub sha256: Option<String>,
    /// Per-role limits.
    pub limits: RoleLimits,
    /// What the role may use beyond its own namespace.
    pub grants: Grants,
}

impl RoleSpec {
    /// A role named after the file stem of `wasm`, with default limits and
    /// no grants.
    pub fn from_path(wasm: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let wasm = wasm.into();
        let name = wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .with_context(|| format!("cannot name a role after {}", wasm.display()))?
            .to_owned();
        Ok(Self { name, wasm, sha256: None, limits: RoleLimits::default(), grants: Grants::default() })
    }

    /// Checks the name, the limits and the names of granted namespaces:
    /// what every command that reads a manifest must refuse alike.
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_identity(&self.name).map_err(anyhow::Error::msg)?;
        self.limits.validate().map_err(|e| anyhow::anyhow!("role `{}`: bad limit: {e}", self.name))?;
        for name in self.grants.namespaces.keys() {
            validate_identity(name).map_err(|e| anyhow::anyhow!("role `{}`: bad namespace grant: {e}", self.name))?;
        }
        if let Some(secret) = self.grants.env.iter().find(|name| HOST_SECRETS.contains(&name.as_str())) {
            bail!("role `{}`: {secret} is the host's own secret; no role may be granted it", self.name);
        }
        Ok(())
    }
}

/// Environment variables no role may be granted: the Redis passwords,
/// the state URL (which may carry one), the secret role passwords derive
/// from, and the admin token.
const HOST_SECRETS: [&str; 5] = [
    crate::config::PASSWORD_ENV,
    crate::config::SENTINEL_PASSWORD_ENV,
    crate::config::STATE_ENV,
    crate::acl::SECRET_ENV,
    crate::serve::ADMIN_TOKEN_ENV,
];

/// A loaded role, ready to be called.
pub struct Role {
    info: Arc<RoleInfo>,
    spec: RoleSpec,
    pre: RolePre<CallCtx>,
    sha256: String,
    from_cache: bool,
    /// The backend as given (for reloads) and as the role uses it (metered).
    backend: Arc<dyn Backend>,
    metered: Arc<dyn Backend>,
    /// Calls this role may run at once, shared by its versions.
    slots: Arc<Slots>,
    metrics: RoleMetrics,
    /// Instances kept between calls (`warm-instances`), most recent last.
    warm: Mutex<Vec<(Store<CallCtx>, RoleWorld)>>,
    /// Replaced by a reload or unloaded: its calls still running keep no
    /// instance warm (none could use it, and it would hold a pool slot).
    retired: AtomicBool,
}

impl Role {
    /// The role's identity.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The sha256 of the component it was loaded from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Its limits.
    pub fn limits(&self) -> &RoleLimits {
        &self.info.limits
    }

    /// Its namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.info.namespace
    }

    /// Whether its compiled code came from the compile cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// What it was loaded from.
    pub fn spec(&self) -> &RoleSpec {
        &self.spec
    }

    /// A warm instance left by an earlier call, if the role keeps them.
    fn take_warm(&self) -> Option<(Store<CallCtx>, RoleWorld)> {
        if self.info.limits.warm_instances == 0 {
            return None;
        }
        self.warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop()
    }

    /// Keeps an instance whose call returned normally for the next call,
    /// up to the role's `warm-instances`; drops it otherwise.
    fn keep_warm(&self, mut store: Store<CallCtx>, instance: RoleWorld) {
        let max = self.info.limits.warm_instances;
        if max == 0 {
            return;
        }
        store.data_mut().next_call();
        let mut warm = self.warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Read under the lock that `retire` clears the instances with.
        if warm.len() < max && !self.retired.load(Ordering::Relaxed) {
            warm.push((store, instance));
        }
    }

    /// Marks a version no longer served, and drops its warm instances.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }
}

/// Engine-wide settings, fixed when the host is made.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Count fuel, so roles can have a `fuel` limit. Slows every call a
    /// little, so it is off unless a role needs it.
    pub fuel: bool,
    /// Calls running at once across all roles; past it a call is refused
    /// as busy rather than queued (default 1024).
    pub max_concurrency: usize,
    /// Where to keep compiled components (default: none, compile on load).
    pub cache: Option<CompileCache>,
    /// Preallocate instances, memories and stacks for `max_concurrency`
    /// calls (pooling allocator, copy-on-write memory images) instead of
    /// mapping them for every call. Much cheaper per call; reserves address
    /// space up front, so it is off for short-lived hosts (default off).
    pub pooling: bool,
    /// Bytes of fire-and-forget writes that finished calls may leave unsent
    /// at once (default 256 MiB): while the backend is slow or down, the
    /// writes of calls past it are dropped and counted as failed, rather
    /// than pile up in memory.
    pub max_unsent_bytes: usize,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self { fuel: false, max_concurrency: 1024, cache: None, pooling: false, max_unsent_bytes: 256 << 20 }
    }
}

/// Largest linear memory of a role when the pooling allocator is on.
pub const POOLED_MAX_MEMORY_BYTES: usize = 256 << 20;

/// Most calls at once with the pooling allocator: each reserves address
/// space for two memories of [`POOLED_MAX_MEMORY_BYTES`] and their guards,
/// and a process has 128 TiB of it (this takes about a third).
pub const MAX_POOLED_CONCURRENCY: usize = 1 << 16;

fn pooling(instances: usize) -> wasmtime::PoolingAllocationConfig {
    let instances = u32::try_from(instances).unwrap_or(u32::MAX).max(1);
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    // A Rust, JS or Python role holds a few core instances, memories and
    // tables; these bounds leave room for that.
    pool.total_component_instances(instances)
        .max_core_instances_per_component(16)
        .max_memories_per_component(4)
        .max_tables_per_component(16)
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(8))
        .total_stacks(instances)
        .max_memory_size(POOLED_MAX_MEMORY_BYTES);
    // Reset a used slot by scanning for the pages the call dirtied and
    // zeroing just those (PAGEMAP_SCAN, Linux 6.7+), instead of dropping
    // every page and faulting them back in on the next call. Falls back to
    // madvise where the ioctl is missing.
    pool.pagemap_scan(wasmtime::Enabled::Auto).linear_memory_keep_resident(8 << 20).table_keep_resident(64 << 10);
    pool
}

/// Roles loaded into one engine, sharing one backend.
pub struct Host {
    engine: Engine,
    linker: Linker<CallCtx>,
    backend: Arc<dyn Backend>,
    global_prefix: String,
    options: HostOptions,
    /// Swapped whole on reload; a call keeps the `Arc<Role>` it started with.
    roles: RwLock<BTreeMap<String, Arc<Role>>>,
    /// Calls of all roles running at once (`max_concurrency`).
    slots: Slots,
    metrics: Arc<Metrics>,
    ticker_stop: Arc<AtomicBool>,
    flushes: Arc<Flushes>,
    /// Held by a reload from reading the file to swapping the role in.
    reloading: Mutex<()>,
    /// The largest `max-value-bytes` each role name has had in this
    /// process, through reloads, unloads and loads again.
    largest_values: Mutex<BTreeMap<String, usize>>,
}

/// Fire-and-forget sends still running.
#[derive(Default)]
struct Flushes {
    running: AtomicUsize,
    /// Bytes their writes hold.
    bytes: AtomicUsize,
    done: tokio::sync::Notify,
}

impl Host {
    /// A host with no roles yet, storing state in `backend` under `global_prefix`.
    pub fn new(backend: Arc<dyn Backend>, global_prefix: &str) -> anyhow::Result<Self> {
        Self::with_options(backend, global_prefix, HostOptions::default())
    }

    /// Like [`Host::new`], with engine options.
    pub fn with_options(backend: Arc<dyn Backend>, global_prefix: &str, options: HostOptions) -> anyhow::Result<Self> {
        validate_global_prefix(global_prefix).map_err(anyhow::Error::msg)?;
        let most = if options.pooling { MAX_POOLED_CONCURRENCY } else { MAX_CONCURRENCY };
        if !(1..=most).contains(&options.max_concurrency) {
            let pooled = if options.pooling { " with the pooling allocator (as `serve` runs)" } else { "" };
            bail!("max concurrency is {}; it must be 1 to {most}{pooled}", options.max_concurrency);
        }
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true).consume_fuel(options.fuel);
        if options.pooling {
            config
                .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling(options.max_concurrency)))
                .memory_reservation(POOLED_MAX_MEMORY_BYTES as u64);
        }
        let engine = Engine::new(&config).map_err(|e| match options.pooling {
            true => {
                anyhow::anyhow!("cannot reserve the instance pool for {} calls at once: {e:#}", options.max_concurrency)
            }
            false => anyhow::anyhow!("cannot make the engine: {e:#}"),
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        RoleWorld::add_to_linker::<_, HasSelf<_>>(&mut linker, |ctx| ctx)?;
        let max_concurrency = options.max_concurrency;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), ticker_stop.clone())?;
        Ok(Self {
            engine,
            linker,
            backend,
            global_prefix: global_prefix.to_owned(),
            options,
            roles: RwLock::new(BTreeMap::new()),
            slots: Slots::new(max_concurrency),
            metrics: Arc::new(Metrics::new()),
            ticker_stop,
            flushes: Arc::default(),
            reloading: Mutex::new(()),
            largest_values: Mutex::new(BTreeMap::new()),
        })
    }

    /// The metrics of every role.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The global prefix of every key.
    pub fn global_prefix(&self) -> &str {
        &self.global_prefix
    }

    /// The backend every role's state lives in (unless loaded with its own).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The loaded roles, by name.
    pub fn roles(&self) -> Vec<Arc<Role>> {
        self.read_roles().values().cloned().collect()
    }

    fn read_roles(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Role>>> {
        self.roles.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Loads a role: checks its name, pin and grants, compiles it and links
    /// it against the `role` world.
    pub fn load(&self, spec: &RoleSpec) -> anyhow::Result<Arc<Role>> {
        self.load_with_backend(spec, self.backend.clone())
    }

    /// Like [`Host::load`], with a backend of the role's own (for example a
    /// Redis connection as the role's ACL user).
    pub fn load_with_backend(&self, spec: &RoleSpec, backend: Arc<dyn Backend>) -> anyhow::Result<Arc<Role>> {
        if self.read_roles().contains_key(&spec.name) {
            bail!("role `{}` is loaded twice; role names must be unique", spec.name);
        }
        let role = Arc::new(self.compile(spec, backend, None)?);
        let mut roles = self.roles.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if roles.contains_key(&spec.name) {
            bail!("role `{}` is loaded twice; role names must be unique", spec.name);
        }
        roles.insert(spec.name.clone(), role.clone());
        Ok(role)
    }

    /// Loads the role's component again from its file and swaps it in:
    /// calls in flight finish on the old version, new calls get the new
    /// one, state stays (same identity). A file that fails to load or fails
    /// its pin is refused and the old version keeps serving.
    ///
    /// Reloads run one at a time, so the last to finish read the newest
    /// file; old and new versions share the role's concurrency and
    /// per-second budgets. Compiling can take seconds (JS, Python): call it
    /// off the async runtime's threads.
    pub fn reload(&self, name: &str) -> anyhow::Result<Arc<Role>> {
        self.swap(name, None)
    }

    /// Like [`Host::reload`], with a new spec for the role of the same
    /// name (a changed manifest entry): new limits and grants apply to new
    /// calls. The concurrency budget carries over with its new limit (calls
    /// still running on the old version count against it); the per-second
    /// budget carries over unless its limit changed.
    pub fn reload_with(&self, spec: &RoleSpec) -> anyhow::Result<Arc<Role>> {
        self.swap(&spec.name, Some(spec))
    }

    fn swap(&self, name: &str, spec: Option<&RoleSpec>) -> anyhow::Result<Arc<Role>> {
        let _one_at_a_time = self.lock_reloads();
        let old = self.role(name).with_context(|| format!("no role `{name}` is loaded"))?;
        let new = Arc::new(self.compile(spec.unwrap_or(&old.spec), old.backend.clone(), Some(&old))?);
        let mut roles = self.roles.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(old) = roles.insert(name.to_owned(), new.clone()) {
            old.retire();
        }
        Ok(new)
    }

    /// Takes the role out: new calls are refused as an unknown role, calls
    /// in flight finish. Its state stays in the store.
    pub fn unload(&self, name: &str) -> Option<Arc<Role>> {
        // Not while a reload of it compiles, which would put it back.
        let _one_at_a_time = self.lock_reloads();
        let removed = self.roles.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(name);
        removed.inspect(|role| role.retire())
    }

    fn lock_reloads(&self) -> std::sync::MutexGuard<'_, ()> {
        self.reloading.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Checks, compiles and links one role; a new version of `old` shares
    /// its concurrency budget, and its per-second budget if the limit is
    /// the same.
    fn compile(&self, spec: &RoleSpec, backend: Arc<dyn Backend>, old: Option<&Role>) -> anyhow::Result<Role> {
        spec.validate()?;
        if self.options.pooling && spec.limits.max_memory_bytes > POOLED_MAX_MEMORY_BYTES {
            bail!(
                "role `{}` may use {} bytes of memory, more than the pooling allocator's {POOLED_MAX_MEMORY_BYTES}",
                spec.name,
                spec.limits.max_memory_bytes
            );
        }
        if spec.limits.fuel.is_some() && !self.options.fuel {
            bail!("role `{}` has a fuel limit, but the host does not count fuel", spec.name);
        }
        let bytes = crate::files::read_component(&spec.wasm)
            .with_context(|| format!("cannot read role component {}", spec.wasm.display()))?;
        let sha256 = sha256_hex(&bytes);
        if let Some(pin) = &spec.sha256 {
            if !pin.eq_ignore_ascii_case(&sha256) {
                bail!(
                    "{} has sha256 {sha256}, but the manifest pins role `{}` to {pin}; refusing to load it",
                    spec.wasm.display(),
                    spec.name
                );
            }
        }
        let compiled = match &self.options.cache {
            Some(cache) => cache.load(&self.engine, &sha256, &bytes),
            None => Component::from_binary(&self.engine, &bytes).map(|component| (component, false)),
        };
        let (component, from_cache) = compiled
            .map_err(|e| anyhow::anyhow!("{} is not a valid WebAssembly component: {e}", spec.wasm.display()))?;
        let pre = self.linker.instantiate_pre(&component).and_then(RolePre::new).map_err(|e| {
            anyhow::anyhow!("{} does not fit the rolehost:state/role world: {e:#}", spec.wasm.display())
        })?;
        let mut info = self.role_info(spec)?;
        let limits = &spec.limits;
        if let Some(old) = old.filter(|old| old.spec.limits.max_ops_per_second == limits.max_ops_per_second) {
            info.op_rate.clone_from(&old.info.op_rate);
        }
        Ok(Role {
            info: Arc::new(info),
            spec: spec.clone(),
            pre,
            sha256,
            from_cache,
            metered: Arc::new(Metered::new(backend.clone(), &spec.name, self.metrics.clone())),
            backend,
            slots: match old {
                Some(old) => {
                    old.slots.set_limit(limits.max_concurrency);
                    old.slots.clone()
                }
                None => Arc::new(Slots::new(limits.max_concurrency)),
            },
            metrics: self.metrics.role(&spec.name),
            warm: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
        })
    }

    fn role_info(&self, spec: &RoleSpec) -> anyhow::Result<RoleInfo> {
        let mut grants = BTreeMap::new();
        for (name, access) in &spec.grants.namespaces {
            let namespace = Arc::new(Namespace::shared(&self.global_prefix, name, &spec.limits));
            grants.insert(name.clone(), (namespace, *access));
        }
        // Checked first: a refused role leaves the largest values alone.
        let dir = checked_dir(spec.grants.dir.as_deref())?;
        Ok(RoleInfo {
            name: spec.name.clone(),
            namespace: Arc::new(Namespace::new(&self.global_prefix, &spec.name, &spec.limits)),
            limits: spec.limits.clone(),
            largest_value_bytes: self.largest_value_bytes(spec),
            grants,
            op_rate: spec.limits.max_ops_per_second.map(|n| Arc::new(Mutex::new(OpRate::new(n)))),
            env: granted_env(&spec.grants.env),
            dir,
        })
    }

    /// The largest `max-value-bytes` `spec`'s role has had in this process,
    /// its own included.
    fn largest_value_bytes(&self, spec: &RoleSpec) -> usize {
        let mut largest = self.largest_values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let largest = largest.entry(spec.name.clone()).or_default();
        *largest = (*largest).max(spec.limits.max_value_bytes);
        *largest
    }

    /// Looks up a loaded role.
    pub fn role(&self, name: &str) -> Option<Arc<Role>> {
        self.read_roles().get(name).cloned()
    }

    /// Calls `role`'s handler once with `request` in a fresh instance,
    /// unless the role or the host is at its concurrency limit (busy).
    pub async fn call(&self, role: &str, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let role = self.role(role).ok_or_else(|| CallError::UnknownRole(role.to_owned()))?;
        // Refused calls count as busy, as those the pool refuses do.
        let busy = |limit: String| {
            self.metrics.calls.with_label_values(&[role.info.name.as_str(), "busy"]).inc();
            CallError::Busy { role: role.info.name.clone(), limit }
        };
        let _host_slot = self
            .slots
            .try_acquire()
            .ok_or_else(|| busy(format!("the host runs its most calls at once ({})", self.options.max_concurrency)))?;
        let _role_slot = role.slots.try_acquire().ok_or_else(|| {
            busy(format!("it runs its max-concurrency of {} calls", role.info.limits.max_concurrency))
        })?;
        let mut counted = Counted::start(&self.metrics, &role);
        let result = self.run(&role, request).await;
        counted.outcome = Some(result.as_ref().map(|_| ()).map_err(CallError::kind));
        result
    }

    /// Sends a call's fire-and-forget writes in the background, counted
    /// in `flushes` so [`Host::settle`] can wait for them.
    fn send_later(&self, role: &Role, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        let (backend, name, flushes) = (role.metered.clone(), role.info.name.clone(), self.flushes.clone());
        let dropped = |why: &str| {
            tracing::warn!(role = %name, writes = writes.len(), "fire-and-forget writes dropped: {why}");
            self.metrics.deferred_writes.with_label_values(&[name.as_str(), "failed"]).inc_by(writes.len() as u64);
        };
        // None for a call dropped as its runtime shut down.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return dropped("no runtime left to send them");
        };
        let bytes = writes.iter().map(Write::size).sum();
        let max = self.options.max_unsent_bytes;
        let fits = flushes.bytes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            held.checked_add(bytes).filter(|&total| total <= max)
        });
        if fits.is_err() {
            return dropped(&format!("earlier calls' still unsent would hold over {max} bytes"));
        }
        flushes.running.fetch_add(1, Ordering::SeqCst);
        runtime.spawn(async move {
            if let Err(unsent) = backend.write_all(&writes).await {
                let (sent, failed, error) = (unsent.sent, writes.len() - unsent.sent, unsent.error);
                tracing::warn!(role = %name, sent, failed, %error, "fire-and-forget writes failed");
            }
            flushes.bytes.fetch_sub(bytes, Ordering::SeqCst);
            if flushes.running.fetch_sub(1, Ordering::SeqCst) == 1 {
                flushes.done.notify_waiters();
            }
        });
    }

    /// Drops every role's idle warm instances, freeing their pool slots.
    fn drop_warm_instances(&self) {
        for role in self.read_roles().values() {
            role.warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
        }
    }

    /// Waits until every fire-and-forget write queued by a finished call
    /// has been sent or has failed. Call it before the process exits.
    pub async fn settle(&self) {
        loop {
            let done = self.flushes.done.notified();
            if self.flushes.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    /// A new store for one of `role`'s instances: its limits and its log.
    /// (Its WASI context is made when the guest first uses WASI.)
    fn new_store(&self, role: &Role) -> Store<CallCtx> {
        let limits = &role.info.limits;
        let log = CallLog::new(&role.info.name, limits.max_log_bytes);
        let limiter = CallLimiter::new(limits.max_memory_bytes);
        let ctx = CallCtx::new(role.info.clone(), role.metered.clone(), limiter, log);
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|ctx| &mut ctx.limiter);
        // At every epoch tick the guest yields to the async runtime, so a
        // guest computing for long never holds up the other calls and
        // connections of its thread (a `serve` worker runs many); at the
        // call's deadline it traps. tokio's `yield_now` lets the runtime
        // poll its sockets and timers before the guest runs again.
        store.epoch_deadline_callback(|mut store| {
            let ticks = &mut store.data_mut().ticks_left;
            *ticks = ticks.saturating_sub(1);
            Ok(match *ticks {
                0 => UpdateDeadline::Interrupt,
                _ => UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())),
            })
        });
        store
    }

    async fn run(&self, role: &Role, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let name = || role.info.name.clone();
        let limits = &role.info.limits;
        // A warm instance from an earlier call, or a fresh store to
        // instantiate into.
        let (mut store, warm) = match role.take_warm() {
            Some((store, instance)) => (store, Some(instance)),
            None => (self.new_store(role), None),
        };
        let deadline = Duration::from_millis(limits.deadline_ms);
        store.data_mut().ticks_left = deadline.as_millis().div_ceil(EPOCH_TICK.as_millis()) as u64 + 1;
        store.set_epoch_deadline(1);
        if self.options.fuel {
            store
                .set_fuel(limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| CallError::Trap { role: name(), message: e.to_string() })?;
        }

        let run = async {
            let instance = match warm {
                Some(instance) => instance,
                None => match role.pre.instantiate_async(&mut store).await {
                    // Idle warm instances hold pool slots too: give them
                    // up for a call that needs one, and try once more.
                    Err(e) if e.is::<PoolConcurrencyLimitError>() => {
                        self.drop_warm_instances();
                        role.pre.instantiate_async(&mut store).await?
                    }
                    other => other?,
                },
            };
            let result = instance.rolehost_state_handler().call_handle(&mut store, request).await?;
            Ok::<_, wasmtime::Error>((result, instance))
        };
        let outcome = tokio::time::timeout(deadline + EPOCH_TICK * 2, run).await;
        // The handler returned: its queued writes go out once its locks
        // are released, or should its caller go away meanwhile, then.
        let returned = matches!(outcome, Ok(Ok(_)));
        let queued = Queued { host: self, role, writes: returned.then(|| store.data_mut().take_deferred()) };
        store.data_mut().release_held_locks().await;
        drop(queued);
        store.data().log.finish();
        let outcome = match outcome {
            Ok(Ok((result, instance))) => {
                // The instance may serve the next call.
                role.keep_warm(store, instance);
                Ok(Ok(result))
            }
            Ok(Err(trap)) => Ok(Err(classify_trap(&trap, store.data(), limits, name()))),
            Err(elapsed) => Err(elapsed),
        };
        let response = match outcome {
            Err(_) => return Err(CallError::DeadlineExceeded { role: name(), millis: limits.deadline_ms }),
            Ok(Err(error)) => return Err(error),
            Ok(Ok(Err(error))) => return Err(CallError::Role { role: name(), error: error.into() }),
            Ok(Ok(Ok(response))) => response,
        };
        if response.len() > limits.max_response_bytes {
            let error = StateError::TooLarge(format!(
                "response of {} bytes is over the limit of {} bytes",
                response.len(),
                limits.max_response_bytes
            ));
            return Err(CallError::Role { role: name(), error });
        }
        Ok(response)
    }
}

/// A returned call's queued writes, sent when this is dropped.
struct Queued<'a> {
    host: &'a Host,
    role: &'a Role,
    writes: Option<Vec<Write>>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(writes) = self.writes.take() {
            self.host.send_later(self.role, writes);
        }
    }
}

/// One call in the metrics, counted however it ends: with a result, or
/// dropped mid-call by a caller that went away (outcome `cancelled`).
struct Counted<'a> {
    metrics: &'a Metrics,
    role: &'a Role,
    start: Instant,
    outcome: Option<Result<(), &'static str>>,
}

impl<'a> Counted<'a> {
    fn start(metrics: &'a Metrics, role: &'a Role) -> Self {
        role.metrics.in_flight.inc();
        Self { metrics, role, start: Instant::now(), outcome: None }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let role = &self.role.metrics;
        role.in_flight.dec();
        role.call_seconds.observe(self.start.elapsed());
        let kind = match self.outcome {
            Some(Ok(())) => return role.calls_ok.inc(),
            Some(Err(kind)) => kind,
            None => "cancelled",
        };
        self.metrics.calls.with_label_values(&[self.role.info.name.as_str(), kind]).inc();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Tells the kinds of trap apart: deadline, fuel, memory, or another trap
/// (with one line saying which; the backtrace goes to the debug log).
fn classify_trap(trap: &wasmtime::Error, ctx: &CallCtx, limits: &RoleLimits, role: String) -> CallError {
    tracing::debug!(role = %role, "trap: {trap:?}");
    if trap.is::<PoolConcurrencyLimitError>() {
        // Every pool slot is in use by calls running now.
        return CallError::Busy { role, limit: "every instance slot of the host's pool is in use".into() };
    }
    match trap.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::DeadlineExceeded { role, millis: limits.deadline_ms },
        Some(Trap::OutOfFuel) => CallError::OutOfFuel { role, fuel: limits.fuel.unwrap_or_default() },
        _ if ctx.limiter.memory_refused => CallError::OutOfMemory { role, bytes: limits.max_memory_bytes },
        Some(trap) => CallError::Trap { role, message: trap.to_string() },
        None => CallError::Trap { role, message: format!("{trap:#}").lines().next().unwrap_or_default().to_owned() },
    }
}

/// The granted variables that are set in the host's environment.
fn granted_env(names: &[String]) -> Vec<(String, String)> {
    names.iter().filter_map(|name| Some((name.clone(), std::env::var(name).ok()?))).collect()
}

fn checked_dir(dir: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let Some(dir) = dir else { return Ok(None) };
    if !dir.is_dir() {
        bail!("granted directory {} does not exist or is not a directory", dir.display());
    }
    Ok(Some(dir.to_path_buf()))
}

fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("rolehost-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .context("cannot start the epoch thread")?;
    Ok(())
}
