//! The state API as the guest sees it: one file per WIT interface, each on
//! top of the [`Backend`] after the role's [`Namespace`] has turned local
//! keys into full keys.

pub(crate) mod atomics;
pub(crate) mod kv;
mod limits;
pub(crate) mod locks;
pub(crate) mod log;
pub(crate) mod subjects;
mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use self::kv::Bucket;
use self::log::{CallLog, Stream};
use crate::backend::{Backend, ScanPage, Write};
use crate::error::{shown, StateError, StateResult};
use crate::limits::{Access, RoleLimits, MAX_TTL_MS};
use crate::namespace::{Namespace, Space};
use crate::runtime::GUEST_DIR;

/// What the host knows about a loaded role, shared by all its calls.
#[derive(Debug)]
pub struct RoleInfo {
    /// The role's identity.
    pub name: String,
    /// Its part of the key space.
    pub namespace: Arc<Namespace>,
    /// Its limits.
    pub limits: RoleLimits,
    /// The largest `max-value-bytes` this role has had in this process
    /// (across reloads, and unloads and loads): lowering the limit leaves
    /// larger values in the store.
    pub largest_value_bytes: usize,
    /// Granted shared namespaces by name.
    pub grants: BTreeMap<String, (Arc<Namespace>, Access)>,
    /// The per-second budget of state operations, if limited.
    pub op_rate: Option<Arc<Mutex<OpRate>>>,
    /// Granted environment variables, with their values.
    pub env: Vec<(String, String)>,
    /// The granted directory, shown read-only at [`GUEST_DIR`].
    pub dir: Option<PathBuf>,
}

/// A token bucket of state operations per second, shared by a role's calls.
#[derive(Debug)]
pub struct OpRate {
    per_second: u64,
    tokens: f64,
    last: Instant,
}

impl OpRate {
    /// A full bucket of `per_second` operations.
    pub fn new(per_second: u64) -> Self {
        Self { per_second, tokens: per_second as f64, last: Instant::now() }
    }

    fn take(&mut self, n: u64) -> bool {
        if self.available() < n {
            return false;
        }
        self.tokens -= n as f64;
        true
    }

    /// Whole operations the bucket holds now, refilled for the time since.
    fn available(&mut self) -> u64 {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second as f64;
        self.tokens = (self.tokens + refill).min(self.per_second as f64);
        self.last = now;
        self.tokens as u64
    }
}

/// The data of one call's `Store`: everything a host function may touch.
pub struct CallCtx {
    pub(crate) role: Arc<RoleInfo>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) limiter: CallLimiter,
    pub(crate) log: CallLog,
    /// (key, owner) of every lock taken and not yet released.
    held_locks: Vec<(String, String)>,
    /// State operations so far in this call.
    ops: u64,
    /// Fire-and-forget writes, sent after the call.
    deferred: Vec<Write>,
    /// Bytes the host holds for this instance: queued writes and buffered
    /// subject writes. At most the role's memory limit, so a guest cannot
    /// park more in host memory than it may have in its own.
    held_bytes: usize,
    table: ResourceTable,
    /// Made on the guest's first WASI call: most calls make none.
    wasi: Option<WasiCtx>,
    /// Epoch ticks the call may still run for (its deadline).
    pub(crate) ticks_left: u64,
}

impl CallCtx {
    pub(crate) fn new(role: Arc<RoleInfo>, backend: Arc<dyn Backend>, limiter: CallLimiter, log: CallLog) -> Self {
        // WASI's handles (streams, pollables) share the table: at most as
        // many as the memory limit allows the state API's.
        let mut table = ResourceTable::new();
        table.set_max_capacity((role.limits.max_memory_bytes / HANDLE_BYTES).max(1024));
        Self {
            role,
            backend,
            limiter,
            log,
            held_locks: Vec::new(),
            ops: 0,
            deferred: Vec::new(),
            held_bytes: 0,
            table,
            wasi: None,
            ticks_left: 0,
        }
    }

    /// The bucket behind a guest handle.
    fn bucket(&self, handle: &Resource<Bucket>) -> StateResult<&Bucket> {
        self.table.get(handle).map_err(|e| StateError::Internal(format!("bad bucket handle: {e}")))
    }

    /// The most bytes one read may bring of values others write (those of
    /// a granted namespace, which no limit of this role bounded): none in
    /// the role's own namespace, whose values passed its own limits.
    fn read_limit(&self, shared: bool) -> Option<usize> {
        shared.then_some(self.role.limits.max_memory_bytes)
    }

    // Guards: every state operation passes through these, so each limit
    // and grant is enforced here and nowhere else.

    /// The namespace a guest names: "" is the role's own, any other must
    /// be granted, and for a write, granted read-write.
    fn namespace(&self, name: &str, write: bool) -> StateResult<&Arc<Namespace>> {
        if name.is_empty() {
            return Ok(&self.role.namespace);
        }
        match self.role.grants.get(name) {
            None => Err(StateError::AccessDenied(format!("namespace {} is not granted to this role", shown(name)))),
            Some((_, Access::Read)) if write => Err(StateError::AccessDenied(format!(
                "namespace {} is granted to this role for reading only",
                shown(name)
            ))),
            Some((namespace, _)) => Ok(namespace),
        }
    }

    /// Charges the rest of an operation that answered `n` items (names,
    /// properties) at one operation each, its first already paid.
    fn charge_rest(&mut self, n: usize) -> StateResult<()> {
        match n > 1 {
            true => self.charge(n - 1),
            false => Ok(()),
        }
    }

    /// Counts `n` state operations against the per-call and per-second quotas.
    fn charge(&mut self, n: usize) -> StateResult<()> {
        let n = n.max(1) as u64;
        let max = self.role.limits.max_ops_per_call;
        if self.ops + n > max {
            return Err(StateError::QuotaExceeded(format!("more than {max} state operations in one call")));
        }
        if let Some(rate) = &self.role.op_rate {
            let mut rate = rate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if n > rate.per_second {
                // Waiting would never help: say so rather than "retry later".
                return Err(StateError::TooLarge(format!(
                    "{n} operations at once are more than this role's {} per second",
                    rate.per_second
                )));
            }
            if !rate.take(n) {
                return Err(StateError::QuotaExceeded(format!(
                    "more than {} state operations per second",
                    rate.per_second
                )));
            }
        }
        self.ops += n;
        Ok(())
    }

    /// Operations the quotas allow now: what is left of the call's, and of
    /// the role's per second.
    fn ops_left(&self) -> usize {
        let per_call = self.role.limits.max_ops_per_call.saturating_sub(self.ops);
        let per_second = self
            .role
            .op_rate
            .as_ref()
            .map_or(u64::MAX, |rate| rate.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).available());
        usize::try_from(per_call.min(per_second)).unwrap_or(usize::MAX)
    }

    /// Readies a warm instance's context for its next call: fresh
    /// per-call quotas and log budget. (Queued writes were taken and locks
    /// released when the last call ended.)
    pub(crate) fn next_call(&mut self) {
        self.ops = 0;
        self.limiter.memory_refused = false;
        debug_assert!(self.deferred.is_empty() && self.held_locks.is_empty());
    }

    /// Queues a fire-and-forget write; at most a batch's worth per call.
    fn defer(&mut self, write: Write) -> StateResult<()> {
        let max = self.role.limits.max_batch_entries;
        if self.deferred.len() >= max {
            return Err(StateError::TooLarge(format!("more than {max} queued writes in one call")));
        }
        self.hold(write.size())?;
        self.deferred.push(write);
        Ok(())
    }

    /// The queued fire-and-forget writes, leaving none.
    pub(crate) fn take_deferred(&mut self) -> Vec<Write> {
        let deferred = std::mem::take(&mut self.deferred);
        self.unhold(deferred.iter().map(Write::size).sum());
        deferred
    }

    /// Counts `bytes` more held in host memory for the guest, if they fit.
    fn hold(&mut self, bytes: usize) -> StateResult<()> {
        let max = self.role.limits.max_memory_bytes;
        if self.held_bytes.saturating_add(bytes) > max {
            return Err(StateError::TooLarge(format!(
                "open handles, buffered and queued writes would hold more than {max} bytes (the role's memory limit); \
                 drop, store or discard some first"
            )));
        }
        self.held_bytes += bytes;
        Ok(())
    }

    /// Counts `bytes` no longer held.
    fn unhold(&mut self, bytes: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
    }

    /// Gives the guest a handle to `value`, whose host memory counts
    /// against the role's memory limit until the guest drops it: handles
    /// kept open, across calls of a warm instance too, cannot make the host
    /// hold more than that.
    fn push_handle<T: Handle>(&mut self, value: T) -> StateResult<Resource<T>> {
        self.hold(value.host_bytes())?;
        self.push_held(value)
    }

    /// [`CallCtx::push_handle`] for a value whose bytes were held already.
    fn push_held<T: Handle>(&mut self, value: T) -> StateResult<Resource<T>> {
        let bytes = value.host_bytes();
        self.table.push(value).map_err(|e| {
            self.unhold(bytes);
            StateError::Internal(format!("cannot open a handle: {e}"))
        })
    }

    /// Takes back a handle given by [`CallCtx::push_handle`].
    fn delete_handle<T: Handle>(&mut self, handle: Resource<T>) -> wasmtime::Result<T> {
        let value = self.table.delete(handle)?;
        self.unhold(value.host_bytes());
        Ok(value)
    }

    fn check_value(&self, value: &[u8]) -> StateResult<()> {
        let max = self.role.limits.max_value_bytes;
        if value.len() > max {
            return Err(StateError::TooLarge(format!(
                "value of {} bytes is over the limit of {max} bytes",
                value.len()
            )));
        }
        Ok(())
    }

    fn check_batch(&self, len: usize) -> StateResult<()> {
        let max = self.role.limits.max_batch_entries;
        if len > max {
            return Err(StateError::TooLarge(format!("batch of {len} entries is over the limit of {max}")));
        }
        Ok(())
    }

    /// The TTL of a write: the guest's, checked against the role's maximum,
    /// or the role's default when the guest gives none.
    fn write_ttl(&self, ttl_ms: Option<u64>) -> StateResult<Option<Duration>> {
        self.role.limits.write_ttl(ttl(ttl_ms)?).map_err(StateError::InvalidArgument)
    }

    /// The TTL for `expire`: none (persist) is refused when the role has a
    /// maximum TTL.
    fn expire_ttl(&self, ttl_ms: Option<u64>) -> StateResult<Option<Duration>> {
        match (ttl_ms, self.role.limits.max_ttl_ms) {
            (None, Some(max)) => Err(StateError::InvalidArgument(format!(
                "this role's keys expire within {max} ms; they cannot be made persistent"
            ))),
            (None, None) => Ok(None),
            (Some(_), _) => self.write_ttl(ttl_ms),
        }
    }

    /// The TTL given to keys an operation leaves without one (increments,
    /// subject writes).
    fn default_ttl(&self) -> Option<Duration> {
        self.role.limits.default_ttl()
    }

    /// One page of local names in `space` matching a guest pattern.
    async fn list_names(
        &mut self,
        namespace: &Namespace,
        space: Space,
        pattern: Option<String>,
        cursor: Option<String>,
        limit: u32,
    ) -> StateResult<(Vec<String>, Option<String>)> {
        let page = self.scan_page(namespace, space, pattern, cursor, limit).await?;
        let names = page.keys.iter().filter_map(|full| namespace.local(space, full)).map(str::to_owned).collect();
        Ok((names, page.cursor))
    }

    /// One page of full keys in `space` matching a guest pattern, charged
    /// an operation per key (at least one).
    async fn scan_page(
        &mut self,
        namespace: &Namespace,
        space: Space,
        pattern: Option<String>,
        cursor: Option<String>,
        limit: u32,
    ) -> StateResult<ScanPage> {
        if limit == 0 {
            return Err(StateError::InvalidArgument("limit must be at least 1".into()));
        }
        // A page costs an operation per name it holds (at least one), and
        // asks for no more than the quotas have left, so listing works for
        // a role whose quotas are below the page size a guest asks for.
        let limit = (limit as usize).min(self.role.limits.max_batch_entries).min(self.ops_left()).max(1);
        self.charge(1)?;
        let pattern = namespace.pattern(space, pattern.as_deref())?;
        let page = self.backend.scan(&pattern, cursor.as_deref(), limit).await?;
        self.charge_rest(page.keys.len())?;
        // Names in a granted namespace passed no limit of this role: a page
        // of them the guest could not hold is refused, not handed over.
        let bytes: usize = page.keys.iter().map(String::len).sum();
        let max = self.role.limits.max_memory_bytes;
        if bytes > max {
            return Err(StateError::TooLarge(format!(
                "these {} names come to {bytes} bytes, more than the role's memory limit of {max} bytes; \
                 ask for fewer at once",
                page.keys.len()
            )));
        }
        Ok(page)
    }
}

/// A store's `too-large` for a read, said in terms of the role's memory
/// limit.
fn over_memory(error: StateError) -> StateError {
    match error {
        StateError::TooLarge(size) => {
            StateError::TooLarge(format!("{size} bytes (the role's memory limit): the guest could not hold it"))
        }
        other => other,
    }
}

/// A guest TTL in milliseconds as a duration: zero and over 100 years are refused.
fn ttl(ttl_ms: Option<u64>) -> StateResult<Option<Duration>> {
    match ttl_ms {
        None => Ok(None),
        Some(0) => Err(StateError::InvalidArgument("a TTL must be at least 1 ms".into())),
        Some(ms) if ms > MAX_TTL_MS => {
            Err(StateError::InvalidArgument(format!("a TTL of {ms} ms is over the maximum of {MAX_TTL_MS} ms")))
        }
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
    }
}

/// Limits an instance's memories and tables, and remembers a refused
/// memory growth so an out-of-memory trap can be told apart.
/// `max-memory-bytes` bounds all of a store's linear memories together (a
/// component may declare many), and the counts of memories, tables and
/// instances are small.
pub struct CallLimiter {
    max_memory_bytes: usize,
    /// Bytes of all the store's memories so far.
    memory_bytes: usize,
    /// The growth last allowed, taken back if it then fails.
    last_growth: usize,
    pub(crate) memory_refused: bool,
}

/// Most elements of one table (function references, resource handles).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Most linear memories, tables and core instances one store may hold: far
/// above what a Rust, C, JavaScript or Python role needs (1–2 memories,
/// a few tables, under 20 instances), as the pooling allocator's bounds.
const MAX_MEMORIES: usize = 4;
const MAX_TABLES: usize = 16;
const MAX_INSTANCES: usize = 32;

/// Host memory a handle takes beside what it holds: its table entry (and
/// the guest's own), about.
const HANDLE_BYTES: usize = 64;

/// What a guest handle (bucket, subject, lock) holds in host memory.
trait Handle: Send + 'static {
    /// Bytes of what it holds (names, keys), its table entry not counted.
    fn bytes(&self) -> usize;

    /// All it takes: what it holds and its table entry.
    fn host_bytes(&self) -> usize {
        HANDLE_BYTES + self.bytes()
    }
}

impl CallLimiter {
    pub(crate) fn new(max_memory_bytes: usize) -> Self {
        Self { max_memory_bytes, memory_bytes: 0, last_growth: 0, memory_refused: false }
    }
}

impl wasmtime::ResourceLimiter for CallLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Called for a memory's first pages too (current 0). Past the
        // memory's own maximum the growth fails anyway: not ours to count.
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        let growth = desired.saturating_sub(current);
        let total = self.memory_bytes.saturating_add(growth);
        let ok = total <= self.max_memory_bytes;
        if ok {
            self.memory_bytes = total;
            self.last_growth = growth;
        }
        self.memory_refused |= !ok;
        Ok(ok)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Allowed here but refused after (say, by the system): not held.
        self.memory_bytes = self.memory_bytes.saturating_sub(std::mem::take(&mut self.last_growth));
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }
}

/// A WASI context for one of `role`'s instances: its log as stdout and
/// stderr, and only the granted environment variables and directory.
fn wasi_ctx(role: &RoleInfo, log: &CallLog) -> WasiCtx {
    let mut builder = WasiCtxBuilder::new();
    builder.stdout(log.sink(Stream::Stdout)).stderr(log.sink(Stream::Stderr)).envs(&role.env);
    if let Some(dir) = &role.dir {
        // Checked at load; if it has gone since, the guest sees no directory.
        if let Err(error) = builder.preopened_dir(dir, GUEST_DIR, FsPerms::ReadOnly) {
            tracing::warn!(role = %role.name, dir = %dir.display(), %error, "granted directory unavailable");
        }
    }
    builder.build()
}

impl WasiView for CallCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = self.wasi.get_or_insert_with(|| wasi_ctx(&self.role, &self.log));
        WasiCtxView { ctx: wasi, table: &mut self.table }
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter as _;

    use super::*;

    #[test]
    fn the_memory_limit_holds_for_all_memories_together() {
        let mut limiter = CallLimiter::new(64 << 20);
        // Two memories of 40 MiB: the second is refused, as its growth would be.
        assert!(limiter.memory_growing(0, 40 << 20, None).unwrap());
        assert!(!limiter.memory_growing(0, 40 << 20, None).unwrap());
        assert!(limiter.memory_refused);
        // The first may still grow within what is left, and no further.
        assert!(limiter.memory_growing(40 << 20, 60 << 20, None).unwrap());
        assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
        assert!(!limiter.memory_growing(4 << 20, (4 << 20) + 1, None).unwrap());
        assert!(limiter.memories() <= 4 && limiter.tables() <= 16 && limiter.instances() <= 32);
        // A growth past a memory's own maximum, or one that fails after
        // this allowed it, is not counted.
        let mut limiter = CallLimiter::new(64 << 20);
        assert!(!limiter.memory_growing(0, 32 << 20, Some(16 << 20)).unwrap());
        assert!(!limiter.memory_refused, "refused by the memory's maximum, not ours");
        assert!(limiter.memory_growing(0, 40 << 20, None).unwrap());
        limiter.memory_grow_failed(wasmtime::Error::msg("no memory")).unwrap();
        assert!(limiter.memory_growing(0, 60 << 20, None).unwrap(), "the failed 40 MiB still counted");
    }
}
