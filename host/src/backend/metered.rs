//! A backend decorator that records every operation of one role in the
//! metrics: count, latency, hits and misses, bytes, errors.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Backend, Expiry, RateDecision, ScanPage, Write};
use crate::error::StateResult;
use crate::metrics::Metrics;

/// A role's view of a backend, with metrics.
pub struct Metered {
    inner: Arc<dyn Backend>,
    role: String,
    metrics: Arc<Metrics>,
}

impl Metered {
    /// Wraps `inner` for `role`.
    pub fn new(inner: Arc<dyn Backend>, role: &str, metrics: Arc<Metrics>) -> Self {
        Self { inner, role: role.to_owned(), metrics }
    }

    async fn observe<T>(&self, op: &str, future: impl Future<Output = StateResult<T>>) -> StateResult<T> {
        let start = Instant::now();
        let result = future.await;
        self.metrics.backend_seconds.with_label_values(&[op]).observe(start.elapsed().as_secs_f64());
        self.metrics.ops.with_label_values(&[&self.role, op]).inc();
        if let Err(error) = &result {
            self.metrics.op_errors.with_label_values(&[&self.role, op, error.kind()]).inc();
        }
        result
    }

    fn read(&self, op: &str, found: usize, bytes: usize, total: usize) {
        self.metrics.hits.with_label_values(&[&self.role, op]).inc_by(found as u64);
        self.metrics.misses.with_label_values(&[&self.role, op]).inc_by((total - found) as u64);
        self.metrics.bytes_read.with_label_values(&[&self.role]).inc_by(bytes as u64);
    }

    fn wrote(&self, bytes: usize) {
        self.metrics.bytes_written.with_label_values(&[&self.role]).inc_by(bytes as u64);
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

    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let value = self.observe("get", self.inner.get(key)).await?;
        self.read("get", value.is_some() as usize, value.as_ref().map_or(0, Vec::len), 1);
        Ok(value)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()> {
        self.wrote(value.len());
        self.observe("set", self.inner.set(key, value, ttl)).await
    }

    async fn exists(&self, key: &str) -> StateResult<bool> {
        let found = self.observe("exists", self.inner.exists(key)).await?;
        self.read("exists", found as usize, 0, 1);
        Ok(found)
    }

    async fn get_many(&self, keys: &[String]) -> StateResult<Vec<Option<Vec<u8>>>> {
        let values = self.observe("get_many", self.inner.get_many(keys)).await?;
        let found = values.iter().flatten().count();
        self.read("get_many", found, values.iter().flatten().map(Vec::len).sum(), values.len());
        Ok(values)
    }

    async fn set_many(&self, entries: &[(String, Vec<u8>)], ttl: Option<Duration>) -> StateResult<()> {
        self.wrote(entries.iter().map(|(_, v)| v.len()).sum());
        self.observe("set_many", self.inner.set_many(entries, ttl)).await
    }

    async fn delete_many(&self, keys: &[String]) -> StateResult<u64> {
        self.observe("delete", self.inner.delete_many(keys)).await
    }

    async fn expiry(&self, key: &str) -> StateResult<Expiry> {
        self.observe("expiry", self.inner.expiry(key)).await
    }

    async fn expire(&self, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        self.observe("expire", self.inner.expire(key, ttl)).await
    }

    async fn scan(&self, pattern: &str, cursor: Option<&str>, limit: usize) -> StateResult<ScanPage> {
        self.observe("scan", self.inner.scan(pattern, cursor, limit)).await
    }

    async fn increment(&self, key: &str, delta: i64, fallback_ttl: Option<Duration>) -> StateResult<i64> {
        self.observe("increment", self.inner.increment(key, delta, fallback_ttl)).await
    }

    async fn set_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool> {
        self.wrote(value.len());
        self.observe("set_if_absent", self.inner.set_if_absent(key, value, ttl)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> StateResult<bool> {
        self.wrote(new.map_or(0, <[u8]>::len));
        self.observe("compare_and_swap", self.inner.compare_and_swap(key, expected, new, ttl)).await
    }

    async fn get_and_delete(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let value = self.observe("get_and_delete", self.inner.get_and_delete(key)).await?;
        self.read("get_and_delete", value.is_some() as usize, value.as_ref().map_or(0, Vec::len), 1);
        Ok(value)
    }

    async fn hash_get(&self, key: &str, field: &str) -> StateResult<Option<Vec<u8>>> {
        let value = self.observe("hash_get", self.inner.hash_get(key, field)).await?;
        self.read("hash_get", value.is_some() as usize, value.as_ref().map_or(0, Vec::len), 1);
        Ok(value)
    }

    async fn hash_get_all(&self, key: &str) -> StateResult<Vec<(String, Vec<u8>)>> {
        let fields = self.observe("hash_get_all", self.inner.hash_get_all(key)).await?;
        self.read("hash_get_all", !fields.is_empty() as usize, fields.iter().map(|(_, v)| v.len()).sum(), 1);
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
        self.observe("hash_apply", self.inner.hash_apply(key, set, remove, fallback_ttl)).await
    }

    async fn hash_increment(
        &self,
        key: &str,
        field: &str,
        delta: i64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<i64> {
        self.observe("hash_increment", self.inner.hash_increment(key, field, delta, fallback_ttl)).await
    }

    async fn hash_increment_float(
        &self,
        key: &str,
        field: &str,
        delta: f64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<f64> {
        self.observe("hash_increment", self.inner.hash_increment_float(key, field, delta, fallback_ttl)).await
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
        self.observe("hash_compare_and_set", future).await
    }

    async fn lock_acquire(&self, key: &str, fence_key: &str, owner: &str, ttl: Duration) -> StateResult<Option<u64>> {
        self.observe("lock_acquire", self.inner.lock_acquire(key, fence_key, owner, ttl)).await
    }

    async fn expire_if_equal(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<bool> {
        self.observe("lock_extend", self.inner.expire_if_equal(key, value, ttl)).await
    }

    async fn rate_check(&self, key: &str, limit: u64, window: Duration, cost: u64) -> StateResult<RateDecision> {
        self.observe("rate_check", self.inner.rate_check(key, limit, window, cost)).await
    }

    async fn delete_matching(&self, pattern: &str) -> StateResult<u64> {
        self.observe("clear", self.inner.delete_matching(pattern)).await
    }

    async fn write_all(&self, writes: &[Write]) -> StateResult<()> {
        self.wrote(writes.iter().map(|w| if let Write::Set { value, .. } = w { value.len() } else { 0 }).sum());
        let result = self.observe("write_later", self.inner.write_all(writes)).await;
        let outcome = if result.is_ok() { "sent" } else { "failed" };
        self.metrics.deferred_writes.with_label_values(&[&self.role, outcome]).inc_by(writes.len() as u64);
        result
    }
}
