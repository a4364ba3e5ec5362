//! Test role: runs the kv and atomics operations named in a JSON request
//! and answers `{"ok":…}` or `{"err":{"kind":…,"message":…}}`, so tests can
//! drive every call of the state API through a real component.
//! It can also misbehave on request (panic, spin, grow, print).

use std::collections::BTreeMap;
use std::time::Duration;

use rolehost_guest::{export_role, from_json, to_json, Bucket, Error, Expiry, Result, Role};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Get {
        key: String,
    },
    Set {
        key: String,
        #[serde(default)]
        value: String,
        len: Option<usize>,
        ttl_ms: Option<u64>,
    },
    Delete {
        key: String,
    },
    Exists {
        key: String,
    },
    GetMany {
        keys: Vec<String>,
    },
    SetMany {
        entries: BTreeMap<String, String>,
        ttl_ms: Option<u64>,
        count: Option<usize>,
    },
    DeleteMany {
        keys: Vec<String>,
    },
    Expiry {
        key: String,
    },
    Expire {
        key: String,
        ttl_ms: Option<u64>,
    },
    List {
        pattern: Option<String>,
        cursor: Option<String>,
        limit: u32,
    },
    ListAll {
        pattern: Option<String>,
    },
    ByPrefix {
        prefix: String,
    },
    Clear,
    Incr {
        key: String,
        delta: i64,
    },
    SetIfAbsent {
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    },
    Cas {
        key: String,
        expected: Option<String>,
        new: Option<String>,
        ttl_ms: Option<u64>,
    },
    GetAndDelete {
        key: String,
    },
    Open {
        name: String,
    },
    Log {
        message: String,
        times: usize,
    },
    Print {
        message: String,
        times: usize,
    },
    Respond {
        len: usize,
    },
    Panic,
    Spin,
    Grow,
    Batch {
        ops: Vec<Op>,
    },
}

fn text(bytes: Option<Vec<u8>>) -> Value {
    bytes.map_or(Value::Null, |b| {
        Value::String(String::from_utf8_lossy(&b).into_owned())
    })
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

fn run(bucket: &Bucket, op: Op) -> Result<Value> {
    Ok(match op {
        Op::Get { key } => text(bucket.get(&key)?),
        Op::Set {
            key,
            value,
            len,
            ttl_ms,
        } => {
            let value = match len {
                Some(len) => vec![b'x'; len],
                None => value.into_bytes(),
            };
            match ttl_ms {
                // Zero goes to the host as is, to test its refusal.
                Some(0) => bucket.set_with_ttl(&key, value, Duration::ZERO)?,
                Some(ms) => bucket.set_with_ttl(&key, value, Duration::from_millis(ms))?,
                None => bucket.set(&key, value)?,
            }
            Value::Null
        }
        Op::Delete { key } => json!(bucket.delete(&key)?),
        Op::Exists { key } => json!(bucket.exists(&key)?),
        Op::GetMany { keys } => {
            Value::Array(bucket.get_many(&keys)?.into_iter().map(text).collect())
        }
        Op::SetMany {
            entries,
            ttl_ms,
            count,
        } => {
            let mut entries: Vec<(String, String)> = entries.into_iter().collect();
            for i in 0..count.unwrap_or(0) {
                entries.push((format!("bulk:{i}"), i.to_string()));
            }
            bucket.set_many(&entries, ttl(ttl_ms))?;
            Value::Null
        }
        Op::DeleteMany { keys } => json!(bucket.delete_many(&keys)?),
        Op::Expiry { key } => match bucket.expiry(&key)? {
            Expiry::Missing => json!("missing"),
            Expiry::Persistent => json!("persistent"),
            Expiry::ExpiresIn(left) => json!(left.as_millis() as u64),
        },
        Op::Expire { key, ttl_ms } => match ttl_ms {
            Some(ms) => json!(bucket.expire(&key, Duration::from_millis(ms))?),
            None => json!(bucket.persist(&key)?),
        },
        Op::List {
            pattern,
            cursor,
            limit,
        } => {
            let page = bucket.list_keys_page(pattern.as_deref(), cursor.as_deref(), limit)?;
            json!({ "keys": page.keys, "cursor": page.cursor })
        }
        Op::ListAll { pattern } => {
            let mut keys = bucket.list_keys(pattern.as_deref())?;
            keys.sort();
            json!(keys)
        }
        Op::ByPrefix { prefix } => {
            let pairs: Vec<(String, Value)> = bucket
                .get_by_prefix(&prefix)?
                .into_iter()
                .map(|(k, v)| (k, text(Some(v))))
                .collect();
            json!(pairs)
        }
        Op::Clear => json!(bucket.clear()?),
        Op::Incr { key, delta } => json!(bucket.increment(&key, delta)?),
        Op::SetIfAbsent { key, value, ttl_ms } => {
            json!(bucket.set_if_absent(&key, value, ttl(ttl_ms))?)
        }
        Op::Cas {
            key,
            expected,
            new,
            ttl_ms,
        } => json!(bucket.compare_and_swap(
            &key,
            expected.as_deref().map(str::as_bytes),
            new.as_deref().map(str::as_bytes),
            ttl(ttl_ms)
        )?),
        Op::GetAndDelete { key } => text(bucket.get_and_delete(&key)?),
        Op::Open { name } => {
            Bucket::open(&name)?;
            Value::Null
        }
        Op::Log { message, times } => {
            for _ in 0..times {
                rolehost_guest::log::info(&message);
            }
            Value::Null
        }
        Op::Print { message, times } => {
            for _ in 0..times {
                println!("{message}");
            }
            Value::Null
        }
        Op::Respond { len } => json!("y".repeat(len)),
        Op::Panic => panic!("kvprobe was asked to panic"),
        Op::Spin => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Op::Grow => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Op::Batch { ops } => Value::Array(ops.into_iter().map(|op| answer(bucket, op)).collect()),
    })
}

fn answer(bucket: &Bucket, op: Op) -> Value {
    match run(bucket, op) {
        Ok(value) => json!({ "ok": value }),
        Err(error) => {
            let kind = match &error {
                Error::InvalidKey(_) => "invalid-key",
                Error::InvalidArgument(_) => "invalid-argument",
                Error::TooLarge(_) => "too-large",
                Error::AccessDenied(_) => "access-denied",
                Error::QuotaExceeded(_) => "quota-exceeded",
                Error::Unavailable(_) => "unavailable",
                Error::Internal(_) => "internal",
            };
            json!({ "err": { "kind": kind, "message": error.to_string() } })
        }
    }
}

struct KvProbe;

impl Role for KvProbe {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>> {
        let op: Op = from_json(&request)?;
        let bucket = Bucket::own()?;
        if let Op::Respond { len } = op {
            return Ok(vec![b'y'; len]);
        }
        to_json(&answer(&bucket, op))
    }
}

export_role!(KvProbe);
