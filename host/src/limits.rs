//! Per-role limits and grants, with defaults an operator can override in
//! the manifest. Enforced in `state` (state limits, grants) and `runtime`
//! (memory, deadline, fuel).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What one role may do. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoleLimits {
    /// Longest local key (or subject, property, lock name), in bytes (default 1024).
    pub max_key_bytes: usize,
    /// Largest value, in bytes (default 1 MiB).
    pub max_value_bytes: usize,
    /// Most keys or entries in one batch call or subject store (default 1000).
    pub max_batch_entries: usize,
    /// Most state operations in one call; a batch counts one per entry
    /// (default 100 000).
    pub max_ops_per_call: u64,
    /// Most state operations per second across all calls of the role in
    /// this process (default: no limit).
    pub max_ops_per_second: Option<u64>,
    /// Calls of this role running at once; past it a call is refused as
    /// busy rather than queued (default 256).
    pub max_concurrency: usize,
    /// Largest response body a handler may return (default 16 MiB).
    pub max_response_bytes: usize,
    /// Largest linear memory of one instance, in bytes (default 64 MiB).
    pub max_memory_bytes: usize,
    /// Wall-clock deadline of one call, in milliseconds (default 10 s).
    pub deadline_ms: u64,
    /// Fuel (wasm instructions, roughly) one call may burn (default: none,
    /// only the deadline). Deterministic, at a small cost in speed.
    pub fuel: Option<u64>,
    /// Most bytes of log and stdout/stderr one call may write (default 64 KiB).
    pub max_log_bytes: usize,
    /// TTL given to keys the role writes without one (default: none,
    /// persistent; with `max-ttl-ms` set, that maximum).
    pub default_ttl_ms: Option<u64>,
    /// Longest TTL the role may ask for; a longer one, or making a key
    /// persistent, is refused with `invalid-argument` (default: none).
    pub max_ttl_ms: Option<u64>,
    /// Instances kept between calls and reused (default 0: a fresh instance
    /// for every call). Saves instantiation, which matters for big JS and
    /// Python components, at the cost of isolation between calls of the
    /// same role: what one call leaves in memory, the next can see. An
    /// instance that traps or misses its deadline is dropped, not reused.
    pub warm_instances: usize,
}

impl Default for RoleLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_batch_entries: 1000,
            max_ops_per_call: 100_000,
            max_ops_per_second: None,
            max_concurrency: 256,
            max_response_bytes: 16 << 20,
            max_memory_bytes: 64 << 20,
            deadline_ms: 10_000,
            fuel: None,
            max_log_bytes: 64 << 10,
            default_ttl_ms: None,
            max_ttl_ms: None,
            warm_instances: 0,
        }
    }
}

/// How a role may use a shared namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Reads only; every write is `access-denied`.
    Read,
    /// Reads and writes.
    ReadWrite,
}

/// What a role is granted beyond its own namespace. Nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grants {
    /// Shared namespaces by name, with the access to each.
    pub namespaces: BTreeMap<String, Access>,
    /// Host environment variables the role may read (passed through by
    /// name; an unset variable is left out).
    pub env: Vec<String>,
    /// A host directory the role may read, mounted read-only at `/data`.
    pub dir: Option<PathBuf>,
}
