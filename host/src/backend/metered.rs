//! A backend decorator that records every operation of one role in the
//! metrics: count, latency, hits and misses, bytes, errors.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Backend, Expiry, RateDecision, ScanPage, Unsent, Write};
use crate::error::StateResult;
use crate::metrics::{Counter, Histogram, Metrics};

/// The operations counted, one label each.
#[derive(Debug, Clone, Copy)]
enum Op {
    Get,
    Set,
    Exists,
    GetMany,
    SetMany,
    Delete,
    Expiry,
    Expire,
    Scan,
    Increment,
    SetIfAbsent,
    CompareAndSwap,
    GetAndDelete,
    HashGet,
    HashGetAll,
    HashApply,
    HashIncrement,
    HashCompareAndSet,
    LockAcquire,
    LockExtend,
    RateCheck,
    Clear,
    WriteLater,
}

const OPS: usize = Op::WriteLater as usize + 1;

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Exists => "exists",
            Op::GetMany => "get_many",
            Op::SetMany => "set_many",
            Op::Delete => "delete",
            Op::Expiry => "expiry",
            Op::Expire => "expire",
            Op::Scan => "scan",
            Op::Increment => "increment",
            Op::SetIfAbsent => "set_if_absent",
            Op::CompareAndSwap => "compare_and_swap",
            Op::GetAndDelete => "get_and_delete",
            Op::HashGet => "hash_get",
            Op::HashGetAll => "hash_get_all",
            Op::HashApply => "hash_apply",
            Op::HashIncrement => "hash_increment",
            Op::HashCompareAndSet => "hash_compare_and_set",
            Op::LockAcquire => "lock_acquire",
            Op::LockExtend => "lock_extend",
            Op::RateCheck => "rate_check",
            Op::Clear => "clear",
            Op::WriteLater => "write_later",
        }
    }
}

/// One operation's metric handles, looked up once (on first use) rather
/// than by label on every operation.
struct OpHandles {
    count: Counter,
    seconds: Histogram,
}

/// A role's view of a backend, with metrics.
pub struct Metered {
    inner: Arc<dyn Backend>,
    role: String,
    metrics: Arc<Metrics>,
    ops: [OnceLock<OpHandles>; OPS],
    reads: [OnceLock<(Counter, Counter)>; OPS],
    bytes_read: Counter,
    bytes_written: Counter,
    /// Fire-and-forget writes sent and failed.
    deferred: OnceLock<[Counter; 2]>,
}

impl Metered {
    /// Wraps `inner` for `role`.
    pub fn new(inner: Arc<dyn Backend>, role: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            role: role.to_owned(),
            ops: std::array::from_fn(|_| OnceLock::new()),
            reads: std::array::from_fn(|_| OnceLock::new()),
            bytes_read: metrics.bytes_read.with_label_values(&[role]),
            bytes_written: metrics.bytes_written.with_label_values(&[role]),
            deferred: OnceLock::new(),
            metrics,
        }
    }

    async fn observe<T>(&self, op: Op, future: impl Future<Output = StateResult<T>>) -> StateResult<T> {
        let start = Instant::now();
        let result = future.await;
        let handles = self.ops[op as usize].get_or_init(|| OpHandles {
            count: self.metrics.ops.with_label_values(&[&self.role, op.label()]),
            seconds: self.metrics.backend_seconds.with_label_values(&[op.label()]),
        });
        handles.seconds.observe(start.elapsed());
        handles.count.inc();
        if let Err(error) = &result {
            self.metrics.op_errors.with_label_values(&[&self.role, op.label(), error.kind()]).inc();
        }
        result
    }

    fn read(&self, op: Op, found: usize, bytes: usize, total: usize) {
        let (hits, misses) = self.reads[op as usize].get_or_init(|| {
            let labels = [self.role.as_str(), op.label()];
            (self.metrics.hits.with_label_values(&labels), self.metrics.misses.with_label_values(&labels))
        });
        hits.inc_by(found as u64);
        misses.inc_by((total - found) as u64);
        self.bytes_read.inc_by(bytes as u64);
    }

    fn wrote(&self, bytes: usize) {
        self.bytes_written.inc_by(bytes as u64);
    }
}

#[async_trait]
impl Backend for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn health(&self) -> StateResult<super::Health> {
        self.inner.health().await
    }

    async fn get(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        let value = self.observe(Op::Get, self.inner.get(key, max_bytes)).await?;
        self.read(Op::Get, value.is_some() as usize, value.as_ref().map_or(0, Vec::len), 1);
        Ok(value)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()> {
        self.wrote(value.len());
        self.observe(Op::Set, self.inner.set(key, value, ttl)).await
    }

    async fn exists(&self, key: &str) -> StateResult<bool> {
        let found = self.observe(Op::Exists, self.inner.exists(key)).await?;
        self.read(Op::Exists, found as usize, 0, 1);
        Ok(found)
    }

    async fn get_many(&self, keys: &[String], max_bytes: Option<usize>) -> StateResult<Vec<Option<Vec<u8>>>> {
        let values = self.observe(Op::GetMany, self.inner.get_many(keys, max_bytes)).await?;
        let found = values.iter().flatten().count();
        self.read(Op::GetMany, found, values.iter().flatten().map(Vec::len).sum(), values.len());
        Ok(values)
    }

    async fn set_many(&self, entries: &[(String, Vec<u8>)], ttl: Option<Duration>) -> StateResult<()> {
        self.wrote(entries.iter().map(|(_, v)| v.len()).sum());
        self.observe(Op::SetMany, self.inner.set_many(entries, ttl)).await
    }

    async fn delete_many(&self, keys: &[String]) -> StateResult<u64> {
        self.observe(Op::Delete, self.inner.delete_many(keys)).await
    }

    async fn expiry(&self, key: &str) -> StateResult<Expiry> {
        self.observe(Op::Expiry, self.inner.expiry(key)).await
    }

    async fn expire(&self, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        self.observe(Op::Expire, self.inner.expire(key, ttl)).await
    }

    async fn scan(&self, pattern: &str, cursor: Option<&str>, limit: usize) -> StateResult<ScanPage> {
        self.observe(Op::Scan, self.inner.scan(pattern, cursor, limit)).await
    }

    async fn increment(&self, key: &str, delta: i64, fallback_ttl: Option<Duration>) -> StateResult<i64> {
        self.observe(Op::Increment, self.inner.increment(key, delta, fallback_ttl)).await
    }

    async fn set_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool> {
        self.wrote(value.len());
        self.observe(Op::SetIfAbsent, self.inner.set_if_absent(key, value, ttl)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> StateResult<bool> {
        self.wrote(new.map_or(0, <[u8]>::len));
        self.observe(Op::CompareAndSwap, self.inner.compare_and_swap(key, expected, new, ttl)).await
    }

    async fn get_and_delete(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        let value = self.observe(Op::GetAndDelete, self.inner.get_and_delete(key, max_bytes)).await?;
        self.read(Op::GetAndDelete, value.is_some() as usize, value.as_ref().map_or(0, Vec::len), 1);
        Ok(value)
    }

    async fn hash_get(&self, key: &str, field: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        let value = self.observe(Op::HashGet, self.inner.hash_get(key, field, max_bytes)).await?;
        self.read(Op::HashGet, value.is_some() as usize, value.as_ref().map_or(0, Vec::len), 1);
        Ok(value)
    }

    async fn hash_get_all(&self, key: &str, max_bytes: usize) -> StateResult<Vec<(String, Vec<u8>)>> {
        let fields = self.observe(Op::HashGetAll, self.inner.hash_get_all(key, max_bytes)).await?;
        self.read(Op::HashGetAll, !fields.is_empty() as usize, fields.iter().map(|(_, v)| v.len()).sum(), 1);
        Ok(fields)
    }

    async fn hash_apply(
        &self,
        key: &str,
        set: &[(String, Vec<u8>)],
        remove: &[String],
        fallback_ttl: Option<Duration>,
    ) -> StateResult<()> {
        self.wrote(set.iter().map(|(_, v)| v.len()).sum());
        self.observe(Op::HashApply, self.inner.hash_apply(key, set, remove, fallback_ttl)).await
    }

    async fn hash_increment(
        &self,
        key: &str,
        field: &str,
        delta: i64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<i64> {
        self.observe(Op::HashIncrement, self.inner.hash_increment(key, field, delta, fallback_ttl)).await
    }

    async fn hash_increment_float(
        &self,
        key: &str,
        field: &str,
        delta: f64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<f64> {
        self.observe(Op::HashIncrement, self.inner.hash_increment_float(key, field, delta, fallback_ttl)).await
    }

    async fn hash_compare_and_set(
        &self,
        key: &str,
        field: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<bool> {
        self.wrote(new.map_or(0, <[u8]>::len));
        let future = self.inner.hash_compare_and_set(key, field, expected, new, fallback_ttl);
        self.observe(Op::HashCompareAndSet, future).await
    }

    async fn lock_acquire(&self, key: &str, fence_key: &str, owner: &str, ttl: Duration) -> StateResult<Option<u64>> {
        self.observe(Op::LockAcquire, self.inner.lock_acquire(key, fence_key, owner, ttl)).await
    }

    async fn expire_if_equal(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<bool> {
        self.observe(Op::LockExtend, self.inner.expire_if_equal(key, value, ttl)).await
    }

    async fn rate_check(&self, key: &str, limit: u64, window: Duration, cost: u64) -> StateResult<RateDecision> {
        self.observe(Op::RateCheck, self.inner.rate_check(key, limit, window, cost)).await
    }

    async fn delete_matching(&self, pattern: &str) -> StateResult<u64> {
        self.observe(Op::Clear, self.inner.delete_matching(pattern)).await
    }

    async fn write_all(&self, writes: &[Write]) -> Result<(), Unsent> {
        self.wrote(writes.iter().map(|w| if let Write::Set { value, .. } = w { value.len() } else { 0 }).sum());
        let mut sent = writes.len();
        let sending = async {
            self.inner.write_all(writes).await.map_err(|unsent| {
                sent = unsent.sent;
                unsent.error
            })
        };
        let result = self.observe(Op::WriteLater, sending).await;
        let [sent_count, failed_count] = self.deferred.get_or_init(|| {
            ["sent", "failed"].map(|outcome| self.metrics.deferred_writes.with_label_values(&[&self.role, outcome]))
        });
        sent_count.inc_by(sent as u64);
        failed_count.inc_by((writes.len() - sent) as u64);
        result.map_err(|error| Unsent { sent, error })
    }
}
