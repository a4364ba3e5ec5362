//! Compiled components cached on disk, so a restart loads a role without
//! compiling it again. An entry's name hashes the wasmtime version, the
//! engine's configuration and the component's sha256, so any change to
//! one of them misses the cache. Each entry ends with the sha256 of the
//! rest, checked before wasmtime sees it: a damaged entry (a flipped bit
//! in its code as much as a truncated file) is compiled again, never run.
//!
//! Loading an entry runs native code from the file: the cache directory
//! must be as trusted as the rolehost binary (see SECURITY.md). One (or an
//! entry) that is a link, another user's, or writable by others is not
//! used: roles are compiled instead.
//!
//! The cache keeps at most [`MAX_BYTES`]: after each write the least
//! recently used entries go (a load touches its entry), as do partial
//! files a process that died mid-write left behind.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use wasmtime::component::Component;
use wasmtime::Engine;

/// Where compiled components are kept.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The default place: `$XDG_CACHE_HOME/rolehost` or `~/.cache/rolehost`.
    pub fn default_dir() -> Option<PathBuf> {
        // An empty variable counts as unset (as the XDG spec says), not as
        // the current directory.
        let set = |name| std::env::var_os(name).filter(|value| !value.is_empty());
        let base =
            set("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| Some(Path::new(&set("HOME")?).join(".cache")))?;
        Some(base.join("rolehost"))
    }

    fn entry(&self, engine: &Engine, sha256: &str) -> PathBuf {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        ENTRY_FORMAT.hash(&mut hasher);
        self.dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()))
    }

    /// The compiled component for `bytes` (whose sha256 is `sha256`): from
    /// the cache when it holds a good entry, else compiled and stored.
    /// Also says whether it came from the cache.
    pub fn load(&self, engine: &Engine, sha256: &str, bytes: &[u8]) -> wasmtime::Result<(Component, bool)> {
        let entry = self.entry(engine, sha256);
        if let Err(why) = trusted(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "compile cache not used: {why}");
            return Ok((Component::from_binary(engine, bytes)?, false));
        }
        // Read into memory rather than mapping the file: a file truncated
        // by someone else while mapped would crash the process (SIGBUS).
        let stored = trusted(&entry).ok().and_then(|()| crate::files::read_regular(&entry, MAX_ENTRY_BYTES).ok());
        if let Some(stored) = stored {
            match checked(&stored) {
                // SAFETY: the entry is whole as `store` wrote it from
                // `Component::serialize` for this engine configuration (its
                // name says so), in a directory the operator trusts like the
                // binary itself; wasmtime also checks its header and version.
                Some(compiled) => match unsafe { Component::deserialize(engine, compiled) } {
                    Ok(component) => {
                        // Recently used, so pruning keeps it (best effort:
                        // the directory may be read-only).
                        let touched = std::fs::File::options().write(true).open(&entry);
                        let _ = touched.and_then(|file| file.set_modified(SystemTime::now()));
                        return Ok((component, true));
                    }
                    Err(e) => tracing::warn!(entry = %entry.display(), "unusable cache entry; compiling again: {e}"),
                },
                None => tracing::warn!(entry = %entry.display(), "damaged cache entry; compiling again"),
            }
        }
        let component = Component::from_binary(engine, bytes)?;
        if let Err(e) = self.store(&entry, &component) {
            tracing::warn!(dir = %self.dir.display(), "cannot write the compile cache: {e:#}");
        }
        if let Err(e) = prune(&self.dir, MAX_BYTES) {
            tracing::warn!(dir = %self.dir.display(), "cannot prune the compile cache: {e}");
        }
        Ok((component, false))
    }

    fn store(&self, entry: &Path, component: &Component) -> anyhow::Result<()> {
        // Made private (a directory that exists keeps its mode).
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let mut compiled = component.serialize()?;
        let digest = Sha256::digest(&compiled);
        compiled.extend_from_slice(&digest);
        Ok(crate::files::replace(entry, &compiled, 0o644)?)
    }
}

/// Most bytes of entries the cache keeps (compiled JavaScript or Python
/// roles take tens of MB each).
pub const MAX_BYTES: u64 = 2 << 30;

/// A partial file older than this was left by a process that died writing.
const STALE_PARTIAL: Duration = Duration::from_secs(3600);

/// Removes the least recently used entries of `dir` until the rest take at
/// most `max_bytes` (the newest always stays), and stale partial files.
fn prune(dir: &Path, max_bytes: u64) -> std::io::Result<()> {
    let now = SystemTime::now();
    let mut entries = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let Ok(meta) = item.metadata() else { continue };
        let (name, modified) = (item.file_name(), meta.modified().unwrap_or(now));
        let name = name.to_string_lossy();
        if !meta.is_file() {
            continue;
        }
        // Only files named as the cache names them: the directory may
        // hold others (`ROLEHOST_CACHE=.`).
        match kind_of(&name) {
            Some(Kept::Partial) if now.duration_since(modified).unwrap_or_default() > STALE_PARTIAL => {
                let _ = std::fs::remove_file(item.path());
            }
            Some(Kept::Entry) => entries.push((modified, meta.len(), item.path())),
            _ => {}
        }
    }
    entries.sort();
    let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
    entries.pop();
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
    Ok(())
}

/// Bumped when the layout of an entry changes, so old entries miss.
const ENTRY_FORMAT: u32 = 2;

/// Largest entry read (a compiled Python role is tens of MB).
const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// Whether compiled code at `path` (the cache directory, or an entry) may
/// run in this process: no link, owned by this user or root, and
/// writable by no one else. A missing path is trusted (nothing to run).
fn trusted(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.file_type().is_symlink() {
        return Err(format!("{} is a link", path.display()));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!("{} belongs to user {}, not this one ({me})", path.display(), meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("{} is writable by others (mode {:o})", path.display(), meta.mode() & 0o777));
    }
    Ok(())
}

/// Whether `name` is one the cache gives its files: `{sha256}-{hash}.cwasm`
/// for an entry, and `….cwasm.partial-…` while written (`.partial-…` in
/// place of `.cwasm` from older versions).
fn kind_of(name: &str) -> Option<Kept> {
    let (stem, rest) = name.split_at_checked(64 + 1 + 16)?;
    let hex = |text: &str| text.bytes().all(|b| b.is_ascii_hexdigit());
    let (sha256, hash) = stem.split_at(64);
    if !hex(sha256) || !hash.starts_with('-') || !hex(&hash[1..]) {
        return None;
    }
    match rest {
        ".cwasm" => Some(Kept::Entry),
        _ if rest.starts_with(".cwasm.partial-") || rest.starts_with(".partial-") => Some(Kept::Partial),
        _ => None,
    }
}

/// The files the cache keeps.
enum Kept {
    Entry,
    Partial,
}

/// The compiled bytes of a stored entry, if its trailing sha256 matches.
fn checked(stored: &[u8]) -> Option<&[u8]> {
    let (compiled, digest) = stored.split_at_checked(stored.len().checked_sub(32)?)?;
    (Sha256::digest(compiled).as_slice() == digest).then_some(compiled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_drops_the_least_recently_used_and_stale_partials() {
        let dir = std::env::temp_dir().join(format!("rolehost-cache-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        let file = |name: &str, len: usize, age_secs: u64| {
            let path = dir.join(name);
            std::fs::write(&path, vec![0; len]).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(now - Duration::from_secs(age_secs)).unwrap();
        };
        let name = |digit: char, end: &str| format!("{}-{}{end}", digit.to_string().repeat(64), "f".repeat(16));
        file(&name('a', ".cwasm"), 400, 300);
        file(&name('b', ".cwasm"), 400, 200);
        file(&name('c', ".cwasm"), 400, 100);
        file(&name('d', ".cwasm"), 400, 0);
        file(&name('e', ".partial-1-0"), 10, 7200);
        file(&name('f', ".partial-2-0"), 10, 5);
        // Files the cache did not name are never its to remove.
        file("notes.txt", 10_000, 9999);
        file("other.cwasm", 10_000, 9999);
        file("stale.cwasm.partial-1", 10, 7200);
        prune(&dir, 1000).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut expected = vec![
            name('c', ".cwasm"),
            name('d', ".cwasm"),
            name('f', ".partial-2-0"),
            "notes.txt".to_owned(),
            "other.cwasm".to_owned(),
            "stale.cwasm.partial-1".to_owned(),
        ];
        expected.sort();
        assert_eq!(left, expected);
        // The newest stays even alone over the limit.
        prune(&dir, 1).unwrap();
        assert!(dir.join(name('d', ".cwasm")).exists() && !dir.join(name('c', ".cwasm")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
