//! The `file` datastore backend: a directory on the host, one JSON document
//! per key, safe across processes.
//!
//! Layout (for the default `/var/lib/tabby/datastore`):
//!
//! ```text
//! .lock                               flock(2) taken for every write
//! .swept                              when stale temporary files were last removed
//! pools/default-ipv4-ippool.json      {"revision":"…","value":{…}}
//! blocks/10.244.0.0-26.json
//! affinities/node-a/10.244.0.0-26.json
//! handles/k8s-pod-network.0123abcd.json
//! ```
//!
//! - A key's `/` separates directories; each component is escaped
//!   (`%XX` for anything outside `[A-Za-z0-9._:-]`, and for a leading `.`)
//!   so that no key can escape the directory or collide with the lock or
//!   temporary files, which start with a dot.
//! - Each file wraps the document with its revision. The revision is a
//!   token unique to each write (time, process, counter), so a document
//!   deleted and created again never reuses an old revision (no ABA).
//! - Reads take no lock: a writer writes a temporary file and renames it
//!   over the document, so a reader sees the old or the new document, never
//!   a torn one, even when the writer is killed midway.
//! - Writes (create, update, delete) hold the store's exclusive flock only
//!   for the read-compare-write, so compare-and-swap is atomic across
//!   threads and processes.
//! - A write is durable when it returns: the document's data is fsynced
//!   before the rename, and the directory after it (a rename lives in the
//!   directory: without that fsync a committed allocation can vanish on a
//!   power loss), outside the lock, so that writers to other keys are not
//!   held up by the disk; new directories are fsynced into their parents.
//!   `update_relaxed` and `delete_relaxed` (releases) skip the directory
//!   fsync: a crash may bring the older document back, which keeps an
//!   address allocated (reclaimed by a retried DEL, GC or repair), never
//!   frees one twice; the data is still fsynced before the rename.
//!   `create_deferred` and `update_deferred` (an assign) skip it too and
//!   leave it to `sync`, which fsyncs the directories of the keys it is
//!   given: a CNI ADD calls it outside the node lock, beside its netlink
//!   work, and answers only once it returned (see `Datastore::sync`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::datastore::{Datastore, DatastoreError, Entry, Result, Revision};
use crate::lock::NodeLock;

/// The default directory of the file datastore.
pub const DEFAULT_PATH: &str = "/var/lib/tabby/datastore";

const LOCK_FILE: &str = ".lock";
const EXT: &str = ".json";

/// A directory of JSON documents with flock-protected compare-and-swap.
#[derive(Debug, Clone)]
pub struct FileDatastore {
    root: PathBuf,
}

/// The on-disk wrapper of a document.
#[derive(Deserialize)]
struct Stored<'a> {
    revision: String,
    #[serde(borrow)]
    value: &'a RawValue,
}

impl FileDatastore {
    /// Opens (creating it if needed) the datastore directory `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let root = dir.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(|e| unavailable(&root, e))?;
        let store = Self { root };
        // Make sure the lock file can be created now rather than on the first
        // write; under it, no writer is between its rename and its cleanup.
        let lock = store.lock()?;
        store.sweep_if_due();
        drop(lock);
        Ok(store)
    }

    /// Removes killed writers' temporary files, at most once a minute (the
    /// walk costs far more than the rest of an open; `.swept` says when).
    fn sweep_if_due(&self) {
        let marker = self.root.join(SWEEP_MARKER);
        let now = SystemTime::now();
        let due = fs::metadata(&marker)
            .and_then(|m| m.modified())
            .map_or(true, |last| {
                now.duration_since(last)
                    .map_or(true, |d| d >= STALE_TEMP_AGE)
            });
        if due {
            remove_stale_temp_files(&self.root, now - STALE_TEMP_AGE);
            let _ = fs::write(&marker, b"");
        }
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the store-wide exclusive lock; released when the guard drops.
    fn lock(&self) -> Result<Flock<File>> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| unavailable(&path, e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| unavailable(&path, io::Error::from(errno)))
    }

    /// The file that holds `key`.
    fn path_of(&self, key: &str) -> Result<PathBuf> {
        let mut path = self.root.clone();
        let mut parts = key.split('/').peekable();
        while let Some(part) = parts.next() {
            if part.is_empty() {
                return Err(DatastoreError::Corrupt {
                    key: key.to_string(),
                    reason: "a key must not have empty components".to_string(),
                });
            }
            let mut name = escape(part);
            if parts.peek().is_none() {
                name.push_str(EXT);
            }
            path.push(name);
        }
        Ok(path)
    }

    /// Reads and unwraps one document file; `Ok(None)` when it is missing.
    fn read(&self, key: &str, path: &Path) -> Result<Option<Entry>> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable(path, e)),
        };
        let stored: Stored<'_> =
            serde_json::from_str(&text).map_err(|e| DatastoreError::Corrupt {
                key: key.to_string(),
                reason: format!("{}: {e}", path.display()),
            })?;
        Ok(Some(Entry {
            key: key.to_string(),
            value: stored.value.get().as_bytes().to_vec(),
            revision: Revision(stored.revision),
        }))
    }

    /// Writes the new document for `key` to a temporary file of its own,
    /// on disk (fsync), without the lock: the slow part of a write stays out
    /// of the critical section, which then only compares and renames.
    fn prepare(&self, key: &str, path: &Path, value: &[u8]) -> Result<Prepared> {
        let text = std::str::from_utf8(value).map_err(|_| not_json(key))?;
        let raw: &RawValue = serde_json::from_str(text).map_err(|_| not_json(key))?;
        let revision = fresh_revision();
        let rev_json = serde_json::to_string(&revision.0).map_err(|_| not_json(key))?;
        let doc = format!("{{\"revision\":{rev_json},\"value\":{}}}\n", raw.get());

        let dir = path.parent().unwrap_or(&self.root);
        self.ensure_dir(dir)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Named after the unique revision: concurrent writers never share it.
        let tmp = dir.join(format!(".{file_name}.{}.tmp", revision.0));
        let mut file = File::create(&tmp).map_err(|e| unavailable(&tmp, e))?;
        let written = file
            .write_all(doc.as_bytes())
            // The data must be on disk before the rename makes it the
            // document: after a power loss a renamed-but-empty file would
            // read as corrupt and lose an allocation.
            .and_then(|()| file.sync_data());
        let prepared = Prepared { tmp, revision };
        written.map_err(|e| unavailable(&prepared.tmp, e))?;
        Ok(prepared)
    }

    /// Creates `dir` (under the root) if needed, making each new directory
    /// durable in its parent.
    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut d = dir;
        while !d.is_dir() && d != self.root {
            missing.push(d);
            d = d.parent().unwrap_or(&self.root);
        }
        fs::create_dir_all(dir).map_err(|e| unavailable(dir, e))?;
        for d in missing.into_iter().rev() {
            sync_parent(d)?;
        }
        Ok(())
    }

    /// Exclusive create; with [`Sync::Durable`] the directory entry is on
    /// disk before it returns.
    fn create_with(&self, key: &str, value: &[u8], sync: Sync) -> Result<Revision> {
        let path = self.path_of(key)?;
        let prepared = self.prepare(key, &path, value)?;
        let revision = {
            let _lock = self.lock()?;
            if path.exists() {
                return Err(DatastoreError::Conflict {
                    key: key.to_string(),
                });
            }
            prepared.commit(&path)?
        };
        if sync == Sync::Durable {
            sync_parent(&path)?;
        }
        Ok(revision)
    }

    /// Compare-and-swap replace; with [`Sync::Durable`] the directory entry
    /// is on disk before it returns.
    fn update_with(
        &self,
        key: &str,
        value: &[u8],
        expected: &Revision,
        sync: Sync,
    ) -> Result<Revision> {
        let path = self.path_of(key)?;
        let prepared = self.prepare(key, &path, value)?;
        let revision = {
            let _lock = self.lock()?;
            match self.read(key, &path)? {
                Some(current) if current.revision == *expected => prepared.commit(&path)?,
                _ => {
                    return Err(DatastoreError::Conflict {
                        key: key.to_string(),
                    })
                }
            }
        };
        if sync == Sync::Durable {
            sync_parent(&path)?;
        }
        Ok(revision)
    }

    /// Compare-and-swap delete; with [`Sync::Durable`] the removal is on
    /// disk before it returns.
    fn delete_with(&self, key: &str, expected: &Revision, sync: Sync) -> Result<()> {
        let path = self.path_of(key)?;
        {
            let _lock = self.lock()?;
            match self.read(key, &path)? {
                None => {
                    return Err(DatastoreError::NotFound {
                        key: key.to_string(),
                    })
                }
                Some(current) if current.revision == *expected => {
                    fs::remove_file(&path).map_err(|e| unavailable(&path, e))?
                }
                Some(_) => {
                    return Err(DatastoreError::Conflict {
                        key: key.to_string(),
                    })
                }
            }
        }
        match sync {
            Sync::Durable => sync_parent(&path),
            Sync::Relaxed => Ok(()),
        }
    }

    /// Collects every document under `dir` (recursively) into `out`.
    fn walk(&self, dir: &Path, key_prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
            Err(e) => return Err(unavailable(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| unavailable(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // the lock, temporary files
            }
            let file_type = entry
                .file_type()
                .map_err(|e| unavailable(&entry.path(), e))?;
            if file_type.is_dir() {
                let sub = format!("{key_prefix}{}/", unescape(&name));
                self.walk(&entry.path(), &sub, out)?;
            } else if let Some(stem) = name.strip_suffix(EXT) {
                out.push((format!("{key_prefix}{}", unescape(stem)), entry.path()));
            }
        }
        Ok(())
    }
}

impl Datastore for FileDatastore {
    fn get(&self, key: &str) -> Result<Option<Entry>> {
        let path = self.path_of(key)?;
        self.read(key, &path)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        // Only walk the deepest directory the prefix names.
        let (dir_key, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let mut dir = self.root.clone();
        let mut key_prefix = String::new();
        for part in dir_key.split('/').filter(|p| !p.is_empty()) {
            dir.push(escape(part));
            key_prefix.push_str(part);
            key_prefix.push('/');
        }
        let mut found = Vec::new();
        self.walk(&dir, &key_prefix, &mut found)?;
        found.retain(|(key, _)| key.starts_with(prefix));
        found.sort();
        let mut entries = Vec::with_capacity(found.len());
        for (key, path) in found {
            // A document deleted while we listed is simply not listed.
            if let Some(entry) = self.read(&key, &path)? {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        self.create_with(key, value, Sync::Durable)
    }

    fn update(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        self.update_with(key, value, expected, Sync::Durable)
    }

    fn delete(&self, key: &str, expected: &Revision) -> Result<()> {
        self.delete_with(key, expected, Sync::Durable)
    }

    fn update_relaxed(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        self.update_with(key, value, expected, Sync::Relaxed)
    }

    fn delete_relaxed(&self, key: &str, expected: &Revision) -> Result<()> {
        self.delete_with(key, expected, Sync::Relaxed)
    }

    fn create_deferred(&self, key: &str, value: &[u8]) -> Result<Revision> {
        self.create_with(key, value, Sync::Relaxed)
    }

    fn update_deferred(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        self.update_with(key, value, expected, Sync::Relaxed)
    }

    /// Fsyncs the directory of each key once: a deferred write's data was
    /// fsynced before its rename, so only the rename is left to persist.
    fn sync(&self, keys: &[String]) -> Result<()> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for key in keys {
            let path = self.path_of(key)?;
            let dir = path.parent().unwrap_or(&self.root).to_path_buf();
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs.iter().try_for_each(|dir| sync_dir(dir))
    }

    fn ping(&self) -> Result<()> {
        fs::read_dir(&self.root).map_err(|e| unavailable(&self.root, e))?;
        let probe = self.root.join(".ping");
        fs::write(&probe, b"{}").map_err(|e| unavailable(&probe, e))?;
        // Several pingers may race on the probe: its absence is fine.
        match fs::remove_file(&probe) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(unavailable(&probe, e)),
            _ => Ok(()),
        }
    }

    fn describe(&self) -> String {
        format!("file:{}", self.root.display())
    }

    /// A flock on `.ipam-<node>.lock` beside the documents (see [`crate::lock`]).
    fn node_lock(&self, node: &str) -> Result<NodeLock> {
        NodeLock::host(&self.root.join(format!(".ipam-{}.lock", escape(node))))
    }
}

/// Whether a write waits for its directory entry to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// `update` / `delete`: fsync the directory after the rename or removal.
    Durable,
    /// `update_relaxed` / `delete_relaxed` (a release: a crash may undo
    /// it) and `create_deferred` / `update_deferred` (durable at `sync`).
    Relaxed,
}

/// A document written to its temporary file; dropped without [`Prepared::commit`]
/// (a conflict, an error) it removes the file.
struct Prepared {
    tmp: PathBuf,
    revision: Revision,
}

impl Prepared {
    /// Makes it the document at `path` (the caller holds the lock).
    fn commit(self, path: &Path) -> Result<Revision> {
        fs::rename(&self.tmp, path).map_err(|e| unavailable(path, e))?;
        Ok(self.revision.clone())
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // After a commit the file is gone already; otherwise clean up.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// How old a writer's temporary file must be to count as left by a killed
/// writer; also how often [`FileDatastore::open`] looks for them.
const STALE_TEMP_AGE: Duration = Duration::from_secs(60);

/// Touched by each sweep for temporary files.
const SWEEP_MARKER: &str = ".swept";

/// Removes, under `dir`, the temporary files (`.<doc>.json.<revision>.tmp`)
/// last written before `before`: their writers were killed between write
/// and rename. Best effort: a file that cannot be read or removed stays.
fn remove_stale_temp_files(dir: &Path, before: SystemTime) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // The type comes with the directory entry: only candidates are stat'ed.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_stale_temp_files(&entry.path(), before);
        } else if name.starts_with('.')
            && name.ends_with(".tmp")
            && name.contains(&format!("{EXT}."))
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m < before)
            && fs::remove_file(entry.path()).is_ok()
        {
            tracing::info!(file = %entry.path().display(), "removed a killed writer's temporary file");
        }
    }
}

/// Makes the directory entry of `path` durable: fsync of its directory.
fn sync_parent(path: &Path) -> Result<()> {
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Fsyncs the directory `dir`: the renames and removals in it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| unavailable(dir, e))
}

fn unavailable(path: &Path, source: io::Error) -> DatastoreError {
    DatastoreError::Unavailable {
        location: path.display().to_string(),
        source,
    }
}

fn not_json(key: &str) -> DatastoreError {
    DatastoreError::Corrupt {
        key: key.to_string(),
        reason: "the value to write is not JSON".to_string(),
    }
}

/// A revision no other write (in any process) produces.
fn fresh_revision() -> Revision {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    Revision(format!("{nanos:x}-{:x}-{count:x}", std::process::id()))
}

/// Escapes one key component into a safe file name.
pub(crate) fn escape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for (i, byte) in part.bytes().enumerate() {
        let safe = byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b':' | b'.');
        if safe && !(i == 0 && byte == b'.') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Reverses [`escape`]; malformed escapes are kept literally.
fn unescape(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileDatastore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileDatastore::open(dir.path().join("ds")).expect("open");
        (dir, store)
    }

    #[test]
    fn escaping_round_trips_and_hides_dots_and_slashes() {
        for part in [
            "10.244.0.0-26",
            "fd00::-122",
            ".hidden",
            "a%b",
            "k8s.pod",
            "ä x",
        ] {
            let escaped = escape(part);
            assert!(!escaped.starts_with('.'));
            assert!(!escaped.contains('/'));
            assert_eq!(unescape(&escaped), part);
        }
    }

    #[test]
    fn create_update_delete_follow_compare_and_swap() {
        let (_dir, ds) = store();
        let rev = ds
            .create("blocks/10.0.0.0-26", br#"{"a":1}"#)
            .expect("create");
        assert!(matches!(
            ds.create("blocks/10.0.0.0-26", b"{}"),
            Err(DatastoreError::Conflict { .. })
        ));
        let rev2 = ds
            .update("blocks/10.0.0.0-26", br#"{"a":2}"#, &rev)
            .expect("update");
        assert!(matches!(
            ds.update("blocks/10.0.0.0-26", b"{}", &rev),
            Err(DatastoreError::Conflict { .. })
        ));
        let got = ds.get("blocks/10.0.0.0-26").expect("get").expect("present");
        assert_eq!(got.value, br#"{"a":2}"#);
        assert_eq!(got.revision, rev2);
        assert!(matches!(
            ds.delete("blocks/10.0.0.0-26", &rev),
            Err(DatastoreError::Conflict { .. })
        ));
        ds.delete("blocks/10.0.0.0-26", &rev2).expect("delete");
        assert!(ds.get("blocks/10.0.0.0-26").expect("get").is_none());
        assert!(matches!(
            ds.delete("blocks/10.0.0.0-26", &rev2),
            Err(DatastoreError::NotFound { .. })
        ));
        // Re-created documents never reuse a revision.
        let rev3 = ds
            .create("blocks/10.0.0.0-26", b"{}")
            .expect("create again");
        assert_ne!(rev3, rev2);
        assert_ne!(rev3, rev);
    }

    #[test]
    fn rejects_values_that_are_not_json_and_bad_keys() {
        let (_dir, ds) = store();
        assert!(matches!(
            ds.create("a", b"{not json"),
            Err(DatastoreError::Corrupt { .. })
        ));
        assert!(matches!(
            ds.create("a//b", b"{}"),
            Err(DatastoreError::Corrupt { .. })
        ));
        ds.ping().expect("ping");
        assert!(ds.describe().starts_with("file:"));
    }

    #[test]
    fn a_truncated_document_is_reported_corrupt_not_panicking() {
        let (_dir, ds) = store();
        ds.create("pools/p", b"{}").expect("create");
        fs::write(ds.root().join("pools/p.json"), b"{\"revision\":").expect("write");
        assert!(matches!(
            ds.get("pools/p"),
            Err(DatastoreError::Corrupt { .. })
        ));
    }
}
