//! Write rolehost roles in Rust.
//!
//! A role is a WebAssembly component with one handler. It keeps state in
//! [`Bucket`]s; the host prefixes every key with the role's identity, so a
//! role sees only its own data and never thinks about prefixes.
//!
//! ```no_run
//! use rolehost_guest::{export_role, Bucket, Error, Role};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Visit { path: String }
//!
//! struct Visits;
//!
//! impl Role for Visits {
//!     fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
//!         let visit: Visit = rolehost_guest::from_json(&request)?;
//!         let bucket = Bucket::own()?;
//!         let count = bucket.increment(&format!("hits:{}", visit.path), 1)?;
//!         bucket.set_json("last", &visit, Some(Duration::from_secs(3600)))?;
//!         rolehost_guest::log::info(&format!("{} has {count} hits", visit.path));
//!         Ok(count.to_string().into_bytes())
//!     }
//! }
//!
//! export_role!(Visits);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the
//! `.wasm` in `target/wasm32-wasip2/release/` is the component.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "role",
        pub_export_macro: true,
        default_bindings_module: "rolehost_guest::bindings",
    });
}

use bindings::rolehost::state::{atomics, kv, limits, locks, log as wit_log, subjects, types};

/// What a state call or a handler can fail with. Mirrors the WIT `error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The key or pattern is empty, too long, or has a control character.
    InvalidKey(String),
    /// Another argument is wrong: a zero TTL, a bad cursor, a bad request.
    InvalidArgument(String),
    /// A key, value, batch or response is over the role's limit.
    TooLarge(String),
    /// The namespace is not granted, or only for reading.
    AccessDenied(String),
    /// A quota is used up; retrying later may help.
    QuotaExceeded(String),
    /// The backend is unreachable right now; retrying later may help.
    Unavailable(String),
    /// An optimistic update kept losing to concurrent writers.
    Conflict(String),
    /// Anything else.
    Internal(String),
}

impl Error {
    /// True when the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::QuotaExceeded(_) | Self::Conflict(_))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, message) = match self {
            Self::InvalidKey(m) => ("invalid key", m),
            Self::InvalidArgument(m) => ("invalid argument", m),
            Self::TooLarge(m) => ("too large", m),
            Self::AccessDenied(m) => ("access denied", m),
            Self::QuotaExceeded(m) => ("quota exceeded", m),
            Self::Unavailable(m) => ("unavailable", m),
            Self::Conflict(m) => ("conflict", m),
            Self::Internal(m) => ("internal error", m),
        };
        write!(f, "{kind}: {message}")
    }
}

impl std::error::Error for Error {}

impl From<types::Error> for Error {
    fn from(error: types::Error) -> Self {
        use types::Error as E;
        match error {
            E::InvalidKey(m) => Self::InvalidKey(m),
            E::InvalidArgument(m) => Self::InvalidArgument(m),
            E::TooLarge(m) => Self::TooLarge(m),
            E::AccessDenied(m) => Self::AccessDenied(m),
            E::QuotaExceeded(m) => Self::QuotaExceeded(m),
            E::Unavailable(m) => Self::Unavailable(m),
            E::Conflict(m) => Self::Conflict(m),
            E::Internal(m) => Self::Internal(m),
        }
    }
}

impl From<Error> for types::Error {
    fn from(error: Error) -> Self {
        use types::Error as E;
        match error {
            Error::InvalidKey(m) => E::InvalidKey(m),
            Error::InvalidArgument(m) => E::InvalidArgument(m),
            Error::TooLarge(m) => E::TooLarge(m),
            Error::AccessDenied(m) => E::AccessDenied(m),
            Error::QuotaExceeded(m) => E::QuotaExceeded(m),
            Error::Unavailable(m) => E::Unavailable(m),
            Error::Conflict(m) => E::Conflict(m),
            Error::Internal(m) => E::Internal(m),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A role: handles one request body and returns the response body.
pub trait Role {
    /// Handles one request.
    fn handle(request: Vec<u8>) -> Result<Vec<u8>>;
}

/// Exports a type implementing [`Role`] as the component's handler.
#[macro_export]
macro_rules! export_role {
    ($role:ty) => {
        #[doc(hidden)]
        pub struct __RolehostExport;

        impl $crate::bindings::exports::rolehost::state::handler::Guest for __RolehostExport {
            fn handle(
                request: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<::std::vec::Vec<u8>, $crate::bindings::rolehost::state::types::Error> {
                <$role as $crate::Role>::handle(request).map_err(::std::convert::Into::into)
            }
        }

        $crate::bindings::export!(__RolehostExport with_types_in $crate::bindings);
    };
}

/// Parses a JSON request body; a parse failure is an `InvalidArgument`.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::InvalidArgument(format!("bad JSON: {e}")))
}

/// Serializes a value as a JSON response body.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Internal(format!("cannot serialize JSON: {e}")))
}

/// Escapes glob metacharacters so `text` matches only itself in a pattern.
pub fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The remaining lifetime of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No such key.
    Missing,
    /// The key never expires.
    Persistent,
    /// The key expires after this long.
    ExpiresIn(Duration),
}

/// One page of a key listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// Local key names.
    pub keys: Vec<String>,
    /// Pass to the next call to continue; none when done.
    pub cursor: Option<String>,
}

/// Keys per page when this crate pages through listings for you.
const PAGE: u32 = 500;

/// `names` sorted, duplicates dropped.
fn sorted_once(mut names: Vec<String>) -> Vec<String> {
    names.sort_unstable();
    names.dedup();
    names
}

fn ttl_ms(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(millis)
}

/// Whole milliseconds, rounded up: a sub-millisecond TTL, wait or window
/// does not become "none" (or a refused zero).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// A namespace of key-value state.
pub struct Bucket(kv::Bucket);

impl Bucket {
    /// The role's own namespace.
    pub fn own() -> Result<Self> {
        Self::open("")
    }

    /// A namespace by name: `""` is the role's own; others must be granted.
    pub fn open(name: &str) -> Result<Self> {
        Ok(Self(kv::Bucket::open(name)?))
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(key)?)
    }

    /// Writes `value` with no TTL of its own (a role with `default-ttl-ms`
    /// gets that one).
    pub fn set(&self, key: &str, value: impl AsRef<[u8]>) -> Result<()> {
        Ok(self.0.set(key, value.as_ref(), None)?)
    }

    /// Writes `value`; it expires after `ttl`.
    pub fn set_with_ttl(&self, key: &str, value: impl AsRef<[u8]>, ttl: Duration) -> Result<()> {
        Ok(self.0.set(key, value.as_ref(), ttl_ms(Some(ttl)))?)
    }

    /// Fire and forget: queues a write that the host sends after the
    /// handler returns, in order with the call's other queued writes (a run
    /// of sets with one TTL in one round trip). Errors in the request itself (key, size, TTL, access) come
    /// back now; a failure to send is only logged and counted by the host.
    /// Reads in this call do not see it, and it is dropped if the call
    /// traps. Use it for logs and metrics, not for state a lock protects.
    pub fn set_later(&self, key: &str, value: impl AsRef<[u8]>, ttl: Option<Duration>) -> Result<()> {
        Ok(self.0.set_later(key, value.as_ref(), ttl_ms(ttl))?)
    }

    /// Fire and forget delete, queued like [`Bucket::set_later`].
    pub fn delete_later(&self, key: &str) -> Result<()> {
        Ok(self.0.delete_later(key)?)
    }

    /// Deletes `key`; true when it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.0.delete(key)?)
    }

    /// True when `key` exists.
    pub fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.0.exists(key)?)
    }

    /// The values of `keys`, in order.
    pub fn get_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<Option<Vec<u8>>>> {
        let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_owned()).collect();
        Ok(self.0.get_many(&keys)?)
    }

    /// Writes every entry in one atomic step, all with the same TTL (on a
    /// Redis Cluster, one step per hash slot).
    pub fn set_many<K: AsRef<str>, V: AsRef<[u8]>>(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        let entries: Vec<kv::Entry> =
            entries.iter().map(|(k, v)| kv::Entry { key: k.as_ref().to_owned(), value: v.as_ref().to_vec() }).collect();
        Ok(self.0.set_many(&entries, ttl_ms(ttl))?)
    }

    /// Deletes `keys`; the number that existed.
    pub fn delete_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<u32> {
        let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_owned()).collect();
        Ok(self.0.delete_many(&keys)?)
    }

    /// How long `key` has left.
    pub fn expiry(&self, key: &str) -> Result<Expiry> {
        Ok(self.0.expiry(key)?.into())
    }

    /// Makes `key` expire after `ttl`; false when it does not exist.
    pub fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        Ok(self.0.expire(key, ttl_ms(Some(ttl)))?)
    }

    /// Makes `key` persistent; false when it does not exist (refused for a
    /// role with `max-ttl-ms`).
    pub fn persist(&self, key: &str) -> Result<bool> {
        Ok(self.0.expire(key, None)?)
    }

    /// One page of keys matching a glob `pattern` (none: all keys).
    pub fn list_keys_page(&self, pattern: Option<&str>, cursor: Option<&str>, limit: u32) -> Result<KeyPage> {
        let page = self.0.list_keys(pattern, cursor, limit)?;
        Ok(KeyPage { keys: page.keys, cursor: page.cursor })
    }

    /// Every key matching a glob `pattern` (none: all keys), all pages,
    /// sorted, each once (on Redis, SCAN may list a key twice).
    pub fn list_keys(&self, pattern: Option<&str>) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.list_keys_page(pattern, cursor.as_deref(), PAGE)?;
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(sorted_once(keys)),
            }
        }
    }

    /// How many keys match a glob `pattern` (none: all keys), counted
    /// page by page without keeping them. On Redis, a key may be counted
    /// twice if the keyspace grows while counting (as SCAN may list it
    /// twice).
    pub fn count(&self, pattern: Option<&str>) -> Result<u64> {
        let (mut count, mut cursor) = (0, None);
        loop {
            let page = self.list_keys_page(pattern, cursor.as_deref(), PAGE)?;
            count += page.keys.len() as u64;
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(count),
            }
        }
    }

    /// Every key starting with `prefix`, with its value, sorted by key.
    pub fn get_by_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let pattern = format!("{}*", escape_glob(prefix));
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            // The host caps a page at the role's `max-batch-entries`, so
            // its keys fit one get-many.
            let page = self.list_keys_page(Some(&pattern), cursor.as_deref(), PAGE)?;
            if !page.keys.is_empty() {
                let values = self.get_many(&page.keys)?;
                // A key deleted between the listing and the read is skipped.
                out.extend(page.keys.into_iter().zip(values).filter_map(|(k, v)| Some((k, v?))));
            }
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        // A Redis scan may list a key twice (if the table grew meanwhile).
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        Ok(out)
    }

    /// Deletes every kv key of the namespace (its subjects, locks and rate
    /// limiters stay); the number deleted.
    pub fn clear(&self) -> Result<u64> {
        Ok(self.0.clear()?)
    }

    /// The JSON value of `key`, decoded.
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Internal(format!("value of {key:?} is not the expected JSON: {e}"))),
        }
    }

    /// Writes `value` as JSON, with an optional TTL.
    pub fn set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T, ttl: Option<Duration>) -> Result<()> {
        Ok(self.0.set(key, &to_json(value)?, ttl_ms(ttl))?)
    }

    /// Adds `delta` to the integer at `key` (absent: 0); the new value.
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        Ok(atomics::increment(&self.0, key, delta)?)
    }

    /// Writes `value` only if `key` is absent; true when written.
    pub fn set_if_absent(&self, key: &str, value: impl AsRef<[u8]>, ttl: Option<Duration>) -> Result<bool> {
        Ok(atomics::set_if_absent(&self.0, key, value.as_ref(), ttl_ms(ttl))?)
    }

    /// When `key` holds `expected` (none: absent), writes `new` (none:
    /// deletes it); true when it did.
    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        Ok(atomics::compare_and_swap(&self.0, key, expected, new, ttl_ms(ttl))?)
    }

    /// The value of `key`, deleted in the same step.
    pub fn get_and_delete(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(atomics::get_and_delete(&self.0, key)?)
    }
}

/// Which of a subject's two property sets.
pub use subjects::Kind;

/// All properties of a subject, decoded from JSON, by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Default properties.
    pub default: std::collections::BTreeMap<String, serde_json::Value>,
    /// Extended properties.
    pub extended: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Attempts [`Subject::update`] makes before giving up with `Conflict`.
pub const UPDATE_ATTEMPTS: usize = 1000;

/// Sleeps a random time of up to 2^attempt × 50 µs (at most 5 ms), so
/// writers that collided spread out instead of colliding again. The cap is
/// low so a writer that lost often is not left behind by fresh ones.
fn backoff(attempt: usize) {
    use std::hash::BuildHasher;
    let cap_us = (50u64 << attempt.min(7)).min(5_000);
    // RandomState is seeded from the host's randomness (wasi:random).
    let jitter = std::collections::hash_map::RandomState::new().hash_one(attempt) % cap_us;
    std::thread::sleep(Duration::from_micros(jitter));
}

fn decode<T: DeserializeOwned>(what: &str, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| Error::Internal(format!("{what} is not the expected JSON: {e}")))
}

/// A subject: a named entity with default and extended properties, stored
/// as one hash. `set` and `remove` are buffered until [`Subject::store`],
/// which applies them atomically; the other writes are immediate.
pub struct Subject(subjects::Subject);

impl Subject {
    /// Opens the subject `name` of the role's own namespace (it exists
    /// once it has a property).
    pub fn open(name: &str) -> Result<Self> {
        Self::open_in("", name)
    }

    /// Opens the subject `name` of a granted shared `namespace`.
    pub fn open_in(namespace: &str, name: &str) -> Result<Self> {
        Ok(Self(subjects::Subject::open(namespace, name)?))
    }

    /// The subject's name.
    pub fn name(&self) -> String {
        self.0.name()
    }

    /// A default property, decoded.
    pub fn get<T: DeserializeOwned>(&self, property: &str) -> Result<Option<T>> {
        self.get_kind(Kind::Default, property)
    }

    /// An extended property, decoded.
    pub fn get_extended<T: DeserializeOwned>(&self, property: &str) -> Result<Option<T>> {
        self.get_kind(Kind::Extended, property)
    }

    /// A property of either kind, decoded.
    pub fn get_kind<T: DeserializeOwned>(&self, kind: Kind, property: &str) -> Result<Option<T>> {
        match self.0.get(kind, property)? {
            None => Ok(None),
            Some(json) => decode(&format!("property {property:?}"), &json).map(Some),
        }
    }

    /// The raw JSON text of a property.
    pub fn get_raw(&self, kind: Kind, property: &str) -> Result<Option<String>> {
        Ok(self.0.get(kind, property)?)
    }

    /// Every property, read in one step.
    pub fn load(&self) -> Result<Snapshot> {
        let snapshot = self.0.load()?;
        let decode_all = |props: Vec<subjects::Property>| {
            props
                .into_iter()
                .map(|p| Ok((p.name.clone(), decode(&format!("property {:?}", p.name), &p.value)?)))
                .collect::<Result<_>>()
        };
        Ok(Snapshot { default: decode_all(snapshot.default)?, extended: decode_all(snapshot.extended)? })
    }

    /// True when the subject has any property.
    pub fn exists(&self) -> Result<bool> {
        Ok(self.0.exists()?)
    }

    /// Buffers a default property write.
    pub fn set<T: Serialize + ?Sized>(&self, property: &str, value: &T) -> Result<()> {
        self.set_kind(Kind::Default, property, value)
    }

    /// Buffers an extended property write.
    pub fn set_extended<T: Serialize + ?Sized>(&self, property: &str, value: &T) -> Result<()> {
        self.set_kind(Kind::Extended, property, value)
    }

    /// Buffers a property write of either kind.
    pub fn set_kind<T: Serialize + ?Sized>(&self, kind: Kind, property: &str, value: &T) -> Result<()> {
        let json = serde_json::to_string(value).map_err(|e| Error::Internal(format!("cannot serialize JSON: {e}")))?;
        Ok(self.0.set(kind, property, &json)?)
    }

    /// Buffers the removal of a property.
    pub fn remove(&self, kind: Kind, property: &str) -> Result<()> {
        Ok(self.0.remove(kind, property)?)
    }

    /// The number of buffered writes.
    pub fn pending(&self) -> u32 {
        self.0.pending()
    }

    /// Applies the buffered writes in one atomic step.
    pub fn store(&self) -> Result<()> {
        Ok(self.0.store()?)
    }

    /// Drops the buffered writes.
    pub fn discard(&self) {
        self.0.discard()
    }

    /// Adds to an integer property atomically; the new value.
    pub fn increment(&self, kind: Kind, property: &str, delta: i64) -> Result<i64> {
        Ok(self.0.increment(kind, property, delta)?)
    }

    /// Adds to a numeric property atomically; the new value.
    pub fn increment_float(&self, kind: Kind, property: &str, delta: f64) -> Result<f64> {
        Ok(self.0.increment_float(kind, property, delta)?)
    }

    /// When the property's JSON text is `expected` (none: absent), writes
    /// `new` (none: removes it); true when it did.
    pub fn compare_and_set(
        &self,
        kind: Kind,
        property: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<bool> {
        Ok(self.0.compare_and_set(kind, property, expected, new)?)
    }

    /// Applies `f` to a property atomically: reads it, computes the new
    /// value (none removes it) and writes it only if nobody changed it in
    /// between, retrying up to [`UPDATE_ATTEMPTS`] times. Returns the value
    /// written; `Conflict` when every attempt lost to another writer.
    pub fn update<T, F>(&self, kind: Kind, property: &str, mut f: F) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Option<T>,
    {
        for attempt in 0..UPDATE_ATTEMPTS {
            let old_json = self.0.get(kind, property)?;
            let old = match &old_json {
                None => None,
                Some(json) => Some(decode(&format!("property {property:?}"), json)?),
            };
            let new = f(old);
            let new_json = match &new {
                None => None,
                Some(value) => Some(
                    serde_json::to_string(value).map_err(|e| Error::Internal(format!("cannot serialize JSON: {e}")))?,
                ),
            };
            if self.0.compare_and_set(kind, property, old_json.as_deref(), new_json.as_deref())? {
                return Ok(new);
            }
            backoff(attempt);
        }
        Err(Error::Conflict(format!(
            "property {property:?} changed under {UPDATE_ATTEMPTS} attempts in a row; try again later"
        )))
    }

    /// Deletes the whole subject now; true when it existed.
    pub fn delete(&self) -> Result<bool> {
        Ok(self.0.delete()?)
    }

    /// Makes the whole subject expire after `ttl`.
    pub fn expire(&self, ttl: Duration) -> Result<bool> {
        Ok(self.0.expire(ttl_ms(Some(ttl)))?)
    }

    /// Makes the subject persistent (refused for a role with `max-ttl-ms`).
    pub fn persist(&self) -> Result<bool> {
        Ok(self.0.expire(None)?)
    }

    /// How long the subject has left.
    pub fn expiry(&self) -> Result<Expiry> {
        Ok(self.0.expiry()?.into())
    }

    /// Names of the role's subjects matching a glob pattern (none: all).
    pub fn list(pattern: Option<&str>) -> Result<Vec<String>> {
        Self::list_in("", pattern)
    }

    /// Names of the subjects of a granted `namespace` matching a pattern,
    /// sorted, each once.
    pub fn list_in(namespace: &str, pattern: Option<&str>) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut cursor = None;
        loop {
            let page = subjects::list_subjects(namespace, pattern, cursor.as_deref(), PAGE)?;
            names.extend(page.names);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(sorted_once(names)),
            }
        }
    }
}

/// A held distributed lock. Dropping it releases it.
pub struct Lock(locks::Lock);

impl Lock {
    /// Takes the lock `name` for `ttl`, waiting up to `wait` (zero: one
    /// try). None when it stayed taken.
    pub fn acquire(name: &str, ttl: Duration, wait: Duration) -> Result<Option<Self>> {
        Self::acquire_in("", name, ttl, wait)
    }

    /// Like [`Lock::acquire`], for a lock of a granted shared `namespace`.
    pub fn acquire_in(namespace: &str, name: &str, ttl: Duration, wait: Duration) -> Result<Option<Self>> {
        Ok(locks::Lock::acquire(namespace, name, millis(ttl), millis(wait))?.map(Self))
    }

    /// The fencing token: strictly greater than any earlier grant's.
    pub fn token(&self) -> u64 {
        self.0.token()
    }

    /// The lock's name.
    pub fn name(&self) -> String {
        self.0.name()
    }

    /// Resets the TTL; false when the lock was lost (expired and taken).
    pub fn extend(&self, ttl: Duration) -> Result<bool> {
        Ok(self.0.extend(millis(ttl))?)
    }

    /// Releases the lock; false when it had already been lost.
    pub fn release(self) -> Result<bool> {
        Ok(self.0.release()?)
    }
}

/// The outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the units were taken.
    pub allowed: bool,
    /// Units still available now.
    pub remaining: u64,
    /// Time until the limit is full again.
    pub reset_after: Duration,
    /// When denied, time until the same check would pass.
    pub retry_after: Duration,
}

/// Takes `cost` units from the rate limit `key`: at most `limit` units per
/// `window`, refilled smoothly (GCRA), exact across hosts.
pub fn rate_limit(key: &str, limit: u64, window: Duration, cost: u64) -> Result<Decision> {
    rate_limit_in("", key, limit, window, cost)
}

/// Like [`rate_limit`], for a limit shared through a granted `namespace`.
pub fn rate_limit_in(namespace: &str, key: &str, limit: u64, window: Duration, cost: u64) -> Result<Decision> {
    let d = limits::check(namespace, key, limit, millis(window), cost)?;
    Ok(Decision {
        allowed: d.allowed,
        remaining: d.remaining,
        reset_after: Duration::from_millis(d.reset_after_ms),
        retry_after: Duration::from_millis(d.retry_after_ms),
    })
}

impl From<types::Expiry> for Expiry {
    fn from(expiry: types::Expiry) -> Self {
        match expiry {
            types::Expiry::Missing => Expiry::Missing,
            types::Expiry::Persistent => Expiry::Persistent,
            types::Expiry::ExpiresInMs(ms) => Expiry::ExpiresIn(Duration::from_millis(ms)),
        }
    }
}

/// Log lines, tagged with the role by the host.
pub mod log {
    use super::wit_log::{log, Level};

    /// Logs at trace level.
    pub fn trace(message: &str) {
        log(Level::Trace, message)
    }
    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    /// Logs at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    /// Logs at error level.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}
