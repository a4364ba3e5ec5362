//! `rolehost:state/atomics`: single-key operations that are atomic across
//! every host sharing the backend.

use wasmtime::component::Resource;

use super::{ttl, CallCtx};
use crate::bindings::atomics::Host;
use crate::error::StateResult;
use crate::state::kv::Bucket;

impl Host for CallCtx {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> StateResult<i64> {
        let key = self.bucket(&bucket)?.key(&key)?;
        self.backend.increment(&key, delta).await
    }

    async fn set_if_absent(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> StateResult<bool> {
        let key = self.bucket(&bucket)?.key(&key)?;
        self.check_value(&value)?;
        self.backend.set_if_absent(&key, &value, ttl(ttl_ms)?).await
    }

    async fn compare_and_swap(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
    ) -> StateResult<bool> {
        let key = self.bucket(&bucket)?.key(&key)?;
        if let Some(value) = &new {
            self.check_value(value)?;
        }
        let ttl = ttl(ttl_ms)?;
        self.backend
            .compare_and_swap(&key, expected.as_deref(), new.as_deref(), ttl)
            .await
    }

    async fn get_and_delete(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> StateResult<Option<Vec<u8>>> {
        let key = self.bucket(&bucket)?.key(&key)?;
        self.backend.get_and_delete(&key).await
    }
}
