//! Benchmark role: an empty request does nothing; `gs` reads the key `k`
//! and writes 100 bytes to it (one GET and one SET).

use rolehost_guest::{export_role, Bucket, Result, Role};

struct Bench;

impl Role for Bench {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>> {
        if request == b"gs" {
            let bucket = Bucket::own()?;
            let _ = bucket.get("k")?;
            bucket.set("k", [b'v'; 100])?;
        }
        Ok(Vec::new())
    }
}

export_role!(Bench);
