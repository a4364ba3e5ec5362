//! The files rolehost reads and writes for an operator (manifests,
//! components, checkpoints) and for its compile cache: never stuck on a
//! pipe or a device, never written through a file someone else put in the
//! way.

use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The bytes of the regular file at `path`, refused past `max` bytes or
/// when it is no regular file (a device or a pipe that never ends). Opened
/// without blocking, so a pipe with no writer does not hang the open.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.len() > max {
        return Err(io::Error::other(format!("{} bytes, more than the {max} read", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::other(format!("more than the {max} bytes read")));
    }
    Ok(bytes)
}

/// The largest component file rolehost reads (Python's runtime makes
/// one of about 19 MB).
pub const MAX_COMPONENT_BYTES: u64 = 512 << 20;

/// The bytes of the component file at `path`: a regular file of at most
/// [`MAX_COMPONENT_BYTES`], so a pipe or a device named by mistake fails
/// rather than hanging a reload (and every reload after it).
pub fn read_component(path: &Path) -> std::io::Result<Vec<u8>> {
    read_regular(path, MAX_COMPONENT_BYTES)
}

/// Writes `bytes` to `path` readable by its owner alone, through a new
/// file beside it renamed into place: a failed write (a full disk) leaves
/// the file there before whole. A link is followed (the file it names is
/// replaced); a device or a pipe (`/dev/stdout`) is written straight.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    if std::fs::metadata(&target).is_ok_and(|meta| !meta.is_file()) {
        return std::fs::File::options().write(true).open(&target)?.write_all(bytes);
    }
    replace(&target, bytes, 0o600)
}

/// Writes `bytes` to `path` (with `mode` if new) through a new file beside
/// it (never a file or link already there) renamed over it: a reader never
/// sees half of it, and a failed write leaves what was there whole.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut aside = path.as_os_str().to_owned();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    aside.push(format!(".partial-{}-{nanos}", std::process::id()));
    let aside = PathBuf::from(aside);
    let mut file = std::fs::File::options().write(true).create_new(true).mode(mode).open(&aside)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&aside, path));
    if written.is_err() {
        // Ours (made new above): leave no half-written file behind.
        let _ = std::fs::remove_file(&aside);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_written_aside() {
        let dir = std::env::temp_dir().join(format!("rolehost-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"old contents, longer").unwrap();
        assert_eq!(read_regular(&file, 100).unwrap(), b"old contents, longer");
        assert!(read_regular(&file, 5).is_err(), "past the limit");
        for other in [Path::new("/dev/zero"), &dir] {
            assert_eq!(read_regular(other, 100).unwrap_err().to_string(), "not a regular file");
        }
        // A pipe with no writer: refused at once, not waited on.
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        assert_eq!(read_regular(&fifo, 100).unwrap_err().to_string(), "not a regular file");
        // Replaced whole, private; through a link, the file it names.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        write_private(&link, b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        // A device is written straight.
        write_private(Path::new("/dev/null"), b"gone").unwrap();
        let mut left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["fifo", "file", "link"], "nothing left aside");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
