//! The embedded store: a sorted map in the host process, with Redis's
//! semantics (TTL included) so roles behave the same on either backend.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Backend, Expiry, ScanPage};
use crate::error::{StateError, StateResult};
use crate::glob;

struct Entry {
    value: Vec<u8>,
    expires_at: Option<Instant>,
}

impl Entry {
    fn new(value: &[u8], ttl: Option<Duration>) -> Self {
        Self {
            value: value.to_vec(),
            expires_at: ttl.map(|ttl| Instant::now() + ttl),
        }
    }

    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// The in-process backend. Data lives as long as the process.
#[derive(Default)]
pub struct MemoryBackend {
    map: Mutex<BTreeMap<String, Entry>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the map after dropping `keys` if they have expired, so
    /// `f` sees only live entries for them.
    fn with<R>(&self, keys: &[&str], f: impl FnOnce(&mut BTreeMap<String, Entry>) -> R) -> R {
        // A panic while holding the lock cannot leave an entry half-written,
        // so a poisoned map is still consistent.
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        for key in keys {
            if map.get(*key).is_some_and(|entry| !entry.is_live(now)) {
                map.remove(*key);
            }
        }
        f(&mut map)
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        Ok(self.with(&[key], |map| map.get(key).map(|e| e.value.clone())))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()> {
        self.with(&[], |map| {
            map.insert(key.to_owned(), Entry::new(value, ttl))
        });
        Ok(())
    }

    async fn exists(&self, key: &str) -> StateResult<bool> {
        Ok(self.with(&[key], |map| map.contains_key(key)))
    }

    async fn get_many(&self, keys: &[String]) -> StateResult<Vec<Option<Vec<u8>>>> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(self.with(&refs, |map| {
            refs.iter()
                .map(|k| map.get(*k).map(|e| e.value.clone()))
                .collect()
        }))
    }

    async fn set_many(
        &self,
        entries: &[(String, Vec<u8>)],
        ttl: Option<Duration>,
    ) -> StateResult<()> {
        self.with(&[], |map| {
            for (key, value) in entries {
                map.insert(key.clone(), Entry::new(value, ttl));
            }
        });
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> StateResult<u64> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(self.with(&refs, |map| {
            refs.iter().filter(|k| map.remove(**k).is_some()).count() as u64
        }))
    }

    async fn expiry(&self, key: &str) -> StateResult<Expiry> {
        let now = Instant::now();
        Ok(self.with(&[key], |map| match map.get(key) {
            None => Expiry::Missing,
            Some(Entry {
                expires_at: None, ..
            }) => Expiry::Persistent,
            Some(Entry {
                expires_at: Some(at),
                ..
            }) => Expiry::ExpiresIn(at.saturating_duration_since(now)),
        }))
    }

    async fn expire(&self, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        Ok(self.with(&[key], |map| match map.get_mut(key) {
            None => false,
            Some(entry) => {
                entry.expires_at = ttl.map(|ttl| Instant::now() + ttl);
                true
            }
        }))
    }

    async fn scan(
        &self,
        pattern: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> StateResult<ScanPage> {
        // Every match starts with the pattern's literal prefix, so only that
        // range of the sorted map is visited. The cursor is the part of the
        // last key after that prefix: it never shows the role's prefix.
        let literal = glob::literal_prefix(pattern);
        let start = match cursor {
            Some(after) => Bound::Excluded(format!("{literal}{after}")),
            None => Bound::Included(literal.clone()),
        };
        let now = Instant::now();
        let map = self
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut matching = map
            .range::<String, _>((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(&literal))
            .filter(|(key, entry)| entry.is_live(now) && glob::matches(pattern, key))
            .map(|(key, _)| key);
        let keys: Vec<String> = matching.by_ref().take(limit).cloned().collect();
        let more = matching.next().is_some();
        let cursor = match keys.last() {
            Some(last) if more => Some(last[literal.len()..].to_owned()),
            _ => None,
        };
        Ok(ScanPage { keys, cursor })
    }

    async fn increment(&self, key: &str, delta: i64) -> StateResult<i64> {
        self.with(&[key], |map| {
            let current = match map.get(key) {
                None => 0,
                Some(entry) => parse_integer(&entry.value)?,
            };
            let next = current.checked_add(delta).ok_or_else(|| {
                StateError::InvalidArgument("increment or decrement would overflow".into())
            })?;
            let value = next.to_string().into_bytes();
            match map.get_mut(key) {
                Some(entry) => entry.value = value,
                None => {
                    map.insert(
                        key.to_owned(),
                        Entry {
                            value,
                            expires_at: None,
                        },
                    );
                }
            }
            Ok(next)
        })
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> StateResult<bool> {
        Ok(self.with(&[key], |map| {
            if map.contains_key(key) {
                return false;
            }
            map.insert(key.to_owned(), Entry::new(value, ttl));
            true
        }))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> StateResult<bool> {
        Ok(self.with(&[key], |map| {
            if map.get(key).map(|e| e.value.as_slice()) != expected {
                return false;
            }
            match new {
                Some(value) => map.insert(key.to_owned(), Entry::new(value, ttl)),
                None => map.remove(key),
            };
            true
        }))
    }

    async fn get_and_delete(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        Ok(self.with(&[key], |map| map.remove(key).map(|e| e.value)))
    }
}

/// Parses a stored value as Redis does for INCRBY: a decimal i64 with no
/// sign but `-`, no spaces and no leading zeros.
fn parse_integer(value: &[u8]) -> StateResult<i64> {
    let not_integer =
        || StateError::InvalidArgument("value is not an integer or out of range".into());
    let text = std::str::from_utf8(value).map_err(|_| not_integer())?;
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    if !canonical {
        return Err(not_integer());
    }
    text.parse().map_err(|_| not_integer())
}
