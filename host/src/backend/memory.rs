//! The embedded store: a sorted map in the host process, with Redis's
//! semantics (TTL included) so roles behave the same on either backend.
//! Like a Redis with `maxmemory` and `noeviction`, it refuses writes
//! (`quota-exceeded`) while it holds more than its size limit; deletes and
//! reads go on.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::{gcra, Backend, Expiry, Health, RateDecision, ScanPage};
use crate::error::{StateError, StateResult};
use crate::glob;

/// Most entries one scan page looks at.
const MAX_SCAN_EXAMINED: usize = 10_000;
/// Most pattern-matching work in one scan page, counted as pattern length
/// × key length per key (the matcher's worst case), so that long patterns
/// over long keys make short pages rather than hold the store's lock.
const MAX_SCAN_WORK: usize = 1_000_000;
/// What starts this store's scan cursors.
const CURSOR_MARK: &str = "m:";
/// Longest cursor taken back (a key is far shorter).
const MAX_CURSOR_BYTES: usize = 1 << 20;
/// Operations between sweeps of expired entries that nobody touched.
const SWEEP_EVERY: u64 = 4096;
/// Least time between sweeps made because a write found the store full.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The size limit of [`MemoryBackend::new`].
pub const DEFAULT_MAX_BYTES: usize = 1 << 30;
/// Bytes counted for an entry besides its key and value (map node, entry,
/// allocation headers), and for a hash field besides its name and value.
const ENTRY_OVERHEAD: usize = 96;
const FIELD_OVERHEAD: usize = 64;

enum Value {
    Bytes(Vec<u8>),
    Hash(Fields),
}

/// A hash's fields, with their footprint kept up to date so that sizing
/// the store never walks a big hash.
#[derive(Default)]
struct Fields {
    fields: BTreeMap<String, Vec<u8>>,
    bytes: usize,
}

impl Fields {
    fn get(&self, field: &str) -> Option<&Vec<u8>> {
        self.fields.get(field)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Vec<u8>)> {
        self.fields.iter()
    }

    fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    fn insert(&mut self, field: String, value: Vec<u8>) {
        let (name, len) = (field.len(), value.len());
        match self.fields.insert(field, value) {
            Some(old) => self.bytes = self.bytes + len - old.len(),
            None => self.bytes += FIELD_OVERHEAD + name + len,
        }
    }

    fn remove(&mut self, field: &str) {
        if let Some(old) = self.fields.remove(field) {
            self.bytes -= FIELD_OVERHEAD + field.len() + old.len();
        }
    }
}

struct Entry {
    value: Value,
    expires_at: Option<Instant>,
}

impl Entry {
    fn new(value: Value, ttl: Option<Duration>) -> Self {
        Self { value, expires_at: ttl.map(|ttl| Instant::now() + ttl) }
    }

    /// About the memory the entry at `key` takes.
    fn footprint(&self, key: &str) -> usize {
        let value = match &self.value {
            Value::Bytes(bytes) => bytes.len(),
            Value::Hash(hash) => hash.bytes,
        };
        ENTRY_OVERHEAD + key.len() + value
    }

    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

fn wrong_type() -> StateError {
    StateError::Internal("operation against a key holding the wrong kind of value".into())
}

#[derive(Default)]
struct Map {
    entries: BTreeMap<String, Entry>,
    writes: u64,
    /// The sum of the entries' footprints.
    bytes: usize,
    /// When every expired entry was last dropped.
    last_sweep: Option<Instant>,
}

impl Map {
    /// Drops every expired entry.
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        let mut freed = 0;
        self.entries.retain(|key, entry| {
            let live = entry.is_live(now);
            if !live {
                freed += entry.footprint(key);
            }
            live
        });
        self.bytes = self.bytes.saturating_sub(freed);
    }

    /// The footprint of the entries at `keys` (distinct).
    fn footprint(&self, keys: &[&str]) -> usize {
        keys.iter().filter_map(|key| Some(self.entries.get(*key)?.footprint(key))).sum()
    }

    fn bytes(&self, key: &str) -> StateResult<Option<&Vec<u8>>> {
        match self.entries.get(key).map(|e| &e.value) {
            None => Ok(None),
            Some(Value::Bytes(bytes)) => Ok(Some(bytes)),
            Some(Value::Hash(_)) => Err(wrong_type()),
        }
    }

    fn hash(&self, key: &str) -> StateResult<Option<&Fields>> {
        match self.entries.get(key).map(|e| &e.value) {
            None => Ok(None),
            Some(Value::Hash(hash)) => Ok(Some(hash)),
            Some(Value::Bytes(_)) => Err(wrong_type()),
        }
    }

    /// The hash at `key` for writing, created empty when absent.
    fn hash_mut(&mut self, key: &str) -> StateResult<&mut Fields> {
        let entry =
            self.entries.entry(key.to_owned()).or_insert_with(|| Entry::new(Value::Hash(Fields::default()), None));
        match &mut entry.value {
            Value::Hash(hash) => Ok(hash),
            Value::Bytes(_) => Err(wrong_type()),
        }
    }

    /// After a write: deletes the hash at `key` if it has no fields left,
    /// as Redis does, and gives a key without a TTL the fallback TTL.
    fn settle(&mut self, key: &str, fallback_ttl: Option<Duration>) {
        if matches!(self.entries.get(key), Some(Entry { value: Value::Hash(h), .. }) if h.is_empty()) {
            self.entries.remove(key);
        }
        if let (Some(entry), Some(ttl)) = (self.entries.get_mut(key), fallback_ttl) {
            entry.expires_at.get_or_insert_with(|| Instant::now() + ttl);
        }
    }

    fn put(&mut self, key: &str, value: &[u8], ttl: Option<Duration>) {
        self.entries.insert(key.to_owned(), Entry::new(Value::Bytes(value.to_vec()), ttl));
    }
}

/// Whether a write may add data: `Some((used, max))` when the store is
/// full.
struct Room(Option<(usize, usize)>);

impl Room {
    fn check(&self) -> StateResult<()> {
        match self.0 {
            None => Ok(()),
            Some((used, max)) => Err(StateError::QuotaExceeded(format!(
                "the in-memory store is full ({used} of {max} bytes); delete keys or give it more room"
            ))),
        }
    }
}

/// The in-process backend. Data lives as long as the process.
pub struct MemoryBackend {
    map: Mutex<Map>,
    max_bytes: usize,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty store of at most [`DEFAULT_MAX_BYTES`].
    pub fn new() -> Self {
        Self::with_max_bytes(DEFAULT_MAX_BYTES)
    }

    /// An empty store that refuses writes while it holds more than
    /// `max_bytes` (keys, values and bookkeeping, approximately).
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Self { map: Mutex::new(Map::default()), max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, Map> {
        // A panic while holding the lock cannot leave an entry half-written,
        // so a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the map after dropping `keys` if they have expired, so
    /// `f` sees only live entries for them. Now and then sweeps every
    /// expired entry, so keys nobody reads again do not pile up.
    fn read<R>(&self, keys: &[&str], f: impl FnOnce(&Map) -> R) -> R {
        self.access(keys, Access::Read, |map| f(map))
    }

    /// [`MemoryBackend::read`] for an operation that may change `keys`
    /// (only those), without adding data: the store's size follows from
    /// theirs before and after.
    fn with<R>(&self, keys: &[&str], f: impl FnOnce(&mut Map) -> R) -> R {
        self.access(keys, Access::Change, f)
    }

    /// [`MemoryBackend::with`] for an operation that may add data: it asks
    /// [`Room::check`] before it adds any, which refuses while the store
    /// is over its size limit. Asked after the checks that may make it a
    /// no-op (a taken lock, a value not as expected), as Redis refuses a
    /// script only at its first write.
    fn write<R>(&self, keys: &[&str], f: impl FnOnce(&mut Map, Room) -> StateResult<R>) -> StateResult<R> {
        self.access(keys, Access::Write, |map| {
            let room = Room((map.bytes > self.max_bytes).then_some((map.bytes, self.max_bytes)));
            f(map, room)
        })
    }

    /// The body of `read`, `with` and `write`: for a write to a full store,
    /// first a sweep of expired entries (they may be what fills it), at most
    /// once a second so refused writes cannot keep the lock busy.
    fn access<R>(&self, keys: &[&str], access: Access, f: impl FnOnce(&mut Map) -> R) -> R {
        let sized = access != Access::Read;
        let mut distinct;
        // Distinct keys, so none is sized twice.
        let keys = if sized && keys.len() > 1 {
            distinct = keys.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            &distinct[..]
        } else {
            keys
        };
        let mut map = self.lock();
        let now = Instant::now();
        for key in keys {
            if map.entries.get(*key).is_some_and(|entry| !entry.is_live(now)) {
                if let Some(entry) = map.entries.remove(*key) {
                    map.bytes = map.bytes.saturating_sub(entry.footprint(key));
                }
            }
        }
        map.writes += 1;
        let full_and_due = access == Access::Write
            && map.bytes > self.max_bytes
            && map.last_sweep.is_none_or(|at| now.duration_since(at) >= FULL_SWEEP_EVERY);
        if map.writes.is_multiple_of(SWEEP_EVERY) || full_and_due {
            map.sweep(now);
        }
        if !sized {
            return f(&mut map);
        }
        let before = map.footprint(keys);
        let result = f(&mut map);
        map.bytes = (map.bytes + map.footprint(keys)).saturating_sub(before);
        result
    }
}

/// What an operation on the store does, for its bookkeeping.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Changes nothing (but drops its expired keys, which are accounted).
    Read,
    /// May change or delete its keys, not add data.
    Change,
    /// May add data: refused while the store is full.
    Write,
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn health(&self) -> StateResult<Health> {
        let map = self.lock();
        let details = [("keys", map.entries.len()), ("used_bytes", map.bytes), ("max_bytes", self.max_bytes)];
        Ok(Health { kind: "memory", details: details.map(|(name, n)| (name.to_owned(), n.to_string())).into() })
    }

    async fn get(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        // Measured, it is a get-many of one key, as on Redis.
        if max_bytes.is_some() {
            return Ok(self.get_many(&[key.to_owned()], max_bytes).await?.pop().flatten());
        }
        self.read(&[key], |map| Ok(map.bytes(key)?.cloned()))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()> {
        self.write(&[key], |map, room| {
            room.check()?;
            map.put(key, value, ttl);
            Ok(())
        })
    }

    async fn exists(&self, key: &str) -> StateResult<bool> {
        Ok(self.read(&[key], |map| map.entries.contains_key(key)))
    }

    async fn get_many(&self, keys: &[String], max_bytes: Option<usize>) -> StateResult<Vec<Option<Vec<u8>>>> {
        let max_bytes = max_bytes.unwrap_or(usize::MAX);
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.read(&refs, |map| {
            // MGET answers nil for a key of another type.
            let values: Vec<Option<&Vec<u8>>> = refs.iter().map(|k| map.bytes(k).ok().flatten()).collect();
            let size = values.iter().flatten().map(|v| v.len()).sum();
            if size > max_bytes {
                return Err(super::values_too_large(size, max_bytes));
            }
            Ok(values.into_iter().map(|v| v.cloned()).collect())
        })
    }

    async fn set_many(&self, entries: &[(String, Vec<u8>)], ttl: Option<Duration>) -> StateResult<()> {
        let keys: Vec<&str> = entries.iter().map(|(key, _)| key.as_str()).collect();
        self.write(&keys, |map, room| {
            if !entries.is_empty() {
                room.check()?;
            }
            for (key, value) in entries {
                map.put(key, value, ttl);
            }
            Ok(())
        })
    }

    async fn delete_many(&self, keys: &[String]) -> StateResult<u64> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(self.with(&refs, |map| refs.iter().filter(|k| map.entries.remove(**k).is_some()).count() as u64))
    }

    async fn expiry(&self, key: &str) -> StateResult<Expiry> {
        let now = Instant::now();
        Ok(self.read(&[key], |map| match map.entries.get(key) {
            None => Expiry::Missing,
            Some(Entry { expires_at: None, .. }) => Expiry::Persistent,
            Some(Entry { expires_at: Some(at), .. }) => Expiry::ExpiresIn(at.saturating_duration_since(now)),
        }))
    }

    async fn expire(&self, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        Ok(self.with(&[key], |map| match map.entries.get_mut(key) {
            None => false,
            Some(entry) => {
                entry.expires_at = ttl.map(|ttl| Instant::now() + ttl);
                true
            }
        }))
    }

    async fn scan(&self, pattern: &str, cursor: Option<&str>, limit: usize) -> StateResult<ScanPage> {
        // Every match starts with the pattern's literal prefix, so only that
        // range of the sorted map is visited. The cursor is the part of the
        // last key after that prefix, marked as this store's (so a cursor
        // from elsewhere is refused, as Redis refuses one): it never shows
        // the role's prefix.
        let literal = glob::literal_prefix(pattern);
        let start = match cursor {
            Some(cursor) => match cursor.strip_prefix(CURSOR_MARK).filter(|_| cursor.len() <= MAX_CURSOR_BYTES) {
                Some(after) => Bound::Excluded(format!("{literal}{after}")),
                None => return Err(StateError::InvalidArgument("invalid cursor".into())),
            },
            None => Bound::Included(literal.clone()),
        };
        let now = Instant::now();
        let map = self.lock();
        let candidates =
            map.entries.range::<String, _>((start, Bound::Unbounded)).take_while(|(key, _)| key.starts_with(&literal));
        // A page also ends after MAX_SCAN_EXAMINED candidates or
        // MAX_SCAN_WORK, so one call never holds the lock for long, whatever
        // the pattern; it always moves on by at least one key.
        let (mut keys, mut cursor, mut examined, mut work, mut last) = (Vec::new(), None, 0, 0, None::<&String>);
        for (key, entry) in candidates {
            work += pattern.len().max(1) * key.len().max(1);
            if keys.len() == limit || examined == MAX_SCAN_EXAMINED || (work > MAX_SCAN_WORK && examined > 0) {
                cursor = last.map(|last| format!("{CURSOR_MARK}{}", &last[literal.len()..]));
                break;
            }
            examined += 1;
            last = Some(key);
            if entry.is_live(now) && glob::matches(pattern, key) {
                keys.push(key.clone());
            }
        }
        Ok(ScanPage { keys, cursor })
    }

    async fn increment(&self, key: &str, delta: i64, fallback_ttl: Option<Duration>) -> StateResult<i64> {
        self.write(&[key], |map, room| {
            room.check()?;
            let next = add_integer(map.bytes(key)?.map(Vec::as_slice), delta)?;
            let value = next.to_string().into_bytes();
            match map.entries.get_mut(key) {
                Some(entry) => entry.value = Value::Bytes(value),
                None => map.put(key, &value, None),
            }
            map.settle(key, fallback_ttl);
            Ok(next)
        })
    }

    async fn set_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool> {
        // Refused when full even if the key exists, as Redis's SET NX is.
        self.write(&[key], |map, room| {
            room.check()?;
            if map.entries.contains_key(key) {
                return Ok(false);
            }
            map.put(key, value, ttl);
            Ok(true)
        })
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> StateResult<bool> {
        // Deleting needs no room.
        self.write(&[key], |map, room| {
            if map.bytes(key)?.map(Vec::as_slice) != expected {
                return Ok(false);
            }
            match new {
                Some(value) => {
                    room.check()?;
                    map.put(key, value, ttl);
                }
                None => {
                    map.entries.remove(key);
                }
            }
            Ok(true)
        })
    }

    async fn get_and_delete(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        self.with(&[key], |map| {
            within(map.bytes(key)?, max_bytes)?;
            Ok(map.entries.remove(key).map(|e| match e.value {
                Value::Bytes(bytes) => bytes,
                Value::Hash(_) => unreachable!("checked above"),
            }))
        })
    }

    async fn hash_get(&self, key: &str, field: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        self.read(&[key], |map| Ok(within(map.hash(key)?.and_then(|h| h.get(field)), max_bytes)?.cloned()))
    }

    async fn hash_get_all(&self, key: &str, max_bytes: usize) -> StateResult<Vec<(String, Vec<u8>)>> {
        self.read(&[key], |map| {
            let Some(hash) = map.hash(key)? else { return Ok(Vec::new()) };
            // Counted as in Redis, from the hash's footprint: no walk through
            // many fields while holding the store's lock.
            let count = hash.fields.len();
            let size = hash.bytes.saturating_sub(count * FIELD_OVERHEAD) + count * super::READ_FIELD_COST;
            if size > max_bytes {
                return Err(super::hash_too_large(size, max_bytes));
            }
            Ok(hash.iter().map(|(f, v)| (f.clone(), v.clone())).collect())
        })
    }

    async fn hash_apply(
        &self,
        key: &str,
        set: &[(String, Vec<u8>)],
        remove: &[String],
        fallback_ttl: Option<Duration>,
    ) -> StateResult<()> {
        if set.is_empty() && remove.is_empty() {
            return Ok(()); // As on Redis: nothing to write touches nothing, TTL included.
        }
        // Removing fields needs no room.
        self.write(&[key], |map, room| {
            if !set.is_empty() {
                room.check()?;
            }
            let hash = map.hash_mut(key)?;
            for (field, value) in set {
                hash.insert(field.clone(), value.clone());
            }
            for field in remove {
                hash.remove(field);
            }
            map.settle(key, fallback_ttl);
            Ok(())
        })
    }

    async fn hash_increment(
        &self,
        key: &str,
        field: &str,
        delta: i64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<i64> {
        self.write(&[key], |map, room| {
            room.check()?;
            let hash = map.hash_mut(key)?;
            let next = add_integer(hash.get(field).map(Vec::as_slice), delta);
            if let Ok(next) = next {
                hash.insert(field.to_owned(), next.to_string().into_bytes());
            }
            map.settle(key, fallback_ttl.filter(|_| next.is_ok()));
            next
        })
    }

    async fn hash_increment_float(
        &self,
        key: &str,
        field: &str,
        delta: f64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<f64> {
        self.write(&[key], |map, room| {
            room.check()?;
            let hash = map.hash_mut(key)?;
            // Answer what was stored, as Redis does, so both round alike.
            let next = add_float(hash.get(field).map(Vec::as_slice), delta).map(|n| {
                let text = format_float(n);
                hash.insert(field.to_owned(), text.clone().into_bytes());
                text.parse().unwrap_or(n)
            });
            map.settle(key, fallback_ttl.filter(|_| next.is_ok()));
            next
        })
    }

    async fn hash_compare_and_set(
        &self,
        key: &str,
        field: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<bool> {
        // Removing a field needs no room.
        self.write(&[key], |map, room| {
            if map.hash(key)?.and_then(|h| h.get(field)).map(Vec::as_slice) != expected {
                return Ok(false);
            }
            if new.is_some() {
                room.check()?;
            }
            let hash = map.hash_mut(key)?;
            match new {
                Some(value) => hash.insert(field.to_owned(), value.to_vec()),
                None => hash.remove(field),
            };
            map.settle(key, new.and(fallback_ttl));
            Ok(true)
        })
    }

    async fn lock_acquire(&self, key: &str, fence_key: &str, owner: &str, ttl: Duration) -> StateResult<Option<u64>> {
        self.write(&[key, fence_key], |map, room| {
            if map.entries.contains_key(key) {
                return Ok(None);
            }
            room.check()?;
            let last = map.bytes(fence_key)?.and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
            let token = last.unwrap_or(0).saturating_add(1).max(unix_micros());
            map.put(fence_key, token.to_string().as_bytes(), Some(super::FENCE_TTL));
            map.put(key, owner.as_bytes(), Some(ttl));
            Ok(Some(token))
        })
    }

    async fn expire_if_equal(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<bool> {
        self.with(&[key], |map| {
            if map.bytes(key)?.map(Vec::as_slice) != Some(value) {
                return Ok(false);
            }
            if let Some(entry) = map.entries.get_mut(key) {
                entry.expires_at = Some(Instant::now() + ttl);
            }
            Ok(true)
        })
    }

    async fn rate_check(&self, key: &str, limit: u64, window: Duration, cost: u64) -> StateResult<RateDecision> {
        let now = unix_micros();
        // A peek (cost 0) or a refusal writes nothing, so a full store
        // still answers it.
        self.write(&[key], |map, room| {
            let tat = map.bytes(key)?.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
            let (decision, new_tat) = gcra(tat, now, limit, window.as_micros() as u64, cost);
            if let Some(new_tat) = new_tat {
                room.check()?;
                let ttl = Duration::from_micros(new_tat - now).max(Duration::from_millis(1));
                map.put(key, new_tat.to_string().as_bytes(), Some(ttl));
            }
            Ok(decision)
        })
    }
}

fn not_integer() -> StateError {
    StateError::InvalidArgument("value is not an integer or out of range".into())
}

/// The clock's microseconds since 1970.
fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// Adds to a stored integer as Redis's INCRBY does: the value must be a
/// canonical decimal i64 (no `+`, spaces or leading zeros).
fn add_integer(value: Option<&[u8]>, delta: i64) -> StateResult<i64> {
    let current = match value {
        None => 0,
        Some(value) => {
            let text = std::str::from_utf8(value).map_err(|_| not_integer())?;
            let digits = text.strip_prefix('-').unwrap_or(text);
            let canonical = !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && (digits == "0" || !digits.starts_with('0'))
                && text != "-0";
            if !canonical {
                return Err(not_integer());
            }
            text.parse::<i64>().map_err(|_| not_integer())?
        }
    };
    current
        .checked_add(delta)
        .ok_or_else(|| StateError::InvalidArgument("increment or decrement would overflow".into()))
}

/// Adds to a stored number as Redis's HINCRBYFLOAT does.
fn add_float(value: Option<&[u8]>, delta: f64) -> StateResult<f64> {
    let not_float = || StateError::InvalidArgument("hash value is not a float".into());
    let current = match value {
        None => 0.0,
        Some(value) => {
            let text = std::str::from_utf8(value).map_err(|_| not_float())?;
            text.trim().parse::<f64>().ok().filter(|f| f.is_finite() && text.trim() == text).ok_or_else(not_float)?
        }
    };
    let next = current + delta;
    if !next.is_finite() {
        return Err(StateError::InvalidArgument("increment would produce NaN or Infinity".into()));
    }
    Ok(next)
}

/// A float increment's result as stored, the same on every backend (the
/// Redis backend's script does this in Lua): the shortest of C's `%.15g`,
/// `%.16g` and `%.17g` that reads back as the same number, so 0.1 stays
/// `0.1`, 0.1 + 0.2 is `0.30000000000000004` and 1e20 is `1e+20`.
fn format_float(value: f64) -> String {
    let value = if value == 0.0 { 0.0 } else { value };
    let mut text = String::new();
    for digits in 15..=17 {
        text = format_g(value, digits);
        if text.parse() == Ok(value) {
            break;
        }
    }
    text
}

/// C's `%.{digits}g` of a finite `value`: `digits` significant digits,
/// in exponent form when the (rounded) exponent is below -4 or at least
/// `digits`, trailing zeros dropped.
fn format_g(value: f64, digits: usize) -> String {
    let strip = |text: &str| match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.').to_owned(),
        false => text.to_owned(),
    };
    let scientific = format!("{value:.*e}", digits - 1);
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if exponent < -4 || exponent >= digits as i32 {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mantissa), exponent.unsigned_abs())
    } else {
        strip(&format!("{value:.*}", (digits as i32 - 1 - exponent) as usize))
    }
}

/// `value`, unless it is longer than `max_bytes`.
fn within(value: Option<&Vec<u8>>, max_bytes: Option<usize>) -> StateResult<Option<&Vec<u8>>> {
    match (value, max_bytes) {
        (Some(value), Some(max)) if value.len() > max => Err(super::values_too_large(value.len(), max)),
        _ => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_stored_as_the_shortest_round_tripping_g_format() {
        // Expected: C's printf (by way of Python's %-formatting).
        let cases: &[(f64, &str)] = &[
            (0.1, "0.1"),
            (0.1 + 0.2, "0.30000000000000004"),
            (2.0 / 3.0, "0.6666666666666666"),
            (1e-20, "1e-20"),
            (1e20, "1e+20"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (5200.0, "5200"),
            (-1.5, "-1.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e15, "1e+15"),
            (-2.5e-300, "-2.5e-300"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "4.94065645841247e-324"),
            (1234567890123456.5, "1234567890123456.5"),
            (-0.0, "0"),
        ];
        for &(value, text) in cases {
            assert_eq!(format_float(value), text, "{value:e}");
        }
    }

    /// The store's size as counted, and as recounted from scratch.
    fn sizes(store: &MemoryBackend) -> (usize, usize) {
        let map = store.lock();
        let recount = |key: &String, entry: &Entry| {
            let value = match &entry.value {
                Value::Bytes(bytes) => bytes.len(),
                Value::Hash(hash) => hash.iter().map(|(f, v)| FIELD_OVERHEAD + f.len() + v.len()).sum(),
            };
            ENTRY_OVERHEAD + key.len() + value
        };
        (map.bytes, map.entries.iter().map(|(key, entry)| recount(key, entry)).sum())
    }

    #[tokio::test]
    async fn the_size_follows_every_kind_of_change() {
        let store = MemoryBackend::new();
        let b: &dyn Backend = &store;
        b.set("a", b"12345", None).await.unwrap();
        b.set("a", b"1", None).await.unwrap();
        let pairs = [("x".to_owned(), b"xx".to_vec()), ("x".to_owned(), b"xxx".to_vec()), ("y".to_owned(), vec![0; 9])];
        b.set_many(&pairs, None).await.unwrap();
        b.increment("n", 1000, None).await.unwrap();
        b.hash_apply("h", &[("f".into(), b"v".to_vec()), ("g".into(), b"w".to_vec())], &[], None).await.unwrap();
        b.hash_apply("h", &[("g".into(), b"longer".to_vec())], &["f".into()], None).await.unwrap();
        b.hash_increment("h", "i", 5, None).await.unwrap();
        b.hash_increment_float("h", "z", 1.5, None).await.unwrap();
        b.hash_compare_and_set("h2", "f", None, Some(b"v"), None).await.unwrap();
        b.lock_acquire("l", "fence", "me", Duration::from_secs(60)).await.unwrap();
        b.set_if_absent("s", b"v", Some(Duration::from_millis(1))).await.unwrap();
        b.compare_and_swap("a", Some(b"1"), Some(b"22"), None).await.unwrap();
        b.get_and_delete("x", None).await.unwrap();
        b.delete_many(&["y".to_owned(), "y".to_owned(), "none".to_owned()]).await.unwrap();
        let (counted, actual) = sizes(&store);
        assert_eq!(counted, actual);
        assert!(counted > 0);
        // An expired entry leaves the count when it is dropped.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(b.get("s", None).await.unwrap(), None);
        assert_eq!(sizes(&store).0, sizes(&store).1);
        // So do entries the periodic sweep drops, untouched since.
        for i in 0..50 {
            b.set(&format!("short{i}"), b"v", Some(Duration::from_millis(1))).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        for _ in 0..SWEEP_EVERY {
            b.exists("a").await.unwrap();
        }
        assert_eq!(store.lock().entries.keys().filter(|k| k.starts_with("short")).count(), 0, "swept");
        assert_eq!(sizes(&store).0, sizes(&store).1);
        b.delete_matching("*").await.unwrap();
        assert_eq!(sizes(&store), (0, 0));
    }

    #[tokio::test]
    async fn expired_entries_do_not_keep_a_store_full() {
        let store = MemoryBackend::with_max_bytes(5_000);
        let b: &dyn Backend = &store;
        let mut full = false;
        // Long enough not to expire while it fills (a sweep would then make
        // room), short against the wait below.
        for i in 0..10 {
            full |= b.set(&format!("t{i}"), &[1; 1000], Some(Duration::from_millis(300))).await.is_err();
        }
        assert!(full, "filled past the limit");
        // A full store sweeps at most once a second.
        tokio::time::sleep(FULL_SWEEP_EVERY + Duration::from_millis(350)).await;
        b.set("fresh", b"v", None).await.expect("room again once they expired");
        assert_eq!(sizes(&store).0, sizes(&store).1);
    }

    #[tokio::test]
    async fn a_full_store_refuses_writes_but_reads_and_deletes() {
        let store = MemoryBackend::with_max_bytes(10_000);
        let b: &dyn Backend = &store;
        b.set("keep", b"v", None).await.unwrap();
        b.lock_acquire("held", "fence", "me", Duration::from_secs(60)).await.unwrap();
        b.rate_check("spent", 1, Duration::from_secs(60), 1).await.unwrap();
        let mut i = 0;
        let error = loop {
            match b.set(&format!("k{i}"), &[7; 1000], None).await {
                Ok(()) => i += 1,
                Err(error) => break error,
            }
            assert!(i < 100, "never full");
        };
        assert!(matches!(&error, StateError::QuotaExceeded(m) if m.contains("store is full")), "{error:?}");
        assert!(error.is_retryable(), "room may come back");
        for refused in [
            b.increment("n", 1, None).await.err(),
            b.hash_apply("h", &[("f".into(), b"v".to_vec())], &[], None).await.err(),
            b.lock_acquire("l", "fence", "me", Duration::from_secs(1)).await.err(),
        ] {
            assert!(matches!(refused, Some(StateError::QuotaExceeded(_))), "{refused:?}");
        }
        assert_eq!(b.get("keep", None).await.unwrap(), Some(b"v".to_vec()), "reads go on");
        assert!(b.rate_check("r", 5, Duration::from_secs(1), 0).await.unwrap().allowed, "a rate peek too");
        // What would write nothing answers, as on Redis (whose scripts
        // are refused only at their first write).
        assert_eq!(b.lock_acquire("held", "fence", "other", Duration::from_secs(1)).await, Ok(None));
        assert_eq!(b.compare_and_swap("keep", Some(b"no"), Some(b"new"), None).await, Ok(false));
        assert_eq!(b.hash_compare_and_set("h", "f", Some(b"no"), Some(b"new"), None).await, Ok(false));
        assert!(!b.rate_check("spent", 1, Duration::from_secs(60), 1).await.unwrap().allowed);
        assert_eq!(b.set_many(&[], None).await, Ok(()));
        assert!(b.compare_and_swap("keep", Some(b"v"), None, None).await.unwrap(), "a delete needs no room");
        let health = b.health().await.unwrap();
        assert_eq!(health.details["max_bytes"], "10000");
        b.delete_matching("k*").await.unwrap();
        b.set("again", b"v", None).await.unwrap();
    }

    #[tokio::test]
    async fn a_costly_pattern_makes_short_pages_and_still_finds_every_match() {
        let store = MemoryBackend::new();
        let long = "a".repeat(1000);
        for i in 0..300 {
            store.set(&format!("p:{long}{i:05}"), b"v", None).await.unwrap();
        }
        store.set(&format!("p:{long}b"), b"v", None).await.unwrap();
        // Worst case for the matcher: a long pattern that fails late.
        let pattern = format!("p:*{long}b");
        let (mut found, mut pages, mut cursor) = (Vec::new(), 0, None);
        loop {
            let page = store.scan(&pattern, cursor.as_deref(), 1000).await.unwrap();
            found.extend(page.keys);
            pages += 1;
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(found, [format!("p:{long}b")]);
        // About 1 million units of work per page: a few keys each.
        assert!(pages > 100, "{pages} pages: the matcher's work per page is not bounded");
        // A short pattern over the same keys takes whole pages.
        let page = store.scan("p:*", None, 200).await.unwrap();
        assert_eq!(page.keys.len(), 200);
    }
}
