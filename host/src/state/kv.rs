//! `rolehost:state/kv`: buckets of key-value state.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::CallCtx;
use crate::backend::{Sweep, Write};
use crate::bindings::kv::{Entry, Host, HostBucket, KeyPage};
use crate::bindings::types::Expiry;
use crate::error::{shown, StateError, StateResult};
use crate::namespace::{Namespace, Space};

/// An open bucket: which namespace its keys live in, and whether this role
/// may write there.
pub struct Bucket {
    name: String,
    /// A granted namespace; none for the role's own (its `Arc` is shared by
    /// every call of the role: not cloned per bucket).
    granted: Option<Arc<Namespace>>,
    writable: bool,
}

impl super::Handle for Bucket {
    fn bytes(&self) -> usize {
        self.name.len()
    }
}

impl CallCtx {
    /// The full key of one operation on a bucket, after the guards: one
    /// operation charged, write access checked, the key validated.
    pub(crate) fn bucket_key(&mut self, bucket: &Resource<Bucket>, key: &str, write: bool) -> StateResult<String> {
        self.charge(1)?;
        let bucket = self.bucket(bucket)?;
        bucket.check_write(write)?;
        self.bucket_namespace(bucket).key(Space::Kv, key)
    }

    fn bucket_namespace<'a>(&'a self, bucket: &'a Bucket) -> &'a Arc<Namespace> {
        bucket.granted.as_ref().unwrap_or(&self.role.namespace)
    }

    /// The full key and TTL of one `set`, after every guard a write passes.
    fn checked_set(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> StateResult<(String, Option<std::time::Duration>)> {
        let key = self.bucket_key(bucket, key, true)?;
        self.check_value(value)?;
        Ok((key, self.write_ttl(ttl_ms)?))
    }

    /// The full keys of a batch: checked against the batch limit, charged
    /// one operation per key.
    fn bucket_keys(&mut self, bucket: &Resource<Bucket>, keys: &[String], write: bool) -> StateResult<Vec<String>> {
        self.check_batch(keys.len())?;
        self.charge(keys.len())?;
        let bucket = self.bucket(bucket)?;
        bucket.check_write(write)?;
        let namespace = self.bucket_namespace(bucket);
        keys.iter().map(|k| namespace.key(Space::Kv, k)).collect()
    }
}

impl Bucket {
    /// True for a granted namespace, which others write too.
    pub(super) fn shared(&self) -> bool {
        self.granted.is_some()
    }

    fn check_write(&self, write: bool) -> StateResult<()> {
        if write && !self.writable {
            return Err(StateError::AccessDenied(format!(
                "namespace {} is granted to this role for reading only",
                shown(&self.name)
            )));
        }
        Ok(())
    }
}

impl Host for CallCtx {}

impl CallCtx {
    /// Reads `keys` so that however large their values, the host holds at
    /// most about twice the role's memory limit for the call: values the
    /// guest could not hold are refused as `too-large` rather than read
    /// whole.
    ///
    /// In the role's own namespace every value passed this role's
    /// `max-value-bytes` when written (the largest it has had: a reload may
    /// lower it), so reading memory-limit / value-limit keys at a time
    /// bounds each read (consecutive reads, not one snapshot; one read when
    /// the limits allow). Values in a shared
    /// namespace are bounded by no limit of this role, so the store checks
    /// their size before it sends them.
    async fn get_within_memory(&mut self, keys: &[String], shared: bool) -> StateResult<Vec<Option<Vec<u8>>>> {
        let measured = self.read_limit(shared);
        let limits = &self.role.limits;
        let too_large = || {
            StateError::TooLarge(format!(
                "the values of these {} keys come to more than {} bytes (the role's memory limit); ask for fewer at once",
                keys.len(),
                limits.max_memory_bytes
            ))
        };
        if measured.is_some() {
            return match self.backend.get_many(keys, measured).await {
                Err(StateError::TooLarge(_)) => Err(too_large()),
                answer => answer,
            };
        }
        let chunk = (limits.max_memory_bytes / self.role.largest_value_bytes).max(1);
        let mut values = Vec::with_capacity(keys.len());
        let mut bytes = 0usize;
        for part in keys.chunks(chunk) {
            let got = self.backend.get_many(part, None).await?;
            bytes += got.iter().flatten().map(Vec::len).sum::<usize>();
            if bytes > limits.max_memory_bytes {
                return Err(too_large());
            }
            values.extend(got);
        }
        Ok(values)
    }
}

impl HostBucket for CallCtx {
    async fn open(&mut self, name: String) -> StateResult<Resource<Bucket>> {
        self.charge(1)?;
        let granted = self.namespace(&name, false)?;
        let granted = (!name.is_empty()).then(|| granted.clone());
        let writable = self.namespace(&name, true).is_ok();
        self.push_handle(Bucket { name, granted, writable })
    }

    async fn get(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<Option<Vec<u8>>> {
        let key = self.bucket_key(&bucket, &key, false)?;
        let limit = self.read_limit(self.bucket(&bucket)?.shared());
        self.backend.get(&key, limit).await.map_err(super::over_memory)
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> StateResult<()> {
        let (key, ttl) = self.checked_set(&bucket, &key, &value, ttl_ms)?;
        self.backend.set(&key, &value, ttl).await
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<bool> {
        let key = self.bucket_key(&bucket, &key, true)?;
        Ok(self.backend.delete_many(&[key]).await? > 0)
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<bool> {
        let key = self.bucket_key(&bucket, &key, false)?;
        self.backend.exists(&key).await
    }

    async fn get_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> StateResult<Vec<Option<Vec<u8>>>> {
        let keys = self.bucket_keys(&bucket, &keys, false)?;
        let shared = self.bucket(&bucket)?.shared();
        self.get_within_memory(&keys, shared).await
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        entries: Vec<Entry>,
        ttl_ms: Option<u64>,
    ) -> StateResult<()> {
        let (keys, values): (Vec<String>, Vec<Vec<u8>>) = entries.into_iter().map(|e| (e.key, e.value)).unzip();
        let keys = self.bucket_keys(&bucket, &keys, true)?;
        for value in &values {
            self.check_value(value)?;
        }
        let ttl = self.write_ttl(ttl_ms)?;
        let entries: Vec<(String, Vec<u8>)> = keys.into_iter().zip(values).collect();
        self.backend.set_many(&entries, ttl).await
    }

    async fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> StateResult<u32> {
        let keys = self.bucket_keys(&bucket, &keys, true)?;
        Ok(self.backend.delete_many(&keys).await? as u32)
    }

    async fn expiry(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<Expiry> {
        let key = self.bucket_key(&bucket, &key, false)?;
        Ok(self.backend.expiry(&key).await?.into())
    }

    async fn expire(&mut self, bucket: Resource<Bucket>, key: String, ttl_ms: Option<u64>) -> StateResult<bool> {
        let key = self.bucket_key(&bucket, &key, true)?;
        let ttl = self.expire_ttl(ttl_ms)?;
        self.backend.expire(&key, ttl).await
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        pattern: Option<String>,
        cursor: Option<String>,
        limit: u32,
    ) -> StateResult<KeyPage> {
        let namespace = self.bucket_namespace(self.bucket(&bucket)?).clone();
        let (keys, cursor) = self.list_names(&namespace, Space::Kv, pattern, cursor, limit).await?;
        Ok(KeyPage { keys, cursor })
    }

    /// Page by page, each charged as a listing of its keys: the role's
    /// quotas bound how much one call may sweep.
    async fn clear(&mut self, bucket: Resource<Bucket>) -> StateResult<u64> {
        let bucket = self.bucket(&bucket)?;
        bucket.check_write(true)?;
        let namespace = self.bucket_namespace(bucket).clone();
        let limit = u32::try_from(self.role.limits.max_batch_entries).unwrap_or(u32::MAX);
        let mut sweep = Sweep::default();
        while let Some(cursor) = sweep.next_cursor() {
            let page = self.scan_page(&namespace, Space::Kv, None, cursor, limit).await?;
            sweep.delete(&*self.backend, page).await?;
        }
        Ok(sweep.deleted)
    }

    async fn set_later(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> StateResult<()> {
        let (key, ttl) = self.checked_set(&bucket, &key, &value, ttl_ms)?;
        self.defer(Write::Set { key, value, ttl })
    }

    async fn delete_later(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<()> {
        let key = self.bucket_key(&bucket, &key, true)?;
        self.defer(Write::Delete { key })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.delete_handle(bucket)?;
        Ok(())
    }
}
