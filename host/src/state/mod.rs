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

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use self::kv::Bucket;
use self::log::CallLog;
use crate::backend::Backend;
use crate::error::{StateError, StateResult};
use crate::limits::RoleLimits;
use crate::namespace::{Namespace, Space};

/// Longest TTL a guest may ask for: 100 years. Longer is surely a mistake
/// (and overflows Redis's clock arithmetic).
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// What the host knows about a loaded role, shared by all its calls.
#[derive(Debug)]
pub struct RoleInfo {
    /// The role's identity.
    pub name: String,
    /// Its part of the key space.
    pub namespace: Arc<Namespace>,
    /// Its limits.
    pub limits: RoleLimits,
}

/// The data of one call's `Store`: everything a host function may touch.
pub struct CallCtx {
    pub(crate) role: Arc<RoleInfo>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) limiter: StoreLimits,
    pub(crate) log: CallLog,
    /// (key, owner) of every lock taken and not yet released.
    held_locks: Vec<(String, String)>,
    table: ResourceTable,
    wasi: WasiCtx,
}

impl CallCtx {
    pub(crate) fn new(
        role: Arc<RoleInfo>,
        backend: Arc<dyn Backend>,
        limiter: StoreLimits,
        log: CallLog,
        wasi: WasiCtx,
    ) -> Self {
        Self {
            role,
            backend,
            limiter,
            log,
            held_locks: Vec::new(),
            table: ResourceTable::new(),
            wasi,
        }
    }

    /// The bucket behind a guest handle.
    fn bucket(&self, handle: &Resource<Bucket>) -> StateResult<&Bucket> {
        self.table
            .get(handle)
            .map_err(|e| StateError::Internal(format!("bad bucket handle: {e}")))
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

    /// One page of local names in `space` matching a guest pattern.
    async fn list_names(
        &mut self,
        namespace: &Namespace,
        space: Space,
        pattern: Option<String>,
        cursor: Option<String>,
        limit: u32,
    ) -> StateResult<(Vec<String>, Option<String>)> {
        if limit == 0 {
            return Err(StateError::InvalidArgument(
                "limit must be at least 1".into(),
            ));
        }
        let limit = (limit as usize).min(self.role.limits.max_batch_entries);
        let pattern = namespace.pattern(space, pattern.as_deref())?;
        let page = self
            .backend
            .scan(&pattern, cursor.as_deref(), limit)
            .await?;
        let names = page
            .keys
            .iter()
            .filter_map(|full| namespace.local(space, full))
            .map(str::to_owned)
            .collect();
        Ok((names, page.cursor))
    }

    fn check_batch(&self, len: usize) -> StateResult<()> {
        let max = self.role.limits.max_batch_entries;
        if len > max {
            return Err(StateError::TooLarge(format!(
                "batch of {len} entries is over the limit of {max}"
            )));
        }
        Ok(())
    }
}

/// A guest TTL in milliseconds as a duration: zero and over 100 years are refused.
fn ttl(ttl_ms: Option<u64>) -> StateResult<Option<Duration>> {
    match ttl_ms {
        None => Ok(None),
        Some(0) => Err(StateError::InvalidArgument(
            "a TTL must be at least 1 ms".into(),
        )),
        Some(ms) if ms > MAX_TTL_MS => Err(StateError::InvalidArgument(format!(
            "a TTL of {ms} ms is over the maximum of {MAX_TTL_MS} ms"
        ))),
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
    }
}

impl WasiView for CallCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
