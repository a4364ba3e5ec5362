//! Takes the lock `job`, appends its fencing token to the shared key `log`
//! (a read-modify-write that only the lock makes safe), releases the lock,
//! and answers with the token. While holding the lock it also marks the key
//! `holder`; finding it already marked means two holders at once, which the
//! role reports as an error.

use std::time::Duration;

use rolehost_guest::{export_role, Bucket, Error, Lock, Result, Role};

struct Worker;

impl Role for Worker {
    fn handle(_request: Vec<u8>) -> Result<Vec<u8>> {
        let lock = Lock::acquire("job", Duration::from_secs(5), Duration::from_secs(8))?
            .ok_or_else(|| Error::Unavailable("lock `job` stayed taken".into()))?;
        let token = lock.token();
        let bucket = Bucket::own()?;
        if !bucket.set_if_absent("holder", token.to_string(), Some(Duration::from_secs(5)))? {
            return Err(Error::Internal(format!("token {token}: another worker holds the lock too")));
        }
        // The mark goes whether or not the append worked: left behind, it
        // would make the next holder report two at once.
        let appended = append(&bucket, token);
        bucket.delete("holder")?;
        appended?;
        if !lock.release()? {
            return Err(Error::Internal(format!("token {token}: lost the lock before releasing it")));
        }
        Ok(token.to_string().into_bytes())
    }
}

/// Appends `token` to the comma-separated `log`.
fn append(bucket: &Bucket, token: u64) -> Result<()> {
    let mut log = bucket.get("log")?.unwrap_or_default();
    if !log.is_empty() {
        log.push(b',');
    }
    log.extend_from_slice(token.to_string().as_bytes());
    bucket.set("log", &log)
}

export_role!(Worker);
