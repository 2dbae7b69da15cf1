//! Atomic file writes: a temporary file in the target's directory, written
//! with its final mode, synced, then renamed over the target. A reader (a
//! kubelet exec'ing the plugin) sees the old file or the new one, never a
//! half-written one; a running executable keeps its old inode.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file was created or replaced.
    Written,
    /// It already had these bytes and this mode.
    Unchanged,
}

/// An I/O error with the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct FileError {
    /// What was being done (`write`, `read`, `remove`).
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why it failed.
    #[source]
    pub source: io::Error,
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError { what, path, source }
}

/// Writes `bytes` to `path` with `mode` atomically, unless it holds them already.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<Outcome, FileError> {
    if let Ok(meta) = fs::metadata(path) {
        let same_mode = meta.permissions().mode() & 0o7777 == mode;
        if same_mode && meta.len() == bytes.len() as u64 && fs::read(path).is_ok_and(|b| b == bytes)
        {
            return Ok(Outcome::Unchanged);
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err("create", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.tabby-{}", std::process::id()));
    let written = write_new(&temp, bytes, mode)
        .and_then(|()| fs::rename(&temp, path).map_err(err("rename into place", path)));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Outcome::Written)
}

fn write_new(temp: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let _ = fs::remove_file(temp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(temp)
        .map_err(err("create", temp))?;
    // The umask may have narrowed the mode.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err("chmod", temp))?;
    file.write_all(bytes).map_err(err("write", temp))?;
    file.sync_all().map_err(err("sync", temp))
}

/// Removes `path`; `true` if it was there.
pub fn remove(path: &Path) -> Result<bool, FileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_sets_the_mode_and_a_second_identical_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/f");
        assert_eq!(
            write_atomic(&path, b"one", 0o600).unwrap(),
            Outcome::Written
        );
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            write_atomic(&path, b"one", 0o600).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(
            write_atomic(&path, b"one", 0o644).unwrap(),
            Outcome::Written
        );
        assert_eq!(
            write_atomic(&path, b"two", 0o644).unwrap(),
            Outcome::Written
        );
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let left: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
    }
}
