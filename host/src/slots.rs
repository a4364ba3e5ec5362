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
    slots: &'a Slots,
}

impl Slots {
    pub(crate) fn new(limit: usize) -> Self {
        Self { free: Semaphore::new(limit), limit: Mutex::new(limit), owed: AtomicUsize::new(0) }
    }

    /// A slot if one is free.
    pub(crate) fn try_acquire(&self) -> Option<Slot<'_>> {
        let permit = self.free.try_acquire().ok()?;
        Some(Slot { permit: Some(permit), slots: self })
    }

    /// Sets a new limit; calls running keep their slots.
    pub(crate) fn set_limit(&self, new: usize) {
        let mut limit = self.limit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if new >= *limit {
            // Cancel what is owed first, then free the rest.
            let (wanted, mut grow) = (new - *limit, 0);
            let _ = self.owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| {
                let cancelled = owed.min(wanted);
                grow = wanted - cancelled;
                Some(owed - cancelled)
            });
            self.free.add_permits(grow);
        } else {
            // Owed first, so that a call ending from now on retires its
            // slot; then retire the free ones, which are owed too.
            self.owed.fetch_add(*limit - new, Ordering::SeqCst);
            self.retire_free();
        }
        *limit = new;
    }

    /// Retires free slots while any are owed.
    fn retire_free(&self) {
        loop {
            let owed = self.owed.load(Ordering::SeqCst);
            let retired = if owed == 0 { 0 } else { self.free.forget_permits(owed) };
            if retired == 0 {
                return;
            }
            // Calls that ended meanwhile may have paid some of it already:
            // what was retired beyond what is still owed goes back.
            let mut surplus = 0;
            let _ = self.owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| {
                surplus = retired.saturating_sub(owed);
                Some(owed - (retired - surplus))
            });
            self.free.add_permits(surplus);
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        let owed = &self.slots.owed;
        if owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| owed.checked_sub(1)).is_ok() {
            permit.forget();
        } else {
            drop(permit);
            // A lower limit set since the check above owes this one too.
            if owed.load(Ordering::SeqCst) > 0 {
                self.slots.retire_free();
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

    #[test]
    fn limits_changing_while_calls_come_and_go_leave_exactly_the_last_limit() {
        let slots = Slots::new(4);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let held: Vec<_> = std::iter::from_fn(|| slots.try_acquire()).take(3).collect();
                        std::thread::yield_now();
                        drop(held);
                    }
                });
            }
            for round in 0..20_000 {
                slots.set_limit([4, 1, 7, 0, 3][round % 5]);
            }
            slots.set_limit(5);
            stop.store(true, Ordering::Relaxed);
        });
        let all: Vec<_> = std::iter::from_fn(|| slots.try_acquire()).take(100).collect();
        assert_eq!(all.len(), 5, "no slot lost or made up");
    }
}
