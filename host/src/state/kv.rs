//! `rolehost:state/kv`: buckets of key-value state.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::{ttl, CallCtx};
use crate::bindings::kv::{Entry, Host, HostBucket, KeyPage};
use crate::bindings::types::Expiry;
use crate::error::{StateError, StateResult};
use crate::namespace::{Namespace, Space};

/// An open bucket: which namespace its keys live in.
pub struct Bucket {
    namespace: Arc<Namespace>,
}

impl Bucket {
    /// The full key for a local key of this bucket.
    pub(crate) fn key(&self, key: &str) -> StateResult<String> {
        self.namespace.key(Space::Kv, key)
    }

    fn keys(&self, keys: &[String]) -> StateResult<Vec<String>> {
        keys.iter().map(|k| self.key(k)).collect()
    }
}

impl Host for CallCtx {}

impl HostBucket for CallCtx {
    async fn open(&mut self, name: String) -> StateResult<Resource<Bucket>> {
        if !name.is_empty() {
            return Err(StateError::AccessDenied(format!(
                "bucket {:?} is not granted to this role",
                crate::error::shown(&name).to_string()
            )));
        }
        let bucket = Bucket {
            namespace: self.role.namespace.clone(),
        };
        self.table
            .push(bucket)
            .map_err(|e| StateError::Internal(format!("cannot open bucket: {e}")))
    }

    async fn get(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<Option<Vec<u8>>> {
        let key = self.bucket(&bucket)?.key(&key)?;
        self.backend.get(&key).await
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> StateResult<()> {
        let key = self.bucket(&bucket)?.key(&key)?;
        self.check_value(&value)?;
        self.backend.set(&key, &value, ttl(ttl_ms)?).await
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<bool> {
        let key = self.bucket(&bucket)?.key(&key)?;
        Ok(self.backend.delete_many(&[key]).await? > 0)
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<bool> {
        let key = self.bucket(&bucket)?.key(&key)?;
        self.backend.exists(&key).await
    }

    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> StateResult<Vec<Option<Vec<u8>>>> {
        self.check_batch(keys.len())?;
        let keys = self.bucket(&bucket)?.keys(&keys)?;
        self.backend.get_many(&keys).await
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        entries: Vec<Entry>,
        ttl_ms: Option<u64>,
    ) -> StateResult<()> {
        self.check_batch(entries.len())?;
        let bucket = self.bucket(&bucket)?;
        let entries = entries
            .into_iter()
            .map(|Entry { key, value }| Ok((bucket.key(&key)?, value)))
            .collect::<StateResult<Vec<_>>>()?;
        for (_, value) in &entries {
            self.check_value(value)?;
        }
        self.backend.set_many(&entries, ttl(ttl_ms)?).await
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> StateResult<u32> {
        self.check_batch(keys.len())?;
        let keys = self.bucket(&bucket)?.keys(&keys)?;
        let deleted = self.backend.delete_many(&keys).await?;
        Ok(deleted as u32)
    }

    async fn expiry(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<Expiry> {
        let key = self.bucket(&bucket)?.key(&key)?;
        Ok(self.backend.expiry(&key).await?.into())
    }

    async fn expire(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        ttl_ms: Option<u64>,
    ) -> StateResult<bool> {
        let key = self.bucket(&bucket)?.key(&key)?;
        self.backend.expire(&key, ttl(ttl_ms)?).await
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        pattern: Option<String>,
        cursor: Option<String>,
        limit: u32,
    ) -> StateResult<KeyPage> {
        let namespace = self.bucket(&bucket)?.namespace.clone();
        let (keys, cursor) = self
            .list_names(&namespace, Space::Kv, pattern, cursor, limit)
            .await?;
        Ok(KeyPage { keys, cursor })
    }

    async fn clear(&mut self, bucket: Resource<Bucket>) -> StateResult<u64> {
        let pattern = self.bucket(&bucket)?.namespace.pattern(Space::Kv, None)?;
        self.backend.delete_matching(&pattern).await
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}
