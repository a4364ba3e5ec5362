//! Per-role limits and grants, with defaults an operator can override in
//! the manifest. Enforced in `state` (state limits, grants) and `runtime`
//! (memory, deadline, fuel).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

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

/// Longest TTL anything may have: 100 years. Longer is surely a mistake
/// (and overflows Redis's clock arithmetic).
pub const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// Longest call deadline: a day.
pub const MAX_DEADLINE_MS: u64 = 24 * 3600 * 1000;
/// Most calls at once, of a role or of the host.
pub const MAX_CONCURRENCY: usize = 1 << 20;
/// Longest `max-key-bytes`: a key of 64 KiB is already surely a mistake,
/// and patterns take twice the limit.
pub const MAX_KEY_BYTES: usize = 64 << 10;

impl RoleLimits {
    /// The TTL given to keys written without one: the default, else the
    /// maximum.
    pub fn default_ttl(&self) -> Option<Duration> {
        self.default_ttl_ms.or(self.max_ttl_ms).map(Duration::from_millis)
    }

    /// The TTL of a write asking for `ttl`: that, if within the maximum
    /// (a longer one is refused, not clamped), or the default when none.
    pub fn write_ttl(&self, ttl: Option<Duration>) -> Result<Option<Duration>, String> {
        match (ttl, self.max_ttl_ms) {
            (None, _) => Ok(self.default_ttl()),
            (Some(ttl), Some(max)) if ttl > Duration::from_millis(max) => {
                Err(format!("a TTL of {} ms is over this role's maximum of {max} ms", ttl.as_millis()))
            }
            (ttl, _) => Ok(ttl),
        }
    }

    /// Checks that the limits make sense together: nothing that must be
    /// positive is zero, nothing is past what the host can honour, and the
    /// default TTL is within the maximum. Says which limit is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max-key-bytes", self.max_key_bytes as u64),
            ("max-value-bytes", self.max_value_bytes as u64),
            ("max-batch-entries", self.max_batch_entries as u64),
            ("max-ops-per-call", self.max_ops_per_call),
            ("max-concurrency", self.max_concurrency as u64),
            ("max-memory-bytes", self.max_memory_bytes as u64),
            ("deadline-ms", self.deadline_ms),
        ];
        let optional = [
            ("max-ops-per-second", self.max_ops_per_second),
            ("fuel", self.fuel),
            ("default-ttl-ms", self.default_ttl_ms),
            ("max-ttl-ms", self.max_ttl_ms),
        ];
        let optional = optional.iter().filter_map(|(name, value)| Some((*name, (*value)?)));
        if let Some((name, _)) = positive.into_iter().chain(optional).find(|(_, value)| *value == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        let at_most = [
            ("max-key-bytes", self.max_key_bytes as u64, MAX_KEY_BYTES as u64),
            ("max-concurrency", self.max_concurrency as u64, MAX_CONCURRENCY as u64),
            ("warm-instances", self.warm_instances as u64, self.max_concurrency as u64),
            ("deadline-ms", self.deadline_ms, MAX_DEADLINE_MS),
            ("default-ttl-ms", self.default_ttl_ms.unwrap_or(0), self.max_ttl_ms.unwrap_or(MAX_TTL_MS)),
            ("max-ttl-ms", self.max_ttl_ms.unwrap_or(0), MAX_TTL_MS),
        ];
        match at_most.into_iter().find(|(_, value, max)| value > max) {
            Some((name, value, max)) => Err(format!("{name} is {value}, more than the most it may be, {max}")),
            None => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(limits: RoleLimits) -> Result<(), String> {
        limits.validate()
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(check(RoleLimits::default()), Ok(()));
    }

    #[test]
    fn limits_the_host_cannot_honour_are_refused_by_name() {
        let cases = [
            (RoleLimits { max_concurrency: usize::MAX, ..Default::default() }, "max-concurrency is"),
            (RoleLimits { max_key_bytes: 1 << 63, ..Default::default() }, "max-key-bytes is"),
            (RoleLimits { max_concurrency: 0, ..Default::default() }, "max-concurrency must be at least 1"),
            (RoleLimits { deadline_ms: u64::MAX, ..Default::default() }, "deadline-ms is"),
            (RoleLimits { deadline_ms: 0, ..Default::default() }, "deadline-ms must be at least 1"),
            (RoleLimits { default_ttl_ms: Some(u64::MAX), ..Default::default() }, "default-ttl-ms is"),
            (RoleLimits { default_ttl_ms: Some(0), ..Default::default() }, "default-ttl-ms must be at least 1"),
            (RoleLimits { max_ttl_ms: Some(MAX_TTL_MS + 1), ..Default::default() }, "max-ttl-ms is"),
            (
                RoleLimits { default_ttl_ms: Some(2000), max_ttl_ms: Some(1000), ..Default::default() },
                "default-ttl-ms is 2000, more than the most it may be, 1000",
            ),
            (RoleLimits { max_ops_per_second: Some(0), ..Default::default() }, "max-ops-per-second must be"),
            (RoleLimits { max_batch_entries: 0, ..Default::default() }, "max-batch-entries must be"),
            (RoleLimits { warm_instances: 300, ..Default::default() }, "warm-instances is 300"),
        ];
        for (limits, expected) in cases {
            let error = check(limits.clone()).expect_err(&format!("{limits:?} was accepted"));
            assert!(error.starts_with(expected), "{error:?} does not start with {expected:?}");
        }
        let edge = RoleLimits {
            default_ttl_ms: Some(1000),
            max_ttl_ms: Some(1000),
            warm_instances: 256,
            max_key_bytes: MAX_KEY_BYTES,
            ..Default::default()
        };
        assert_eq!(check(edge), Ok(()));
    }
}
