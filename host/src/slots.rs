//! Concurrency budgets: how many calls may run at once, refused (not
//! queued) past it, with a limit that can change while calls run.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A budget of `limit` calls at once. Lowering the limit below the calls
/// running keeps them counted: no new call gets a slot until enough of
/// them have finished.
pub(crate) struct Slots {
    used: AtomicUsize,
    limit: AtomicUsize,
}

/// One running call's slot, given back when dropped.
pub(crate) struct Slot<'a>(&'a Slots);

impl Slots {
    pub(crate) fn new(limit: usize) -> Self {
        Self { used: AtomicUsize::new(0), limit: AtomicUsize::new(limit) }
    }

    /// A slot if one is free.
    pub(crate) fn try_acquire(&self) -> Option<Slot<'_>> {
        self.used
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |used| {
                (used < self.limit.load(Ordering::Relaxed)).then_some(used + 1)
            })
            .ok()?;
        Some(Slot(self))
    }

    /// Sets a new limit; calls running keep their slots.
    pub(crate) fn set_limit(&self, new: usize) {
        self.limit.store(new, Ordering::Relaxed);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::Release);
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
    fn a_raised_limit_lets_more_in_at_once() {
        let slots = Slots::new(4);
        let running: Vec<_> = (0..3).map(|_| slots.try_acquire().unwrap()).collect();
        slots.set_limit(2);
        slots.set_limit(5);
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
