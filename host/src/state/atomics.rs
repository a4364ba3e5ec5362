//! `rolehost:state/atomics`: single-key operations that are atomic across
//! every host sharing the backend.

use wasmtime::component::Resource;

use super::CallCtx;
use crate::bindings::atomics::Host;
use crate::error::StateResult;
use crate::state::kv::Bucket;

impl Host for CallCtx {
    async fn increment(&mut self, bucket: Resource<Bucket>, key: String, delta: i64) -> StateResult<i64> {
        let key = self.bucket_key(&bucket, &key, true)?;
        self.backend.increment(&key, delta, self.default_ttl()).await
    }

    async fn set_if_absent(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> StateResult<bool> {
        let key = self.bucket_key(&bucket, &key, true)?;
        self.check_value(&value)?;
        let ttl = self.write_ttl(ttl_ms)?;
        self.backend.set_if_absent(&key, &value, ttl).await
    }

    async fn compare_and_swap(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
    ) -> StateResult<bool> {
        let key = self.bucket_key(&bucket, &key, true)?;
        if let Some(value) = &new {
            self.check_value(value)?;
        }
        let ttl = self.write_ttl(ttl_ms)?;
        self.backend.compare_and_swap(&key, expected.as_deref(), new.as_deref(), ttl).await
    }

    async fn get_and_delete(&mut self, bucket: Resource<Bucket>, key: String) -> StateResult<Option<Vec<u8>>> {
        let key = self.bucket_key(&bucket, &key, true)?;
        let max = self.read_limit(self.bucket(&bucket)?.shared());
        self.backend.get_and_delete(&key, max).await.map_err(super::over_memory)
    }
}
