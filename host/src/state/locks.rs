//! `rolehost:state/locks`: a lock is the key `{prefix}{identity}:lock:{name}`
//! holding its owner's random id, with a TTL; its fencing counter is
//! `{prefix}{identity}:fence:{name}`. Taking the lock and drawing the token
//! is one atomic step; extend and release compare the owner atomically.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use wasmtime::component::Resource;

use super::CallCtx;
use crate::backend::Backend;
use crate::bindings::locks::{Host, HostLock};
use crate::error::{StateError, StateResult};
use crate::namespace::Space;

/// Longest wait between two tries of a taken lock.
const MAX_RETRY_DELAY: Duration = Duration::from_millis(100);

/// A lock this call holds (or held).
pub struct Lock {
    name: String,
    key: String,
    owner: String,
    token: u64,
}

impl Lock {
    /// Host memory a lock's handle holds: its name, and its key and owner
    /// twice (the handle and the call's list of locks to release).
    fn bytes_of(name: &str, key: &str, owner: &str) -> usize {
        name.len() + 2 * (key.len() + owner.len())
    }
}

impl super::Handle for Lock {
    fn bytes(&self) -> usize {
        Self::bytes_of(&self.name, &self.key, &self.owner)
    }
}

/// An owner id unique across processes: random per process, then a counter.
fn new_owner() -> String {
    static PROCESS: LazyLock<u64> = LazyLock::new(|| RandomState::new().hash_one(std::process::id()));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:016x}-{}-{}", *PROCESS, std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl CallCtx {
    fn lock(&self, handle: &Resource<Lock>) -> StateResult<&Lock> {
        self.table.get(handle).map_err(|e| StateError::Internal(format!("bad lock handle: {e}")))
    }

    /// Releases every lock this call still holds; run when the call ends,
    /// however it ended. All at once, so Redis being down costs one
    /// operation timeout, not one per lock. They stay on the list until
    /// all are done: should the call be dropped meanwhile, `Drop` releases
    /// them (again: a release compares the owner, so a second is a no-op).
    pub(crate) async fn release_held_locks(&mut self) {
        if !self.held_locks.is_empty() {
            release_all(&*self.backend, &self.role.name, &self.held_locks).await;
            self.held_locks.clear();
        }
    }

    /// Off the call's list only once released (or found lost): should the
    /// release fail, or the call be dropped meanwhile, the lock is
    /// released at the end of the call.
    async fn release(&mut self, handle: &Resource<Lock>) -> StateResult<bool> {
        let lock = self.lock(handle)?;
        let (key, owner) = (lock.key.clone(), lock.owner.clone());
        let released = self.backend.compare_and_swap(&key, Some(owner.as_bytes()), None, None).await?;
        self.held_locks.retain(|(k, o)| !(k == &key && o == &owner));
        Ok(released)
    }
}

/// Releases `held` (key, owner) side by side.
async fn release_all(backend: &dyn Backend, role: &str, held: &[(String, String)]) {
    let releases = held.iter().map(|(key, owner)| async move {
        if let Err(e) = backend.compare_and_swap(key, Some(owner.as_bytes()), None, None).await {
            tracing::warn!(role = %role, "cannot release a lock at the end of the call: {e}");
        }
    });
    futures_util::future::join_all(releases).await;
}

/// A call whose caller went away (its future dropped mid-call) never
/// reaches `release_held_locks`; its locks are released in the background
/// rather than left taken until their TTL.
impl Drop for CallCtx {
    fn drop(&mut self) {
        if self.held_locks.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held_locks);
        let (backend, role) = (self.backend.clone(), self.role.name.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { release_all(&*backend, &role, &held).await })),
            Err(_) => {
                tracing::warn!(role = %role, locks = held.len(), "call dropped outside a runtime; its locks expire by TTL")
            }
        }
    }
}

impl CallCtx {
    /// A lock's TTL: required, and within the role's maximum TTL.
    fn lock_ttl(&self, ttl_ms: u64) -> StateResult<Duration> {
        Ok(self.write_ttl(Some(ttl_ms))?.unwrap_or_default())
    }
}

impl Host for CallCtx {}

impl CallCtx {
    /// Tries to take the lock at `key` for `owner` until `give_up`, with
    /// growing pauses; its fencing token, or `None` if it stayed taken.
    /// The wait is one operation (charged by `acquire`): its tries are
    /// paced by the pauses and bounded by the wait, so a role with a small
    /// per-second quota can wait as long as it asked.
    async fn take_lock(
        &mut self,
        key: &str,
        fence: &str,
        owner: &str,
        ttl: Duration,
        give_up: Instant,
    ) -> StateResult<Option<u64>> {
        let mut delay = Duration::from_millis(2);
        loop {
            if let Some(token) = self.backend.lock_acquire(key, fence, owner, ttl).await? {
                return Ok(Some(token));
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(None);
            }
            tokio::time::sleep(delay.min(give_up - now)).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }
}

impl HostLock for CallCtx {
    async fn acquire(
        &mut self,
        namespace: String,
        name: String,
        ttl_ms: u64,
        wait_ms: u64,
    ) -> StateResult<Option<Resource<Lock>>> {
        self.charge(1)?;
        let namespace = self.namespace(&namespace, true)?;
        let key = namespace.key(Space::Lock, &name)?;
        let fence = namespace.key(Space::Fence, &name)?;
        let ttl = self.lock_ttl(ttl_ms)?;
        let owner = new_owner();
        let give_up = Instant::now() + Duration::from_millis(wait_ms.min(self.role.limits.deadline_ms));
        // Noted as held before asking, so that a call dropped while Redis
        // takes the lock still releases it (or one whose answer was lost).
        // Releasing compares the owner: a lock never taken is left alone.
        // Its handle's memory is held first: a lock the guest could not be
        // handed is never taken.
        let bytes = super::HANDLE_BYTES + Lock::bytes_of(&name, &key, &owner);
        self.hold(bytes)?;
        self.held_locks.push((key.clone(), owner.clone()));
        let token = match self.take_lock(&key, &fence, &owner, ttl, give_up).await {
            Ok(Some(token)) => token,
            Err(error) => {
                self.unhold(bytes);
                // Perhaps taken with its answer lost: still released at the
                // end. Any other failure took nothing.
                if !matches!(error, StateError::Unavailable(_)) {
                    self.held_locks.retain(|(_, held)| *held != owner);
                }
                return Err(error);
            }
            Ok(None) => {
                self.unhold(bytes);
                self.held_locks.retain(|(_, held)| *held != owner);
                return Ok(None);
            }
        };
        let lock = Lock { name, key, owner, token };
        // (Should the table be full, the lock is released when the call ends.)
        Ok(Some(self.push_held(lock)?))
    }

    async fn token(&mut self, lock: Resource<Lock>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&lock)?.token)
    }

    async fn name(&mut self, lock: Resource<Lock>) -> wasmtime::Result<String> {
        Ok(self.table.get(&lock)?.name.clone())
    }

    async fn extend(&mut self, lock: Resource<Lock>, ttl_ms: u64) -> StateResult<bool> {
        self.charge(1)?;
        let ttl = self.lock_ttl(ttl_ms)?;
        let lock = self.lock(&lock)?;
        let (key, owner) = (lock.key.clone(), lock.owner.clone());
        self.backend.expire_if_equal(&key, owner.as_bytes(), ttl).await
    }

    async fn release(&mut self, lock: Resource<Lock>) -> StateResult<bool> {
        self.charge(1)?;
        CallCtx::release(self, &lock).await
    }

    async fn drop(&mut self, lock: Resource<Lock>) -> wasmtime::Result<()> {
        if let Err(e) = CallCtx::release(self, &lock).await {
            tracing::warn!(role = %self.role.name, "cannot release a dropped lock: {e}");
        }
        self.delete_handle(lock)?;
        Ok(())
    }
}
