//! Benchmark role. Requests: empty does nothing; `gs` reads the key `k` and
//! writes 100 bytes to it (one GET and one SET); `sm` writes 1000 keys of
//! 100 bytes in one `set-many`; `gm` reads them in one `get-many`; `hold`
//! waits up to 2 s for the lock `gate`, which the benchmark holds, so the
//! call stays in flight.

use std::time::Duration;

use rolehost_guest::{export_role, Bucket, Lock, Result, Role};

struct Bench;

const BATCH: usize = 1000;

fn batch_keys() -> Vec<String> {
    (0..BATCH).map(|i| format!("m{i}")).collect()
}

impl Role for Bench {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>> {
        match request.as_slice() {
            b"gs" => {
                let bucket = Bucket::own()?;
                let _ = bucket.get("k")?;
                bucket.set("k", [b'v'; 100])?;
            }
            b"sm" => {
                let entries: Vec<(String, [u8; 100])> = batch_keys().into_iter().map(|k| (k, [b'v'; 100])).collect();
                Bucket::own()?.set_many(&entries, None)?;
            }
            b"gm" => {
                let found = Bucket::own()?.get_many(&batch_keys())?.into_iter().flatten().count();
                return Ok(found.to_string().into_bytes());
            }
            b"hold" => {
                let _ = Lock::acquire("gate", Duration::from_secs(10), Duration::from_secs(2))?;
            }
            _ => {}
        }
        Ok(Vec::new())
    }
}

export_role!(Bench);
