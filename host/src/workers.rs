//! Thread-per-core: worker threads, each running a single-threaded async
//! runtime of its own, for `serve`'s connections. A call then runs and
//! wakes on one thread from start to end, and the Redis backend gives each
//! worker a connection whose reader runs on that worker too (see
//! [`current`]). On one work-stealing runtime the wake-ups between threads
//! cost about a third of a call's CPU (BENCHMARKS.md, thread-per-core).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// Made inside the worker's runtime (so that sockets it adopts register
/// there), then run as a task of it.
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Worker threads; jobs go to them in turn. Dropping this stops each
/// worker once it has taken the jobs sent so far, and cancels what they
/// still run.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
}

std::thread_local! {
    /// This thread's worker id; 0 on other threads.
    static WORKER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Worker ids of the whole process, so that workers of a later [`Workers`]
/// never take over what an earlier one's left behind.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The id of the worker thread this runs on, or 0 on any other thread.
pub fn current() -> u64 {
    WORKER.with(|id| id.get())
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut senders = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (sender, mut jobs) = mpsc::unbounded_channel::<Job>();
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            std::thread::Builder::new().name(format!("rolehost-worker-{index}")).spawn(move || {
                WORKER.with(|worker| worker.set(id));
                runtime.block_on(async {
                    while let Some(job) = jobs.recv().await {
                        tokio::spawn(job());
                    }
                });
            })?;
            senders.push(sender);
        }
        Ok(Self { senders, next: AtomicUsize::new(0) })
    }

    /// Runs the future `make` returns as a task of the next worker in
    /// turn; `make` itself runs on that worker too.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        // A worker ends only when `self` is dropped, or if its thread died.
        if self.senders[index].send(Box::new(move || Box::pin(make()))).is_err() {
            tracing::error!(worker = index, "a worker thread has stopped; its job is dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn jobs_go_to_every_worker_in_turn_and_run_there() {
        assert_eq!(current(), 0, "not a worker thread");
        let workers = Workers::start(3).unwrap();
        let (sender, mut ran) = mpsc::unbounded_channel();
        for job in 0..9 {
            let sender = sender.clone();
            workers.spawn(move || {
                // `make` runs on the worker as well as the task.
                let made_on = current();
                async move {
                    tokio::task::yield_now().await;
                    sender.send((job, made_on, current(), std::thread::current().id())).unwrap();
                }
            });
        }
        drop(sender);
        let mut per_worker: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut threads = BTreeMap::new();
        while let Some((job, made_on, worker, thread)) = ran.recv().await {
            assert_eq!(made_on, worker, "made and run on one worker");
            assert_ne!(worker, 0);
            assert_eq!(*threads.entry(worker).or_insert(thread), thread, "a worker is one thread");
            per_worker.entry(worker).or_default().push(job);
        }
        let mut jobs: Vec<Vec<usize>> = per_worker.into_values().collect();
        jobs.iter_mut().for_each(|jobs| jobs.sort());
        jobs.sort();
        assert_eq!(jobs, [[0, 3, 6], [1, 4, 7], [2, 5, 8]]);
        let later = Workers::start(1).unwrap();
        let (sender, id) = tokio::sync::oneshot::channel();
        later.spawn(move || async move { sender.send(current()).unwrap() });
        assert!(!threads.contains_key(&id.await.unwrap()), "a new worker gets a new id");
    }
}
