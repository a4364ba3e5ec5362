//! Concurrency budgets: how many calls may run at once, refused (not
//! queued) past it, with a limit that can change while calls run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};

/// A budget of `limit` calls at once. Lowering the limit below the calls
/// running keeps them counted: their slots are retired as they finish
/// instead of being handed to new calls.
pub(crate) struct Slots {
    free: Semaphore,
    limit: Mutex<usize>,
    /// Slots to retire as running calls finish.
    owed: AtomicUsize,
}

/// One running call's slot, given back (or retired) when dropped.
pub(crate) struct Slot<'a> {
    permit: Option<SemaphorePermit<'a>>,
    owed: &'a AtomicUsize,
}

impl Slots {
    pub(crate) fn new(limit: usize) -> Self {
        Self { free: Semaphore::new(limit), limit: Mutex::new(limit), owed: AtomicUsize::new(0) }
    }

    /// A slot if one is free.
    pub(crate) fn try_acquire(&self) -> Option<Slot<'_>> {
        let permit = self.free.try_acquire().ok()?;
        Some(Slot { permit: Some(permit), owed: &self.owed })
    }

    /// Sets a new limit; calls running keep their slots.
    pub(crate) fn set_limit(&self, new: usize) {
        let mut limit = self.limit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if new >= *limit {
            // Cancel what is owed first, then free the rest.
            let mut grow = new - *limit;
            let _ = self.owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| {
                let cancelled = owed.min(grow);
                grow -= cancelled;
                Some(owed - cancelled)
            });
            self.free.add_permits(grow);
        } else {
            let shrink = *limit - new;
            let retired = self.free.forget_permits(shrink);
            self.owed.fetch_add(shrink - retired, Ordering::SeqCst);
        }
        *limit = new;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let retire = self.owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| owed.checked_sub(1)).is_ok();
        if let Some(permit) = self.permit.take() {
            if retire {
                permit.forget();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_limit_counts_the_calls_still_running() {
        let slots = Slots::new(3);
        let running: Vec<_> = (0..3).map(|_| slots.try_acquire().unwrap()).collect();
        slots.set_limit(1);
        let mut running = running.into_iter();
        drop(running.next());
        assert!(slots.try_acquire().is_none(), "two still run against a limit of one");
        drop(running.next());
        assert!(slots.try_acquire().is_none(), "one still runs against a limit of one");
        drop(running.next());
        let one = slots.try_acquire().expect("nothing runs");
        assert!(slots.try_acquire().is_none(), "the limit is one");
        drop(one);
        assert!(slots.try_acquire().is_some());
    }

    #[test]
    fn a_raised_limit_cancels_what_is_owed_first() {
        let slots = Slots::new(4);
        let running: Vec<_> = (0..3).map(|_| slots.try_acquire().unwrap()).collect();
        slots.set_limit(2); // one free slot retired, one owed
        slots.set_limit(5); // the owed one cancelled, two freed
        let more: Vec<_> = std::iter::from_fn(|| slots.try_acquire()).take(10).collect();
        assert_eq!(more.len(), 2, "5 at once, 3 of them running");
        drop(running);
        drop(more);
        let all: Vec<_> = std::iter::from_fn(|| slots.try_acquire()).take(10).collect();
        assert_eq!(all.len(), 5);
    }
}
