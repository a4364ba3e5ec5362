//! Checkpoints: one role's kv keys and subjects, with remaining TTLs, in a
//! portable JSON file that restores into any backend.
//!
//! ```json
//! { "format": "rolehost-checkpoint/1", "role": "counter", "created_unix_ms": 1795318192000,
//!   "kv": [ { "key": "count", "value_base64": "Mw==", "ttl_ms": null } ],
//!   "subjects": [ { "name": "user-u1", "ttl_ms": 60000,
//!                   "fields": { "plogin_count": "3", "elast_login": "1795318192" } } ] }
//! ```
//! Keys are local names; subject fields keep their `p`/`e` prefixes. Locks,
//! fencing counters and rate limiters are transient and not included.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Expiry};
use crate::error::{StateError, StateResult};
use crate::limits::{RoleLimits, MAX_TTL_MS};
use crate::namespace::{Namespace, Space};

/// The format tag of this version.
pub const FORMAT: &str = "rolehost-checkpoint/1";

/// One role's state: each key as it was when read (a checkpoint of a
/// running role is not one instant's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Always [`FORMAT`].
    pub format: String,
    /// The role it was taken from.
    pub role: String,
    /// When it was taken.
    pub created_unix_ms: u64,
    /// Every kv key.
    pub kv: Vec<KvEntry>,
    /// Every subject.
    pub subjects: Vec<SubjectEntry>,
}

/// A kv key with its value and remaining TTL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The local key.
    pub key: String,
    /// The value, base64.
    pub value_base64: String,
    /// Remaining TTL; none: persistent.
    pub ttl_ms: Option<u64>,
}

/// A subject with its fields and remaining TTL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectEntry {
    /// The subject's name.
    pub name: String,
    /// Remaining TTL; none: persistent.
    pub ttl_ms: Option<u64>,
    /// Hash fields as stored (`p…` default, `e…` extended), JSON text.
    pub fields: BTreeMap<String, String>,
}

/// Every key of `space`, each once (a Redis scan may name a key twice).
async fn all_keys(backend: &dyn Backend, namespace: &Namespace, space: Space) -> StateResult<Vec<String>> {
    let pattern = namespace.pattern(space, None)?;
    let mut keys = std::collections::BTreeSet::new();
    let mut cursor = None;
    loop {
        let page = backend.scan(&pattern, cursor.as_deref(), 1000).await?;
        keys.extend(page.keys);
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(keys.into_iter().collect()),
        }
    }
}

/// A TTL as the checkpoint keeps it: counted from `created_unix_ms`, for a
/// key read at `read_unix_ms` (so a long checkpoint shortens no TTL by the
/// time it took to reach the key). `None`: missing; `Some(None)`: persistent.
fn ttl_ms(expiry: Expiry, created_unix_ms: u64, read_unix_ms: u64) -> Option<Option<u64>> {
    match expiry {
        Expiry::Missing => None,
        Expiry::Persistent => Some(None),
        Expiry::ExpiresIn(left) => {
            Some(Some((left.as_millis() as u64).max(1) + read_unix_ms.saturating_sub(created_unix_ms)))
        }
    }
}

/// Reads every kv key and subject of `role` (whose namespace is `namespace`).
/// Each is read as it is then, one after the other, while the role may run.
pub async fn take(backend: &dyn Backend, namespace: &Namespace, role: &str) -> StateResult<Checkpoint> {
    // TTLs count from here. Each key's is its remaining TTL read after its
    // value, plus the time from here until just before that read: restored
    // keys may expire a little early (by the time between the two reads),
    // never late.
    let created_unix_ms = now_unix_ms();
    let mut kv = Vec::new();
    for full in all_keys(backend, namespace, Space::Kv).await? {
        let read = now_unix_ms();
        let value = backend.get(&full, None).await?;
        let ttl = ttl_ms(backend.expiry(&full).await?, created_unix_ms, read);
        let (Some(value), Some(ttl)) = (value, ttl) else {
            continue; // expired or deleted meanwhile
        };
        let key = namespace.local(Space::Kv, &full).unwrap_or_default().to_owned();
        kv.push(KvEntry { key, value_base64: base64::engine::general_purpose::STANDARD.encode(value), ttl_ms: ttl });
    }
    let mut subjects = Vec::new();
    for full in all_keys(backend, namespace, Space::Subject).await? {
        let read = now_unix_ms();
        let fields = backend.hash_get_all(&full, usize::MAX).await?;
        let Some(ttl) = ttl_ms(backend.expiry(&full).await?, created_unix_ms, read) else { continue };
        if fields.is_empty() {
            continue;
        }
        let fields = fields.into_iter().map(|(f, v)| (f, String::from_utf8_lossy(&v).into_owned())).collect();
        let name = namespace.local(Space::Subject, &full).unwrap_or_default().to_owned();
        subjects.push(SubjectEntry { name, ttl_ms: ttl, fields });
    }
    Ok(Checkpoint { format: FORMAT.to_owned(), role: role.to_owned(), created_unix_ms, kv, subjects })
}

/// What a restore wrote, and what it left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// kv keys written.
    pub kv: usize,
    /// Subjects written.
    pub subjects: usize,
    /// Keys and subjects whose TTL ran out since the checkpoint was taken.
    pub expired: usize,
}

/// Writes every key and subject of `checkpoint` into `namespace`, replacing
/// what is there under the same names and keeping the rest, under the
/// target role's `limits` (value size and TTL policy, as the role's own
/// writes). TTLs count from when the checkpoint was taken, as an RDB file's
/// do: what expired since is left out.
pub async fn restore(
    backend: &dyn Backend,
    namespace: &Namespace,
    limits: &RoleLimits,
    checkpoint: &Checkpoint,
) -> StateResult<Restored> {
    if checkpoint.format != FORMAT {
        return Err(StateError::InvalidArgument(format!("unknown checkpoint format {:?}", checkpoint.format)));
    }
    let age = || now_unix_ms().saturating_sub(checkpoint.created_unix_ms);
    let checked_at = age();
    // Everything is checked before anything is written: a bad entry
    // (named in the error) leaves the role's state as it was. `None`:
    // expired since.
    let ttl = |what: &str, ms: Option<u64>| match ms {
        Some(ms) if ms == 0 || ms > MAX_TTL_MS => {
            Err(StateError::InvalidArgument(format!("{what}: a TTL of {ms} ms is outside 1 ms to {MAX_TTL_MS} ms")))
        }
        Some(ms) if ms <= checked_at => Ok(None),
        Some(ms) => match limits.write_ttl(Some(Duration::from_millis(ms - checked_at))) {
            Ok(_) => Ok(Some(Ttl::Counted(ms))),
            Err(e) => Err(StateError::InvalidArgument(format!("{what}: {e}"))),
        },
        None => Ok(Some(Ttl::Fixed(limits.default_ttl()))),
    };
    let max_value_bytes = limits.max_value_bytes;
    let check_size = |what: &str, len: usize| match len > max_value_bytes {
        true => Err(StateError::TooLarge(format!(
            "{what}: a value of {len} bytes is over the role's limit of {max_value_bytes} bytes"
        ))),
        false => Ok(()),
    };
    let mut expired = 0;
    let mut kv = Vec::with_capacity(checkpoint.kv.len());
    for entry in &checkpoint.kv {
        let what = format!("key {:?}", entry.key);
        let value = base64::engine::general_purpose::STANDARD
            .decode(&entry.value_base64)
            .map_err(|e| StateError::InvalidArgument(format!("{what}: bad base64: {e}")))?;
        check_size(&what, value.len())?;
        let key = namespace.key(Space::Kv, &entry.key).map_err(|e| e.context(&what))?;
        match ttl(&what, entry.ttl_ms)? {
            Some(ttl) => kv.push((key, value, ttl)),
            None => expired += 1,
        }
    }
    let mut subjects = Vec::with_capacity(checkpoint.subjects.len());
    for subject in &checkpoint.subjects {
        let what = format!("subject {:?}", subject.name);
        let key = namespace.key(Space::Subject, &subject.name).map_err(|e| e.context(&what))?;
        if subject.fields.is_empty() {
            return Err(StateError::InvalidArgument(format!(
                "{what}: no fields (a subject without any does not exist)"
            )));
        }
        // Each field as the state API writes it: a tagged property name and
        // JSON text within the role's value limit.
        for (field, value) in &subject.fields {
            let what = format!("{what} field {field:?}");
            let (_, property) = crate::state::subjects::property_of(field).ok_or_else(|| {
                StateError::InvalidArgument(format!("{what}: a field starts with p (default) or e (extended)"))
            })?;
            namespace.check_name("property", property).map_err(|e| e.context(&what))?;
            check_size(&what, value.len())?;
            crate::state::subjects::check_json(value).map_err(|e| e.context(&what))?;
        }
        let fields: Vec<(String, Vec<u8>)> =
            subject.fields.iter().map(|(f, v)| (f.clone(), v.clone().into_bytes())).collect();
        match ttl(&what, subject.ttl_ms)? {
            Some(ttl) => subjects.push((key, fields, ttl)),
            None => expired += 1,
        }
    }
    // Should a write fail, the error says how far the restore got (the
    // entries before it are written; running it again is safe).
    let stopped = |error: StateError, entry: &str, done: usize| {
        let what = format!("{entry}, after {done} of {} kv keys and subjects were written", kv.len() + subjects.len());
        error.context(&what)
    };
    let mut restored = Restored { kv: 0, subjects: 0, expired };
    for (key, value, ttl) in &kv {
        // Counted as the entry is written: a long restore makes none
        // outlive its time.
        let Some(ttl) = ttl.left(age()) else {
            restored.expired += 1;
            continue;
        };
        let local = namespace.local(Space::Kv, key).unwrap_or(key);
        let done = restored.kv;
        backend.set(key, value, ttl).await.map_err(|e| stopped(e, &format!("kv key {local:?}"), done))?;
        restored.kv += 1;
    }
    for (key, fields, ttl) in &subjects {
        // Counted as the entry is written: a long restore makes none
        // outlive its time.
        let Some(ttl) = ttl.left(age()) else {
            restored.expired += 1;
            continue;
        };
        // The fields it had and the checkpoint lacks go in the same atomic
        // step as the new ones are written: should that fail, the subject
        // is left as it was. A new subject gets its TTL in that step too.
        let write = async {
            let old = backend.hash_get_all(key, usize::MAX).await?;
            if old.is_empty() {
                return backend.hash_apply(key, fields, &[], ttl).await;
            }
            let gone: Vec<String> =
                old.into_iter().map(|(field, _)| field).filter(|f| !fields.iter().any(|(new, _)| new == f)).collect();
            backend.hash_apply(key, fields, &gone, None).await?;
            match backend.expire(key, ttl).await? {
                true => Ok(()),
                false => Err(StateError::Unavailable("it expired as it was written; restore again".into())),
            }
        };
        let local = namespace.local(Space::Subject, key).unwrap_or(key);
        let done = restored.kv + restored.subjects;
        write.await.map_err(|e| stopped(e, &format!("subject {local:?}"), done))?;
        restored.subjects += 1;
    }
    Ok(restored)
}

/// A restored entry's TTL: `Counted` milliseconds from when the checkpoint
/// was taken, or `Fixed` (none, or the role's default for a key the
/// checkpoint holds as persistent).
enum Ttl {
    Counted(u64),
    Fixed(Option<Duration>),
}

impl Ttl {
    /// The TTL to write `age_ms` after the checkpoint was taken; `None`
    /// when it has run out.
    fn left(&self, age_ms: u64) -> Option<Option<Duration>> {
        match *self {
            Ttl::Counted(ms) => {
                let left = ms.saturating_sub(age_ms);
                (left > 0).then(|| Some(Duration::from_millis(left)))
            }
            Ttl::Fixed(ttl) => Some(ttl),
        }
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use std::collections::BTreeSet;

    fn checkpoint(fields: &[(&str, &str)]) -> Checkpoint {
        let fields = fields.iter().map(|(f, v)| (f.to_string(), v.to_string())).collect();
        Checkpoint {
            format: FORMAT.into(),
            role: "app".into(),
            created_unix_ms: now_unix_ms(),
            kv: vec![KvEntry { key: "k".into(), value_base64: "dg==".into(), ttl_ms: None }],
            subjects: vec![SubjectEntry { name: "user".into(), ttl_ms: None, fields }],
        }
    }

    #[tokio::test]
    async fn restore_refuses_subject_fields_the_state_api_would_refuse() {
        let backend = MemoryBackend::new();
        let limits = RoleLimits { max_value_bytes: 100, ..RoleLimits::default() };
        let namespace = Namespace::new("t:", "app", &limits);
        let long = format!("\"{}\"", "x".repeat(200));
        let refused = [
            (("pname", "not json"), "invalid-argument", "not JSON"),
            (("xname", "1"), "invalid-argument", "starts with p"),
            (("p", "1"), "invalid-key", "empty property"),
            (("pa\nb", "1"), "invalid-key", "control character"),
            (("pname", long.as_str()), "too-large", "over the role's limit"),
        ];
        for ((field, value), kind, words) in refused {
            let error =
                restore(&backend, &namespace, &limits, &checkpoint(&[("pok", "1"), (field, value)])).await.unwrap_err();
            assert_eq!(error.kind(), kind, "{field:?}: {error}");
            assert!(error.to_string().contains(words) && error.to_string().contains("subject \"user\""), "{error}");
        }
        // Checked before anything was written: nothing of the refused ones.
        assert!(!backend.exists("t:app:kv:k").await.unwrap());
        let good = checkpoint(&[("pok", "1"), ("elast", "{\"at\":5}")]);
        assert_eq!(restore(&backend, &namespace, &limits, &good).await.unwrap().subjects, 1);
        assert_eq!(backend.hash_get("t:app:s:user", "elast", None).await.unwrap(), Some(b"{\"at\":5}".to_vec()));
        let empty = restore(&backend, &namespace, &limits, &checkpoint(&[])).await.unwrap_err();
        assert!(empty.to_string().contains("no fields"), "{empty}");
        assert!(backend.exists("t:app:s:user").await.unwrap(), "the subject is left as it was");
    }

    /// A TTL counts from when the checkpoint was taken: a key read 3 s into
    /// it with 5 s left is kept with 8 s from then, not 5.
    #[test]
    fn ttls_count_from_the_checkpoint_plus_the_time_to_reach_the_key() {
        let left = Expiry::ExpiresIn(Duration::from_secs(5));
        assert_eq!(ttl_ms(left, 1_000, 4_000), Some(Some(8_000)));
        assert_eq!(ttl_ms(Expiry::Persistent, 1_000, 4_000), Some(None));
        assert_eq!(ttl_ms(Expiry::Missing, 1_000, 4_000), None);
    }

    /// A TTL is what is left of it when its entry is written.
    #[test]
    fn a_counted_ttl_is_what_is_left_at_the_write() {
        assert_eq!(Ttl::Counted(5_000).left(3_000), Some(Some(Duration::from_millis(2_000))));
        assert_eq!(Ttl::Counted(5_000).left(5_000), None, "ran out");
        assert_eq!(Ttl::Counted(5_000).left(9_000), None);
        assert_eq!(Ttl::Fixed(None).left(9_000), Some(None), "persistent stays");
    }

    /// TTLs count from when the checkpoint was taken, as each entry is
    /// written; one that ran out is left out and counted as expired. A new
    /// subject gets its TTL with its fields.
    #[tokio::test]
    async fn restore_counts_each_ttl_when_it_writes_the_entry() {
        let backend = MemoryBackend::new();
        let limits = RoleLimits::default();
        let namespace = Namespace::new("t:", "app", &limits);
        let mut cp = checkpoint(&[("pa", "1")]);
        cp.created_unix_ms = now_unix_ms() - 60_000;
        cp.kv[0].ttl_ms = Some(120_000);
        cp.subjects[0].ttl_ms = Some(90_000);
        let restored = restore(&backend, &namespace, &limits, &cp).await.unwrap();
        assert_eq!(restored, Restored { kv: 1, subjects: 1, expired: 0 });
        for (key, most) in [("t:app:kv:k", 60_000), ("t:app:s:user", 30_000)] {
            let Expiry::ExpiresIn(left) = backend.expiry(key).await.unwrap() else { panic!("{key} has no TTL") };
            assert!(
                left <= Duration::from_millis(most) && left > Duration::from_millis(most - 10_000),
                "{key}: {left:?}"
            );
        }
        // Run out since: left out, counted.
        cp.kv[0].ttl_ms = Some(59_000);
        let restored = restore(&backend, &namespace, &limits, &cp).await.unwrap();
        assert_eq!(restored, Restored { kv: 0, subjects: 1, expired: 1 });
    }

    /// A subject is replaced in one step: fields the checkpoint lacks go,
    /// and should the write fail (here the store is full), the subject is
    /// left as it was rather than deleted.
    #[tokio::test]
    async fn restore_replaces_a_subject_whole_or_not_at_all() {
        let backend = MemoryBackend::with_max_bytes(4096);
        let limits = RoleLimits::default();
        let namespace = Namespace::new("t:", "app", &limits);
        let old = [("pold".to_owned(), b"1".to_vec()), ("pkept".to_owned(), b"2".to_vec())];
        backend.hash_apply("t:app:s:user", &old, &[], None).await.unwrap();
        restore(&backend, &namespace, &limits, &checkpoint(&[("pkept", "3"), ("pnew", "4")])).await.unwrap();
        let fields = backend.hash_get_all("t:app:s:user", usize::MAX).await.unwrap();
        let expected = [("pkept".to_owned(), b"3".to_vec()), ("pnew".to_owned(), b"4".to_vec())];
        assert_eq!(fields.iter().collect::<BTreeSet<_>>(), expected.iter().collect(), "old fields removed");

        // A value of 5 kB fills the store; the subject then cannot be written.
        let mut full = checkpoint(&[("pother", "5")]);
        full.kv[0].value_base64 = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 5000]);
        let error = restore(&backend, &namespace, &limits, &full).await.unwrap_err();
        assert_eq!(error.kind(), "quota-exceeded", "{error}");
        let after = backend.hash_get_all("t:app:s:user", usize::MAX).await.unwrap();
        assert_eq!(after, fields, "the subject is as it was");
        // The error says how far the restore got.
        assert!(error.to_string().contains(r#"subject "user", after 1 of 2 kv keys and subjects"#), "{error}");
    }
}
