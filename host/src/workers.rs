//! Thread-per-core: worker threads, each running a single-threaded async
//! runtime of its own, for `serve`'s connections. A call then runs and
//! wakes on one thread from start to end, and the Redis backend gives each
//! worker a connection whose reader runs on that worker too (see
//! [`current`]). On one work-stealing runtime the wake-ups between threads
//! cost about a third of a call's CPU (BENCHMARKS.md, thread-per-core).
//!
//! A job goes to the worker running the fewest jobs now (in turn among
//! equals): connections last unevenly, and handing them out in turn alone
//! would leave one worker with the long-lived ones.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// Made inside the worker's runtime (so that sockets it adopts register
/// there), then run as a task of it.
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Worker threads; a job goes to the least busy. Dropping this stops each
/// worker once it has taken the jobs sent so far, and cancels what they
/// still run.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    loads: Loads,
    /// Where the search for the least busy starts, so that equals take
    /// turns.
    next: AtomicUsize,
}

/// How many jobs each worker runs now; cheap to clone.
#[derive(Clone)]
pub struct Loads(Arc<[AtomicUsize]>);

impl Loads {
    /// Jobs running now, in worker order.
    pub fn now(&self) -> Vec<usize> {
        self.0.iter().map(|load| load.load(Ordering::Relaxed)).collect()
    }
}

/// Counts a job as running on its worker until dropped with it (when it
/// ends, is cancelled, or cannot be sent).
struct Running(Loads, usize);

impl Running {
    fn start(loads: &Loads, worker: usize) -> Self {
        loads.0[worker].fetch_add(1, Ordering::Relaxed);
        Running(loads.clone(), worker)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0 .0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
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
        let (count, mut senders) = (count.max(1), Vec::new());
        // Ids in one block: consecutive, they get different shards.
        let first = NEXT_ID.fetch_add(count as u64, Ordering::Relaxed);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (sender, mut jobs) = mpsc::unbounded_channel::<Job>();
            let id = first + index as u64;
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
        let loads = Loads(senders.iter().map(|_| AtomicUsize::new(0)).collect());
        Ok(Self { senders, loads, next: AtomicUsize::new(0) })
    }

    /// Runs the future `make` returns as a task of the least busy worker;
    /// `make` itself runs on that worker too.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let count = self.senders.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        // A worker whose thread died (it never should) takes nothing.
        let index = (start..start + count)
            .map(|i| i % count)
            .min_by_key(|&i| (self.senders[i].is_closed(), self.loads.0[i].load(Ordering::Relaxed)))
            .unwrap_or(0);
        let running = Running::start(&self.loads, index);
        let job: Job = Box::new(move || {
            let job = make();
            Box::pin(async move {
                let _running = running;
                job.await
            })
        });
        // A worker ends only when `self` is dropped, or if its thread died.
        if self.senders[index].send(job).is_err() {
            tracing::error!(worker = index, "a worker thread has stopped; its job is dropped");
        }
    }

    /// How busy the workers are, now and later.
    pub fn loads(&self) -> Loads {
        self.loads.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Waits (10 s at most) until the workers run `wanted` jobs.
    async fn loads_become(workers: &Workers, wanted: &[usize]) {
        let start = std::time::Instant::now();
        while workers.loads().now() != wanted {
            assert!(start.elapsed().as_secs() < 10, "loads {:?}, not {wanted:?}", workers.loads().now());
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn jobs_go_to_every_worker_in_turn_and_run_there() {
        assert_eq!(current(), 0, "not a worker thread");
        let workers = Workers::start(3).unwrap();
        // Every job runs until all are sent, so each finds the others'.
        let (release, released) = tokio::sync::watch::channel(false);
        let (sender, mut ran) = mpsc::unbounded_channel();
        for job in 0..9 {
            let (sender, mut released) = (sender.clone(), released.clone());
            workers.spawn(move || {
                // `make` runs on the worker as well as the task.
                let made_on = current();
                async move {
                    sender.send((job, made_on, current(), std::thread::current().id())).unwrap();
                    let _ = released.wait_for(|&go| go).await;
                }
            });
        }
        drop(sender);
        let mut per_worker: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut threads = BTreeMap::new();
        for _ in 0..9 {
            let (job, made_on, worker, thread) = ran.recv().await.unwrap();
            assert_eq!(made_on, worker, "made and run on one worker");
            assert_ne!(worker, 0);
            assert_eq!(*threads.entry(worker).or_insert(thread), thread, "a worker is one thread");
            per_worker.entry(worker).or_default().push(job);
        }
        assert_eq!(workers.loads().now(), [3, 3, 3]);
        release.send_replace(true);
        let mut jobs: Vec<Vec<usize>> = per_worker.into_values().collect();
        jobs.iter_mut().for_each(|jobs| jobs.sort());
        jobs.sort();
        assert_eq!(jobs, [[0, 3, 6], [1, 4, 7], [2, 5, 8]]);
        loads_become(&workers, &[0, 0, 0]).await;
        let later = Workers::start(1).unwrap();
        let (sender, id) = tokio::sync::oneshot::channel();
        later.spawn(move || async move { sender.send(current()).unwrap() });
        assert!(!threads.contains_key(&id.await.unwrap()), "a new worker gets a new id");
    }

    /// A job goes to the worker running the fewest, not the next in turn.
    #[tokio::test]
    async fn a_job_goes_to_the_least_busy_worker() {
        let workers = Workers::start(2).unwrap();
        // Jobs that run until told to end; each says where it runs.
        let hold = |workers: &Workers| {
            let (end, ended) = tokio::sync::oneshot::channel::<()>();
            let (runs_on, worker) = tokio::sync::oneshot::channel();
            workers.spawn(move || async move {
                let _ = runs_on.send(current());
                let _ = ended.await;
            });
            (end, worker)
        };
        let (first, second, third) = (hold(&workers), hold(&workers), hold(&workers));
        let (on_first, on_second) = (first.1.await.unwrap(), second.1.await.unwrap());
        assert_eq!(third.1.await.unwrap(), on_first, "in turn while equally busy");
        assert_eq!(workers.loads().now(), [2, 1]);
        // The first worker's jobs end: it is now the less busy, though the
        // second's turn is next.
        drop((first.0, third.0));
        loads_become(&workers, &[0, 1]).await;
        let fourth = hold(&workers);
        assert_eq!(fourth.1.await.unwrap(), on_first);
        assert_ne!(on_first, on_second);
        drop((second.0, fourth.0));
    }

    /// A worker whose thread died takes no more jobs; the others take them.
    #[tokio::test]
    async fn a_dead_worker_takes_no_jobs() {
        let workers = Workers::start(2).unwrap();
        // A job whose making panics takes its worker's thread down.
        workers.spawn(|| -> std::future::Ready<()> { panic!("a worker thread dies (as this test wants)") });
        let start = std::time::Instant::now();
        while !workers.senders[0].is_closed() {
            assert!(start.elapsed().as_secs() < 10, "the worker never died");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let (sender, mut ran) = mpsc::unbounded_channel();
        for job in 0..4 {
            let sender = sender.clone();
            workers.spawn(move || async move { sender.send(job).unwrap() });
        }
        drop(sender);
        let mut jobs = Vec::new();
        while let Ok(Some(job)) = tokio::time::timeout(std::time::Duration::from_secs(10), ran.recv()).await {
            jobs.push(job);
        }
        jobs.sort();
        assert_eq!(jobs, [0, 1, 2, 3], "every job ran, on the live worker");
    }
}
