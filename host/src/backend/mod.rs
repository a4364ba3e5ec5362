//! What a state store must do, and the stores that do it.
//!
//! Backends work on full keys (already prefixed by [`crate::namespace`]) and
//! give every operation the same semantics, TTL included, so one
//! conformance suite runs against all of them.

mod memory;
mod metered;
mod redis;

pub use self::memory::{MemoryBackend, DEFAULT_MAX_BYTES as MEMORY_DEFAULT_MAX_BYTES};
pub use self::metered::Metered;
pub use self::redis::{RedisBackend, RedisOptions};

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{StateError, StateResult};

/// How long a lock's fencing counter outlives the last token drawn from
/// it. A token is the backend clock's microseconds since 1970, or the
/// last token plus one when that is more, so after the counter is gone
/// the next token is still greater than every earlier one (unless the
/// clock stepped back a day), and lock names used once leave no key
/// behind for good.
pub const FENCE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The remaining lifetime of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No such key.
    Missing,
    /// The key never expires.
    Persistent,
    /// The key expires after this long.
    ExpiresIn(Duration),
}

/// One page of a key scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Full keys matching the pattern.
    pub keys: Vec<String>,
    /// Where to continue; none when the scan is complete. Opaque, and never
    /// holds a key prefix.
    pub cursor: Option<String>,
}

/// The outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the units were taken.
    pub allowed: bool,
    /// Units still available now.
    pub remaining: u64,
    /// Time until the limit is full again.
    pub reset_after: Duration,
    /// When denied, time until the same check would pass.
    pub retry_after: Duration,
}

/// What a backend says about itself when asked for health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `memory` or `redis`.
    pub kind: &'static str,
    /// Server facts: for Redis `redis_version`, `used_memory` (and
    /// `_human`, `_peak`), `connected_clients`, `keyspace_hits`,
    /// `keyspace_misses`, `expired_keys`, `evicted_keys`, `maxmemory` (summed
    /// over a Cluster's primaries), `rdb_last_save_time` (the oldest
    /// primary's), `maxmemory_policy`,
    /// `topology`, `primaries`, and `warning` when keys may be evicted.
    pub details: BTreeMap<String, String>,
}

/// A state store. Every method is atomic on its own; batch methods are
/// atomic as a whole (all or nothing).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs: `memory`, `redis`.
    fn kind(&self) -> &'static str;

    /// Reaches the store and reports on it; `unavailable` when it cannot.
    async fn health(&self) -> StateResult<Health>;

    /// The value of `key`. With `max_bytes` (keys others write, whose
    /// values no limit of the reader bounds), a larger value is refused as
    /// `too-large`, checked on the store before it reaches the host; so
    /// are the limits of the other reads that take one.
    async fn get(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>>;
    /// Writes `value`; persistent when `ttl` is none.
    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()>;
    /// True when `key` exists.
    async fn exists(&self, key: &str) -> StateResult<bool>;
    /// One answer per key, in order; `max_bytes` bounds their sum (see
    /// [`Backend::get`]).
    async fn get_many(&self, keys: &[String], max_bytes: Option<usize>) -> StateResult<Vec<Option<Vec<u8>>>>;
    /// Writes every entry in one atomic step.
    async fn set_many(&self, entries: &[(String, Vec<u8>)], ttl: Option<Duration>) -> StateResult<()>;
    /// Deletes the keys; the number that existed.
    async fn delete_many(&self, keys: &[String]) -> StateResult<u64>;
    /// The remaining lifetime of `key`.
    async fn expiry(&self, key: &str) -> StateResult<Expiry>;
    /// Sets a TTL (none: makes the key persistent); false when `key` is missing.
    async fn expire(&self, key: &str, ttl: Option<Duration>) -> StateResult<bool>;
    /// At most `limit` keys matching the glob `pattern`, from `cursor` on.
    /// A key present for the whole scan is returned exactly once… at least
    /// once on Redis, whose SCAN gives that weaker promise.
    async fn scan(&self, pattern: &str, cursor: Option<&str>, limit: usize) -> StateResult<ScanPage>;

    /// Adds `delta` to the integer at `key` (absent: 0), keeping its TTL.
    /// Operations that take a `fallback_ttl` give it to a key they leave
    /// without a TTL (a role's default TTL).
    async fn increment(&self, key: &str, delta: i64, fallback_ttl: Option<Duration>) -> StateResult<i64>;
    /// Writes only when `key` is absent; true when written.
    async fn set_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool>;
    /// When the value equals `expected` (none: absent), writes `new` (none:
    /// deletes); true when it did.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> StateResult<bool>;
    /// Returns the value and deletes the key in one step; `max_bytes` as
    /// for [`Backend::get`] (a refused value is kept).
    async fn get_and_delete(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>>;

    /// The value of one field of the hash at `key`; `max_bytes` as for
    /// [`Backend::get`].
    async fn hash_get(&self, key: &str, field: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>>;
    /// Every field of the hash at `key` (empty when absent); `too-large`
    /// when its fields and values, with [`READ_FIELD_COST`] for each field,
    /// come to more than `max_bytes`, checked before they reach the host.
    async fn hash_get_all(&self, key: &str, max_bytes: usize) -> StateResult<Vec<(String, Vec<u8>)>>;
    /// Writes and removes fields in one atomic step. A hash left empty is
    /// deleted; the key's TTL is kept.
    async fn hash_apply(
        &self,
        key: &str,
        set: &[(String, Vec<u8>)],
        remove: &[String],
        fallback_ttl: Option<Duration>,
    ) -> StateResult<()>;
    /// Adds `delta` to an integer field (absent: 0).
    async fn hash_increment(
        &self,
        key: &str,
        field: &str,
        delta: i64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<i64>;
    /// Adds `delta` to a numeric field (absent: 0).
    async fn hash_increment_float(
        &self,
        key: &str,
        field: &str,
        delta: f64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<f64>;
    /// When the field equals `expected` (none: absent), writes `new` (none:
    /// removes it); true when it did.
    async fn hash_compare_and_set(
        &self,
        key: &str,
        field: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<bool>;

    /// Takes the lock at `key` for `owner` when it is free, and returns the
    /// next value of the fencing counter at `fence_key` (see [`FENCE_TTL`]),
    /// in one atomic step.
    async fn lock_acquire(&self, key: &str, fence_key: &str, owner: &str, ttl: Duration) -> StateResult<Option<u64>>;
    /// Resets the TTL of `key` when it still holds `value`; true when it did.
    async fn expire_if_equal(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<bool>;

    /// GCRA: takes `cost` units of `limit` per `window` from the limiter at `key`.
    async fn rate_check(&self, key: &str, limit: u64, window: Duration, cost: u64) -> StateResult<RateDecision>;

    /// Sends queued fire-and-forget writes in order. Runs of sets with the
    /// same TTL go out as one `set_many`, runs of deletes as one
    /// `delete_many`, one after the other, so the common case is one round
    /// trip. The first run that fails stops the rest.
    async fn write_all(&self, writes: &[Write]) -> Result<(), Unsent> {
        let mut rest = writes;
        while let Some(first) = rest.first() {
            let run = rest.iter().take_while(|w| w.same_batch(first)).count();
            let (batch, tail) = rest.split_at(run);
            match first {
                Write::Set { ttl, .. } => {
                    let entries: Vec<(String, Vec<u8>)> = batch
                        .iter()
                        .filter_map(|w| match w {
                            Write::Set { key, value, .. } => Some((key.clone(), value.clone())),
                            Write::Delete { .. } => None,
                        })
                        .collect();
                    self.set_many(&entries, *ttl).await
                }
                Write::Delete { .. } => {
                    let keys: Vec<String> = batch.iter().map(|w| w.key().to_owned()).collect();
                    self.delete_many(&keys).await.map(drop)
                }
            }
            .map_err(|error| Unsent { sent: writes.len() - rest.len(), error })?;
            rest = tail;
        }
        Ok(())
    }

    /// Deletes every key matching `pattern`; the number deleted.
    async fn delete_matching(&self, pattern: &str) -> StateResult<u64> {
        const PAGE: usize = 500;
        let mut sweep = Sweep::default();
        while let Some(cursor) = sweep.next_cursor() {
            let page = self.scan(pattern, cursor.as_deref(), PAGE).await?;
            sweep.delete(self, page).await?;
        }
        Ok(sweep.deleted)
    }
}

/// Deleting listed keys page by page: each page's keys go, then the next
/// page is listed from its cursor, until a page comes without a cursor.
#[derive(Default)]
pub(crate) struct Sweep {
    /// Keys deleted so far.
    pub(crate) deleted: u64,
    cursor: Option<String>,
    done: bool,
}

impl Sweep {
    /// The cursor to list the next page from; none once done.
    pub(crate) fn next_cursor(&self) -> Option<Option<String>> {
        (!self.done).then(|| self.cursor.clone())
    }

    /// Deletes `page`'s keys and notes where the next page starts.
    pub(crate) async fn delete<B: Backend + ?Sized>(&mut self, backend: &B, page: ScanPage) -> StateResult<()> {
        if !page.keys.is_empty() {
            self.deleted += backend.delete_many(&page.keys).await?;
        }
        self.done = page.cursor.is_none();
        self.cursor = page.cursor;
        // Between pages, let the call's deadline fire (a backend that
        // never waits, like the memory store, would not otherwise).
        tokio::task::yield_now().await;
        Ok(())
    }
}

/// A fire-and-forget write, checked and queued during a call and sent
/// after it (see [`Backend::write_all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Write `value` at `key`, with an optional TTL.
    Set { key: String, value: Vec<u8>, ttl: Option<Duration> },
    /// Delete `key`.
    Delete { key: String },
}

impl Write {
    /// The full key written.
    pub fn key(&self) -> &str {
        match self {
            Write::Set { key, .. } | Write::Delete { key } => key,
        }
    }

    /// Bytes it holds: key and value.
    pub fn size(&self) -> usize {
        match self {
            Write::Set { key, value, .. } => key.len() + value.len(),
            Write::Delete { key } => key.len(),
        }
    }

    /// Whether `self` can go out in one batch with `other`.
    fn same_batch(&self, other: &Write) -> bool {
        match (self, other) {
            (Write::Set { ttl: a, .. }, Write::Set { ttl: b, .. }) => a == b,
            (Write::Delete { .. }, Write::Delete { .. }) => true,
            _ => false,
        }
    }
}

/// One GCRA step in integer microseconds; the memory backend runs it in
/// Rust and the Redis backend in Lua (`RATE_SCRIPT`), with the same math.
///
/// Each unit costs `interval = ceil(window / limit)`; the theoretical
/// arrival time (TAT) may run at most `limit * interval` ahead of now, so a
/// full limit can be spent at once and refills smoothly. Returns the
/// decision and, when units were taken, the new TAT.
pub(crate) fn gcra(tat: Option<u64>, now: u64, limit: u64, window: u64, cost: u64) -> (RateDecision, Option<u64>) {
    let interval = window.div_ceil(limit).max(1);
    let span = limit.saturating_mul(interval);
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat.saturating_add(cost.saturating_mul(interval));
    let micros = Duration::from_micros;
    if new_tat - now <= span {
        let decision = RateDecision {
            allowed: true,
            remaining: (span - (new_tat - now)) / interval,
            reset_after: micros(new_tat - now),
            retry_after: Duration::ZERO,
        };
        (decision, (cost > 0).then_some(new_tat))
    } else {
        let decision = RateDecision {
            allowed: false,
            remaining: span.saturating_sub(tat - now) / interval,
            reset_after: micros(tat - now),
            retry_after: micros(new_tat - now - span),
        };
        (decision, None)
    }
}

/// Fire-and-forget writes that did not all go out: the first `sent` did
/// (in order), the rest not, for `error`.
#[derive(Debug)]
pub struct Unsent {
    pub sent: usize,
    pub error: StateError,
}

/// What a field read whole ([`Backend::hash_get_all`]) counts against the
/// reader's limit beyond its name and value: the host and the guest hold
/// each as two strings, so many tiny fields are not free.
pub const READ_FIELD_COST: usize = 64;

/// A hash of `size` bytes asked for by a caller that takes `max_bytes`.
fn hash_too_large(size: usize, max_bytes: usize) -> StateError {
    StateError::TooLarge(format!("at least {size} bytes of fields and values, more than {max_bytes}"))
}

/// Values of at least `size` bytes asked for by a caller that takes `max_bytes`.
fn values_too_large(size: usize, max_bytes: usize) -> StateError {
    StateError::TooLarge(format!("at least {size} bytes of values, more than {max_bytes}"))
}
