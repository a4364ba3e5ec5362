//! A value kept in shards, each on cache lines of its own, so that threads
//! working at once do not pass one line to and fro: a write to a line
//! another core wrote last waits for it to come over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Shards of `T`: as many as [`count`].
pub(crate) struct Sharded<T>(Box<[Padded<T>]>);

/// 128 bytes: x86 fetches cache lines in pairs.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Self((0..count()).map(|_| Padded::default()).collect())
    }
}

impl<T> Sharded<T> {
    /// This thread's shard: threads take them in turn as they first ask
    /// (past [`count`] threads, some share one).
    pub(crate) fn mine(&self) -> &T {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % count();
        }
        &self.0[SHARD.with(|shard| *shard)].0
    }

    /// The shard of `key` (consecutive keys get different ones).
    pub(crate) fn of(&self, key: u64) -> &T {
        &self.0[(key % self.0.len() as u64) as usize].0
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|padded| &padded.0)
    }
}

/// Shards per value: twice the cores, at least 2 and at most 64.
pub(crate) fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores * 2).clamp(2, 64)
    })
}
