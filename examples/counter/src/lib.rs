//! Counts its calls: each call increments `count` atomically and answers
//! with the new value as decimal digits.

use rolehost_guest::{export_role, Bucket, Result, Role};

struct Counter;

impl Role for Counter {
    fn handle(_request: Vec<u8>) -> Result<Vec<u8>> {
        let count = Bucket::own()?.increment("count", 1)?;
        Ok(count.to_string().into_bytes())
    }
}

export_role!(Counter);
