//! Per-role limits on state use, with defaults an operator can override in
//! the manifest.

use serde::Deserialize;

/// What one role may do with its state. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoleLimits {
    /// Longest local key, in bytes (default 1024).
    pub max_key_bytes: usize,
    /// Largest value, in bytes (default 1 MiB).
    pub max_value_bytes: usize,
    /// Most keys or entries in one batch call (default 1000).
    pub max_batch_entries: usize,
    /// Largest response body a handler may return (default 16 MiB).
    pub max_response_bytes: usize,
    /// Largest linear memory of one instance, in bytes (default 64 MiB).
    pub max_memory_bytes: usize,
    /// Wall-clock deadline of one call, in milliseconds (default 10 s).
    pub deadline_ms: u64,
    /// Most bytes of log and stdout/stderr one call may write (default 64 KiB).
    pub max_log_bytes: usize,
}

impl Default for RoleLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_batch_entries: 1000,
            max_response_bytes: 16 << 20,
            max_memory_bytes: 64 << 20,
            deadline_ms: 10_000,
            max_log_bytes: 64 << 10,
        }
    }
}
