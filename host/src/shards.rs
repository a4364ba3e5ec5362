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
    /// This thread's shard: a worker's by its id (so that workers started
    /// together get different ones), other threads' in turn as they first
    /// ask (past [`count`] threads, some share one).
    pub(crate) fn mine(&self) -> &T {
        let worker = crate::workers::current();
        if worker != 0 {
            return self.of(worker);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc, Barrier};

    #[test]
    fn workers_started_together_get_shards_of_their_own() {
        let sharded: Arc<Sharded<u8>> = Arc::default();
        let workers = crate::workers::Workers::start(2).unwrap();
        let (go, (send, shards)) = (Arc::new(Barrier::new(3)), mpsc::channel());
        let address = |sharded: &Sharded<u8>| sharded.mine() as *const u8 as usize;
        let (first, second) = ((sharded.clone(), go.clone(), send.clone()), (sharded.clone(), go.clone(), send));
        // The first stays busy until the second has started, so each has
        // a worker of its own; in between, so many threads ask that shards
        // handed out in turn would come round to the first one again.
        workers.spawn(move || async move {
            let _ = first.2.send(address(&first.0));
            first.1.wait();
        });
        workers.spawn(move || async move {
            second.1.wait();
            let _ = second.2.send(address(&second.0));
        });
        let a = shards.recv().unwrap();
        for _ in 1..count() {
            let sharded = sharded.clone();
            std::thread::spawn(move || address(&sharded)).join().unwrap();
        }
        go.wait();
        assert_ne!(a, shards.recv().unwrap());
    }
}
