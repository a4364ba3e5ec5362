//! `rolehost:state/subjects`: one hash per subject, at
//! `{prefix}{identity}:s:{subject}`, with fields `p{property}` (default
//! properties) and `e{property}` (extended), values JSON text — seed 002's
//! layout. Writes are buffered in the resource and applied by `store`.

use std::collections::BTreeMap;

use wasmtime::component::Resource;

use super::CallCtx;
use crate::bindings::subjects::{Host, HostSubject, Kind, NamePage, Property, Snapshot};
use crate::bindings::types::Expiry;
use crate::error::{shown, StateError, StateResult};
use crate::namespace::Space;

/// An open subject and its buffered writes.
pub struct Subject {
    name: String,
    key: String,
    /// The granted namespace's name when it is read-only.
    read_only: Option<String>,
    /// True in a granted namespace, which others write too.
    shared: bool,
    /// Field → new value, or none to remove it.
    pending: BTreeMap<String, Option<Vec<u8>>>,
}

/// Bytes a buffered write holds: its field and value, and the buffer's
/// entry for them (so many tiny writes are not counted as free).
fn size(field: &str, value: Option<&[u8]>) -> usize {
    PENDING_ENTRY_BYTES + field.len() + value.map_or(0, <[u8]>::len)
}

/// A buffered write's entry beyond its bytes: two heap blocks and a place
/// in the buffer's tree.
const PENDING_ENTRY_BYTES: usize = 96;

impl super::Handle for Subject {
    /// Its name and key (its buffered writes are counted as they come).
    fn bytes(&self) -> usize {
        self.name.len() + self.key.len() + self.read_only.as_ref().map_or(0, String::len)
    }
}

impl Subject {
    fn pending_bytes(&self) -> usize {
        self.pending.iter().map(|(field, value)| size(field, value.as_deref())).sum()
    }
}

fn field(kind: Kind, property: &str) -> String {
    let tag = match kind {
        Kind::Default => 'p',
        Kind::Extended => 'e',
    };
    format!("{tag}{property}")
}

/// The kind and property a hash field holds, if this interface wrote it.
pub(crate) fn property_of(field: &str) -> Option<(Kind, &str)> {
    match field.split_at_checked(1)? {
        ("p", property) => Some((Kind::Default, property)),
        ("e", property) => Some((Kind::Extended, property)),
        _ => None,
    }
}

/// A property value must be JSON text (also checked when a checkpoint is
/// restored).
pub(crate) fn check_json(value: &str) -> StateResult<()> {
    serde_json::from_str::<serde::de::IgnoredAny>(value)
        .map(drop)
        .map_err(|e| StateError::InvalidArgument(format!("property value is not JSON: {e}")))
}

fn text(bytes: Vec<u8>) -> String {
    // Values are written as JSON text by this interface; anything else was
    // written from outside and is shown lossily rather than failing.
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl CallCtx {
    fn subject(&mut self, handle: &Resource<Subject>) -> StateResult<&mut Subject> {
        self.table.get_mut(handle).map_err(|e| StateError::Internal(format!("bad subject handle: {e}")))
    }

    /// The hash key of an operation on a subject, after the guards: one
    /// operation charged, write access checked.
    fn subject_key(&mut self, handle: &Resource<Subject>, write: bool) -> StateResult<String> {
        self.charge(1)?;
        let subject = self.subject(handle)?;
        if let (true, Some(namespace)) = (write, &subject.read_only) {
            return Err(StateError::AccessDenied(format!(
                "namespace {} is granted to this role for reading only",
                shown(namespace)
            )));
        }
        Ok(subject.key.clone())
    }

    /// The hash key and the checked field of a property operation.
    fn property(
        &mut self,
        handle: &Resource<Subject>,
        kind: Kind,
        property: &str,
        write: bool,
    ) -> StateResult<(String, String)> {
        self.role.namespace.check_name("property", property)?;
        Ok((self.subject_key(handle, write)?, field(kind, property)))
    }

    /// Buffers a write (some value) or a removal (none) until `store`.
    fn buffer(
        &mut self,
        handle: &Resource<Subject>,
        kind: Kind,
        property: &str,
        value: Option<String>,
    ) -> StateResult<()> {
        let (_, field) = self.property(handle, kind, property, true)?;
        if let Some(value) = &value {
            self.check_property_value(value)?;
        }
        let max = self.role.limits.max_batch_entries;
        let pending = &self.subject(handle)?.pending;
        if !pending.contains_key(&field) && pending.len() >= max {
            return Err(StateError::TooLarge(format!("more than {max} buffered writes; call store first")));
        }
        // Counted net of the write it replaces, which may free as much.
        let replaced = pending.get(&field).map_or(0, |old| size(&field, old.as_deref()));
        let new = size(&field, value.as_deref().map(str::as_bytes));
        match new.checked_sub(replaced) {
            Some(more) => self.hold(more)?,
            None => self.unhold(replaced - new),
        }
        self.subject(handle)?.pending.insert(field, value.map(String::into_bytes));
        Ok(())
    }

    /// Empties a subject's buffer, counting its bytes as no longer held.
    fn clear_pending(&mut self, handle: &Resource<Subject>) -> StateResult<()> {
        let subject = self.subject(handle)?;
        let bytes = subject.pending_bytes();
        subject.pending.clear();
        self.unhold(bytes);
        Ok(())
    }

    fn check_property_value(&self, value: &str) -> StateResult<()> {
        self.check_value(value.as_bytes())?;
        check_json(value)
    }
}

impl Host for CallCtx {
    async fn list_subjects(
        &mut self,
        namespace: String,
        pattern: Option<String>,
        cursor: Option<String>,
        limit: u32,
    ) -> StateResult<NamePage> {
        let namespace = self.namespace(&namespace, false)?.clone();
        let (names, cursor) = self.list_names(&namespace, Space::Subject, pattern, cursor, limit).await?;
        Ok(NamePage { names, cursor })
    }
}

impl HostSubject for CallCtx {
    async fn open(&mut self, namespace: String, name: String) -> StateResult<Resource<Subject>> {
        self.charge(1)?;
        let key = self.namespace(&namespace, false)?.key(Space::Subject, &name)?;
        let shared = !namespace.is_empty();
        let read_only = self.namespace(&namespace, true).is_err().then_some(namespace);
        let subject = Subject { name, key, read_only, shared, pending: BTreeMap::new() };
        self.push_handle(subject)
    }

    async fn name(&mut self, subject: Resource<Subject>) -> wasmtime::Result<String> {
        Ok(self.table.get(&subject)?.name.clone())
    }

    async fn get(&mut self, subject: Resource<Subject>, kind: Kind, property: String) -> StateResult<Option<String>> {
        let (key, field) = self.property(&subject, kind, &property, false)?;
        let shared = self.subject(&subject)?.shared;
        let max = self.read_limit(shared);
        Ok(self.backend.hash_get(&key, &field, max).await.map_err(super::over_memory)?.map(text))
    }

    async fn load(&mut self, subject: Resource<Subject>) -> StateResult<Snapshot> {
        let key = self.subject_key(&subject, false)?;
        let mut snapshot = Snapshot { default: Vec::new(), extended: Vec::new() };
        let max = self.role.limits.max_memory_bytes;
        let fields = self.backend.hash_get_all(&key, max).await.map_err(|error| match error {
            StateError::TooLarge(size) => StateError::TooLarge(format!(
                "the subject holds {size} (the role's memory limit): read its properties one at a time"
            )),
            other => other,
        })?;
        // An operation a property, as a listing charges a key.
        self.charge_rest(fields.len())?;
        for (field, value) in fields {
            let (list, name) = match property_of(&field) {
                Some((Kind::Default, name)) => (&mut snapshot.default, name),
                Some((Kind::Extended, name)) => (&mut snapshot.extended, name),
                None => continue, // not written by this interface
            };
            list.push(Property { name: name.to_owned(), value: text(value) });
        }
        Ok(snapshot)
    }

    async fn exists(&mut self, subject: Resource<Subject>) -> StateResult<bool> {
        let key = self.subject_key(&subject, false)?;
        self.backend.exists(&key).await
    }

    async fn set(
        &mut self,
        subject: Resource<Subject>,
        kind: Kind,
        property: String,
        value: String,
    ) -> StateResult<()> {
        self.buffer(&subject, kind, &property, Some(value))
    }

    async fn remove(&mut self, subject: Resource<Subject>, kind: Kind, property: String) -> StateResult<()> {
        self.buffer(&subject, kind, &property, None)
    }

    async fn pending(&mut self, subject: Resource<Subject>) -> wasmtime::Result<u32> {
        Ok(self.table.get(&subject)?.pending.len() as u32)
    }

    async fn store(&mut self, handle: Resource<Subject>) -> StateResult<()> {
        let key = self.subject_key(&handle, true)?;
        let pending = self.subject(&handle)?.pending.len();
        self.charge(pending)?;
        let mut set = Vec::new();
        let mut remove = Vec::new();
        for (field, value) in &self.subject(&handle)?.pending {
            match value {
                Some(value) => set.push((field.clone(), value.clone())),
                None => remove.push(field.clone()),
            }
        }
        // The buffer empties only once the writes landed, so a store that
        // failed (say, Redis unavailable) can be retried.
        self.backend.hash_apply(&key, &set, &remove, self.default_ttl()).await?;
        self.clear_pending(&handle)
    }

    async fn discard(&mut self, subject: Resource<Subject>) -> wasmtime::Result<()> {
        Ok(self.clear_pending(&subject)?)
    }

    async fn increment(
        &mut self,
        subject: Resource<Subject>,
        kind: Kind,
        property: String,
        delta: i64,
    ) -> StateResult<i64> {
        let (key, field) = self.property(&subject, kind, &property, true)?;
        self.backend.hash_increment(&key, &field, delta, self.default_ttl()).await
    }

    async fn increment_float(
        &mut self,
        subject: Resource<Subject>,
        kind: Kind,
        property: String,
        delta: f64,
    ) -> StateResult<f64> {
        if !delta.is_finite() {
            return Err(StateError::InvalidArgument("delta must be a finite number".into()));
        }
        let (key, field) = self.property(&subject, kind, &property, true)?;
        self.backend.hash_increment_float(&key, &field, delta, self.default_ttl()).await
    }

    async fn compare_and_set(
        &mut self,
        subject: Resource<Subject>,
        kind: Kind,
        property: String,
        expected: Option<String>,
        new: Option<String>,
    ) -> StateResult<bool> {
        let (key, field) = self.property(&subject, kind, &property, true)?;
        if let Some(new) = &new {
            self.check_property_value(new)?;
        }
        let expected = expected.as_deref().map(str::as_bytes);
        let new = new.as_deref().map(str::as_bytes);
        self.backend.hash_compare_and_set(&key, &field, expected, new, self.default_ttl()).await
    }

    async fn delete(&mut self, subject: Resource<Subject>) -> StateResult<bool> {
        let key = self.subject_key(&subject, true)?;
        Ok(self.backend.delete_many(&[key]).await? > 0)
    }

    async fn expire(&mut self, subject: Resource<Subject>, ttl_ms: Option<u64>) -> StateResult<bool> {
        let key = self.subject_key(&subject, true)?;
        let ttl = self.expire_ttl(ttl_ms)?;
        self.backend.expire(&key, ttl).await
    }

    async fn expiry(&mut self, subject: Resource<Subject>) -> StateResult<Expiry> {
        let key = self.subject_key(&subject, false)?;
        Ok(self.backend.expiry(&key).await?.into())
    }

    async fn drop(&mut self, subject: Resource<Subject>) -> wasmtime::Result<()> {
        let dropped = self.delete_handle(subject)?;
        self.unhold(dropped.pending_bytes());
        Ok(())
    }
}

impl From<crate::backend::Expiry> for Expiry {
    fn from(expiry: crate::backend::Expiry) -> Self {
        use crate::backend::Expiry as E;
        match expiry {
            E::Missing => Expiry::Missing,
            E::Persistent => Expiry::Persistent,
            E::ExpiresIn(left) => Expiry::ExpiresInMs(left.as_millis() as u64),
        }
    }
}
