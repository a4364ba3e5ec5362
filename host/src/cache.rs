//! Compiled components cached on disk, so a restart loads a role without
//! compiling it again. An entry's name hashes the wasmtime version, the
//! engine's configuration and the component's sha256, so any change to
//! one of them misses the cache. Each entry ends with the sha256 of the
//! rest, checked before wasmtime sees it: a damaged entry (a flipped bit
//! in its code as much as a truncated file) is compiled again, never run.
//!
//! Loading an entry runs native code from the file: the cache directory
//! must be as trusted as the rolehost binary (see SECURITY.md).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

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
        // Read into memory rather than mapping the file: a file truncated
        // by someone else while mapped would crash the process (SIGBUS).
        if let Ok(stored) = std::fs::read(&entry) {
            match checked(&stored) {
                // SAFETY: the entry is whole as `store` wrote it from
                // `Component::serialize` for this engine configuration (its
                // name says so), in a directory the operator trusts like the
                // binary itself; wasmtime also checks its header and version.
                Some(compiled) => match unsafe { Component::deserialize(engine, compiled) } {
                    Ok(component) => return Ok((component, true)),
                    Err(e) => tracing::warn!(entry = %entry.display(), "unusable cache entry; compiling again: {e}"),
                },
                None => tracing::warn!(entry = %entry.display(), "damaged cache entry; compiling again"),
            }
        }
        let component = Component::from_binary(engine, bytes)?;
        if let Err(e) = self.store(&entry, &component) {
            tracing::warn!(dir = %self.dir.display(), "cannot write the compile cache: {e:#}");
        }
        Ok((component, false))
    }

    fn store(&self, entry: &Path, component: &Component) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        // Write aside, then rename: a reader never sees half an entry.
        let partial = entry.with_extension(format!("partial-{}", std::process::id()));
        let mut compiled = component.serialize()?;
        let digest = Sha256::digest(&compiled);
        compiled.extend_from_slice(&digest);
        std::fs::write(&partial, compiled)?;
        std::fs::rename(&partial, entry)?;
        Ok(())
    }
}

/// Bumped when the layout of an entry changes, so old entries miss.
const ENTRY_FORMAT: u32 = 2;

/// The compiled bytes of a stored entry, if its trailing sha256 matches.
fn checked(stored: &[u8]) -> Option<&[u8]> {
    let (compiled, digest) = stored.split_at_checked(stored.len().checked_sub(32)?)?;
    (Sha256::digest(compiled).as_slice() == digest).then_some(compiled)
}
