//! Test role: runs the kv and atomics operations named in a JSON request
//! and answers `{"ok":…}` or `{"err":{"kind":…,"message":…}}`, so tests can
//! drive every call of the state API through a real component.
//! It can also misbehave on request (panic, spin, grow, print).

use std::collections::BTreeMap;
use std::time::Duration;

use rolehost_guest::{
    export_role, from_json, rate_limit_in, to_json, Bucket, Error, Expiry, Kind, Lock, Result, Role, Subject,
};
use serde::Deserialize;
use serde_json::{json, Value};

thread_local! {
    /// Handles a `hoard` with `keep` left open.
    static HOARD: std::cell::RefCell<Vec<(Vec<Subject>, Vec<Lock>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

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
    SetLater {
        key: String,
        #[serde(default)]
        value: String,
        len: Option<usize>,
        ttl_ms: Option<u64>,
    },
    DeleteLater {
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
    Count {
        pattern: Option<String>,
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
    SubjectGet {
        subject: String,
        #[serde(default)]
        extended: bool,
        prop: String,
    },
    SubjectLoad {
        subject: String,
    },
    SubjectExists {
        subject: String,
    },
    SubjectStore {
        subject: String,
        #[serde(default)]
        set: BTreeMap<String, Value>,
        #[serde(default)]
        extended: BTreeMap<String, Value>,
        #[serde(default)]
        remove: Vec<String>,
        #[serde(default = "yes")]
        store: bool,
    },
    /// Buffers `props` writes of `len` bytes on each of `subjects`
    /// subjects, storing none: host memory the guest asks to hold.
    SubjectFill {
        subjects: usize,
        props: usize,
        len: usize,
    },
    /// Opens `count` subjects (or locks) named with `name_len` bytes and
    /// keeps them open: to the end of the call, or with `keep` for as long
    /// as the instance lives (across calls of a warm one). Then sleeps
    /// `sleep_ms` before returning.
    Hoard {
        #[serde(default)]
        locks: bool,
        count: usize,
        name_len: usize,
        #[serde(default)]
        keep: bool,
        #[serde(default)]
        sleep_ms: u64,
    },
    SubjectSetRaw {
        subject: String,
        prop: String,
        json: String,
    },
    SubjectIncr {
        subject: String,
        #[serde(default)]
        extended: bool,
        prop: String,
        delta: i64,
        #[serde(default = "one")]
        times: usize,
    },
    SubjectIncrFloat {
        subject: String,
        prop: String,
        delta: f64,
    },
    SubjectCas {
        subject: String,
        prop: String,
        expected: Option<String>,
        new: Option<String>,
    },
    SubjectUpdate {
        subject: String,
        prop: String,
        #[serde(default = "one")]
        times: usize,
    },
    /// An update whose every attempt loses to a write made meanwhile.
    SubjectUpdateContended {
        subject: String,
        prop: String,
    },
    SubjectDelete {
        subject: String,
    },
    SubjectExpire {
        subject: String,
        ttl_ms: Option<u64>,
    },
    SubjectExpiry {
        subject: String,
    },
    SubjectList {
        pattern: Option<String>,
    },
    LockHold {
        name: String,
        ttl_ms: u64,
        wait_ms: u64,
        #[serde(default)]
        sleep_ms: u64,
    },
    /// Takes lock `name`, sleeps `before_ms`, releases it, sleeps
    /// `after_ms` and leaves its handle undropped (so only the host's
    /// release at the end of the call is left): the release's error, if
    /// it failed.
    LockReleaseFails {
        name: String,
        before_ms: u64,
        after_ms: u64,
    },
    LockTakeover {
        name: String,
    },
    RateCheck {
        key: String,
        limit: u64,
        window_ms: u64,
        #[serde(default = "one_u64")]
        cost: u64,
    },
    Recurse {
        depth: u64,
    },
    ReadEnv {
        name: String,
    },
    ListEnv,
    ReadFile {
        path: String,
    },
    ListDir {
        path: String,
    },
    Connect {
        addr: String,
    },
    /// Keeps `value` in the instance's memory; answers what was kept there
    /// before (always "" in a fresh instance).
    Stash {
        value: String,
    },
}

static STASH: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Fields every request may carry besides its operation.
#[derive(Deserialize)]
struct Envelope {
    /// The namespace to work in: "" (the role's own) or a granted one.
    #[serde(default)]
    ns: String,
}

/// Recursion the optimizer cannot turn into a loop. Its frames live on
/// the wasm call stack (no locals in linear memory), so deep recursion
/// exhausts the engine's stack limit.
fn recurse(depth: u64) -> u64 {
    if depth == 0 {
        return 0;
    }
    std::hint::black_box(recurse(std::hint::black_box(depth - 1))) + (depth % 2)
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

fn one_u64() -> u64 {
    1
}

fn kind(extended: bool) -> Kind {
    if extended {
        Kind::Extended
    } else {
        Kind::Default
    }
}

fn text(bytes: Option<Vec<u8>>) -> Value {
    bytes.map_or(Value::Null, |b| Value::String(String::from_utf8_lossy(&b).into_owned()))
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

fn run(ns: &str, op: Op) -> Result<Value> {
    let bucket = &Bucket::open(ns)?;
    Ok(match op {
        Op::Get { key } => text(bucket.get(&key)?),
        Op::Set { key, value, len, ttl_ms } => {
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
        Op::SetLater { key, value, len, ttl_ms } => {
            let value = len.map_or(value.into_bytes(), |len| vec![b'x'; len]);
            bucket.set_later(&key, value, ttl(ttl_ms))?;
            Value::Null
        }
        Op::DeleteLater { key } => {
            bucket.delete_later(&key)?;
            Value::Null
        }
        Op::Exists { key } => json!(bucket.exists(&key)?),
        Op::GetMany { keys } => Value::Array(bucket.get_many(&keys)?.into_iter().map(text).collect()),
        Op::SetMany { entries, ttl_ms, count } => {
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
        Op::List { pattern, cursor, limit } => {
            let page = bucket.list_keys_page(pattern.as_deref(), cursor.as_deref(), limit)?;
            json!({ "keys": page.keys, "cursor": page.cursor })
        }
        Op::ListAll { pattern } => {
            let mut keys = bucket.list_keys(pattern.as_deref())?;
            keys.sort();
            json!(keys)
        }
        Op::ByPrefix { prefix } => {
            let pairs: Vec<(String, Value)> =
                bucket.get_by_prefix(&prefix)?.into_iter().map(|(k, v)| (k, text(Some(v)))).collect();
            json!(pairs)
        }
        Op::Count { pattern } => json!(bucket.count(pattern.as_deref())?),
        Op::Clear => json!(bucket.clear()?),
        Op::Incr { key, delta } => json!(bucket.increment(&key, delta)?),
        Op::SetIfAbsent { key, value, ttl_ms } => {
            json!(bucket.set_if_absent(&key, value, ttl(ttl_ms))?)
        }
        Op::Cas { key, expected, new, ttl_ms } => json!(bucket.compare_and_swap(
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
        Op::SubjectGet { subject, extended, prop } => {
            json!(Subject::open_in(ns, &subject)?.get_raw(kind(extended), &prop)?)
        }
        Op::SubjectLoad { subject } => {
            let snapshot = Subject::open_in(ns, &subject)?.load()?;
            json!({ "default": snapshot.default, "extended": snapshot.extended })
        }
        Op::SubjectExists { subject } => json!(Subject::open_in(ns, &subject)?.exists()?),
        Op::SubjectStore { subject, set, extended, remove, store } => {
            let subject = Subject::open_in(ns, &subject)?;
            for (prop, value) in &set {
                subject.set(prop, value)?;
            }
            for (prop, value) in &extended {
                subject.set_extended(prop, value)?;
            }
            for prop in &remove {
                subject.remove(Kind::Default, prop)?;
            }
            let pending = subject.pending();
            if store {
                subject.store()?;
            }
            json!({ "pending": pending, "after_store": subject.pending() })
        }
        Op::SubjectFill { subjects, props, len } => {
            let value = Value::String("x".repeat(len));
            let mut open = Vec::new();
            for i in 0..subjects {
                let subject = Subject::open_in(ns, &format!("fill{i}"))?;
                for p in 0..props {
                    subject.set(&format!("p{p}"), &value)?;
                }
                open.push(subject);
            }
            json!(open.len())
        }
        Op::Hoard { locks, count, name_len, keep, sleep_ms } => {
            let mut subjects = Vec::new();
            let mut held = Vec::new();
            for i in 0..count {
                let name = format!("{i:0>name_len$}");
                match locks {
                    true => held.extend(Lock::acquire(&name, Duration::from_secs(60), Duration::ZERO)?),
                    false => subjects.push(Subject::open_in(ns, &name)?),
                }
            }
            let opened = subjects.len() + held.len();
            if keep {
                HOARD.with(|hoard| hoard.borrow_mut().push((subjects, held)));
            }
            std::thread::sleep(Duration::from_millis(sleep_ms));
            json!(opened)
        }
        Op::SubjectSetRaw { subject, prop, json } => {
            // Straight to the WIT call, so invalid JSON reaches the host.
            let subject = Subject::open_in(ns, &subject)?;
            subject.compare_and_set(Kind::Default, &prop, None, Some(&json))?;
            Value::Null
        }
        Op::SubjectIncr { subject, extended, prop, delta, times } => {
            let subject = Subject::open_in(ns, &subject)?;
            let mut last = 0;
            for _ in 0..times {
                last = subject.increment(kind(extended), &prop, delta)?;
            }
            json!(last)
        }
        Op::SubjectIncrFloat { subject, prop, delta } => {
            json!(Subject::open_in(ns, &subject)?.increment_float(Kind::Default, &prop, delta)?)
        }
        Op::SubjectCas { subject, prop, expected, new } => {
            json!(Subject::open_in(ns, &subject)?.compare_and_set(
                Kind::Default,
                &prop,
                expected.as_deref(),
                new.as_deref()
            )?)
        }
        Op::SubjectUpdate { subject, prop, times } => {
            let subject = Subject::open_in(ns, &subject)?;
            let mut last = None;
            for _ in 0..times {
                last = subject.update(Kind::Default, &prop, |old: Option<i64>| Some(old.unwrap_or(0) + 1))?;
            }
            json!(last)
        }
        Op::SubjectUpdateContended { subject, prop } => {
            let (subject, rival) = (Subject::open_in(ns, &subject)?, Subject::open_in(ns, &subject)?);
            let mut attempts = 0;
            let updated = subject.update(Kind::Default, &prop, |old: Option<i64>| {
                attempts += 1;
                rival.increment(Kind::Default, &prop, 1).expect("the rival's write");
                Some(old.unwrap_or(0) + 1)
            });
            match updated {
                Err(Error::Conflict(message)) => json!({"attempts": attempts, "conflict": message}),
                other => json!({"unexpected": format!("{other:?}")}),
            }
        }
        Op::SubjectDelete { subject } => json!(Subject::open_in(ns, &subject)?.delete()?),
        Op::SubjectExpire { subject, ttl_ms } => match ttl_ms {
            Some(ms) => json!(Subject::open_in(ns, &subject)?.expire(Duration::from_millis(ms))?),
            None => json!(Subject::open_in(ns, &subject)?.persist()?),
        },
        Op::SubjectExpiry { subject } => match Subject::open_in(ns, &subject)?.expiry()? {
            Expiry::Missing => json!("missing"),
            Expiry::Persistent => json!("persistent"),
            Expiry::ExpiresIn(left) => json!(left.as_millis() as u64),
        },
        Op::SubjectList { pattern } => {
            let mut names = Subject::list_in(ns, pattern.as_deref())?;
            names.sort();
            json!(names)
        }
        Op::LockReleaseFails { name, before_ms, after_ms } => {
            // The WIT resource itself: the SDK's would be dropped (and so
            // released again) by its `release`.
            use rolehost_guest::bindings::rolehost::state::locks::Lock as Raw;
            let lock = Raw::acquire(ns, &name, 60_000, 0)
                .map_err(|e| Error::Internal(format!("{e:?}")))?
                .ok_or_else(|| Error::Internal("lock was taken".into()))?;
            std::thread::sleep(Duration::from_millis(before_ms));
            let released = lock.release();
            std::thread::sleep(Duration::from_millis(after_ms));
            std::mem::forget(lock);
            json!(released.err().map(|e| format!("{e:?}")))
        }
        Op::LockHold { name, ttl_ms, wait_ms, sleep_ms } => {
            match Lock::acquire_in(ns, &name, Duration::from_millis(ttl_ms), Duration::from_millis(wait_ms))? {
                None => Value::Null,
                Some(lock) => {
                    std::thread::sleep(Duration::from_millis(sleep_ms));
                    json!(lock.token())
                }
            }
        }
        Op::LockTakeover { name } => {
            // The first grant expires, a second takes the lock, and the
            // first, no longer the owner, can neither extend nor release.
            drop(Lock::acquire_in(ns, &name, Duration::from_secs(60), Duration::ZERO)?);
            let after_drop = Lock::acquire_in(ns, &name, Duration::from_secs(60), Duration::ZERO)?
                .map(|lock| lock.release())
                .transpose()?;
            let first = Lock::acquire_in(ns, &name, Duration::from_millis(100), Duration::ZERO)?
                .ok_or_else(|| Error::Internal("lock was taken".into()))?;
            let held = Lock::acquire_in(ns, &name, Duration::from_secs(5), Duration::ZERO)?.is_some();
            std::thread::sleep(Duration::from_millis(250));
            let second = Lock::acquire_in(ns, &name, Duration::from_secs(5), Duration::ZERO)?
                .ok_or_else(|| Error::Internal("expired lock could not be taken".into()))?;
            json!({
                "released_by_drop": after_drop == Some(true),
                "taken_while_held": held,
                "first": first.token(),
                "second": second.token(),
                "stale_extend": first.extend(Duration::from_secs(5))?,
                "stale_release": first.release()?,
                "owner_extend": second.extend(Duration::from_secs(5))?,
                "owner_release": second.release()?,
            })
        }
        Op::RateCheck { key, limit, window_ms, cost } => {
            let d = rate_limit_in(ns, &key, limit, Duration::from_millis(window_ms), cost)?;
            json!({
                "allowed": d.allowed,
                "remaining": d.remaining,
                "reset_after_ms": d.reset_after.as_millis() as u64,
                "retry_after_ms": d.retry_after.as_millis() as u64,
            })
        }
        Op::Stash { value } => {
            let mut stash = STASH.lock().unwrap_or_else(|p| p.into_inner());
            json!(std::mem::replace(&mut *stash, value))
        }
        Op::Batch { ops } => Value::Array(ops.into_iter().map(|op| answer(ns, op)).collect()),
        Op::Recurse { depth } => json!(recurse(depth)),
        Op::ReadEnv { name } => json!(std::env::var(&name).ok()),
        Op::ListEnv => json!(std::env::vars().map(|(k, _)| k).collect::<Vec<_>>()),
        Op::ReadFile { path } => match std::fs::read_to_string(&path) {
            Ok(text) => json!(text),
            Err(e) => return Err(Error::AccessDenied(format!("read {path}: {e}"))),
        },
        Op::ListDir { path } => match std::fs::read_dir(&path) {
            Ok(entries) => json!(entries
                .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect::<Vec<_>>()),
            Err(e) => return Err(Error::AccessDenied(format!("list {path}: {e}"))),
        },
        Op::Connect { addr } => match std::net::TcpStream::connect(&addr) {
            Ok(_) => json!("connected"),
            Err(e) => return Err(Error::AccessDenied(format!("connect {addr}: {e}"))),
        },
    })
}

fn answer(ns: &str, op: Op) -> Value {
    match run(ns, op) {
        Ok(value) => json!({ "ok": value }),
        Err(error) => {
            let kind = match &error {
                Error::InvalidKey(_) => "invalid-key",
                Error::InvalidArgument(_) => "invalid-argument",
                Error::TooLarge(_) => "too-large",
                Error::AccessDenied(_) => "access-denied",
                Error::QuotaExceeded(_) => "quota-exceeded",
                Error::Unavailable(_) => "unavailable",
                Error::Conflict(_) => "conflict",
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
        let Envelope { ns } = from_json(&request)?;
        if let Op::Respond { len } = op {
            return Ok(vec![b'y'; len]);
        }
        to_json(&answer(&ns, op))
    }
}

export_role!(KvProbe);
