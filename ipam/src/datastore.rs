//! The storage contract every IPAM backend implements.
//!
//! Documents are opaque JSON bytes under slash-separated keys
//! (`pools/<name>`, `blocks/<cidr>`, `affinities/<node>/<cidr>`,
//! `handles/<handle>`, `nodes/<name>`, `config/<name>`). The only way to
//! change a document is compare-and-swap on its [`Revision`]: a writer that
//! lost a race gets [`DatastoreError::Conflict`] and must re-read; nothing is
//! ever overwritten blindly.

use std::fmt;

use crate::lock::NodeLock;

/// An opaque document version. The file backend counts writes; the
/// Kubernetes backend will carry `resourceVersion`, etcd `mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Revision(pub String);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored document with the revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full key, e.g. `blocks/10.244.0.0-26`.
    pub key: String,
    /// The JSON document.
    pub value: Vec<u8>,
    /// The revision to pass to [`Datastore::update`] or [`Datastore::delete`].
    pub revision: Revision,
}

/// Errors of a datastore backend.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// The document changed (or appeared, or vanished) since it was read.
    #[error("datastore conflict on {key}: it was changed by another writer")]
    Conflict {
        /// The key that was raced on.
        key: String,
    },
    /// The document does not exist.
    #[error("datastore key {key} not found")]
    NotFound {
        /// The missing key.
        key: String,
    },
    /// The backend cannot be reached or read (permissions, disk, network).
    #[error("datastore unavailable at {location}")]
    Unavailable {
        /// Where the backend lives (a directory, an URL).
        location: String,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// A stored document is not valid for its key.
    #[error("datastore document {key} is corrupt: {reason}")]
    Corrupt {
        /// The offending key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result alias for datastore operations.
pub type Result<T, E = DatastoreError> = std::result::Result<T, E>;

/// A key/value store with compare-and-swap, shared by every process on a
/// node (and, for the cluster backends, every node).
pub trait Datastore: Send + Sync {
    /// Reads one document; `Ok(None)` when it does not exist.
    fn get(&self, key: &str) -> Result<Option<Entry>>;
    /// Lists every document whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;
    /// Creates a document; [`DatastoreError::Conflict`] if it already exists.
    fn create(&self, key: &str, value: &[u8]) -> Result<Revision>;
    /// Replaces a document if it is still at `expected`; else `Conflict`
    /// (also when it was deleted meanwhile).
    fn update(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision>;
    /// Deletes a document if it is still at `expected`; else `Conflict`.
    /// Deleting a missing document is `NotFound`.
    fn delete(&self, key: &str, expected: &Revision) -> Result<()>;
    /// [`Datastore::update`] for a write that a crash may undo safely: a
    /// release, whose loss leaves an address allocated to a gone attachment
    /// (never free twice) until a retried DEL, a GC or a repair releases it.
    /// It is atomic and compare-and-swap like `update`, but the backend may
    /// return before it is durable (the file backend skips the directory
    /// fsync; the document's data is still on disk before it is renamed, so
    /// a crash leaves the old or the new document, never a torn one). A
    /// later durable write to the same kind of document makes it durable.
    fn update_relaxed(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        self.update(key, value, expected)
    }
    /// [`Datastore::delete`] that a crash may undo safely (see
    /// [`Datastore::update_relaxed`]): the deleted handle of a release.
    fn delete_relaxed(&self, key: &str, expected: &Revision) -> Result<()> {
        self.delete(key, expected)
    }
    /// [`Datastore::create`] whose durability the caller completes with
    /// [`Datastore::sync`] before anyone outside the datastore learns of it
    /// (an assign, before the CNI result names the address). It is atomic
    /// and exclusive like `create` and visible to every reader at once, so
    /// no later assign can take what it took; only its way to the disk may
    /// be unfinished: a crash before the sync may lose it (the file
    /// backend renames the fsynced document into place but leaves the
    /// directory fsync to `sync`). The default is `create` (durable at once).
    fn create_deferred(&self, key: &str, value: &[u8]) -> Result<Revision> {
        self.create(key, value)
    }
    /// [`Datastore::update`] made durable by a later [`Datastore::sync`]
    /// (see [`Datastore::create_deferred`]).
    fn update_deferred(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        self.update(key, value, expected)
    }
    /// Makes the deferred (and relaxed) writes of `keys` durable: when it
    /// returns, a crash no longer undoes them. Writes of other keys beside
    /// them may become durable too. The default does nothing: a backend
    /// whose writes are durable when they return.
    fn sync(&self, keys: &[String]) -> Result<()> {
        let _ = keys;
        Ok(())
    }
    /// Whether the backend answers at all (for CNI STATUS).
    fn ping(&self) -> Result<()>;
    /// A human description (`file:/var/lib/tabby/datastore`).
    fn describe(&self) -> String;
    /// Takes the node-wide IPAM lock of `node`, which serializes that node's
    /// assigns and releases with its GC and repairs; waits while it is held.
    /// Every backend has one (a host-local flock for the file and Kubernetes
    /// backends, see [`crate::lock`]): without it a GC could release an
    /// address between an ADD's assign and the interfaces it creates.
    fn node_lock(&self, node: &str) -> Result<NodeLock>;
}

/// Forwards every method to the pointee, so that `Ipam` can own a shared
/// (`Arc`) or dynamically chosen (`Box<dyn Datastore>`) backend.
macro_rules! forward_datastore {
    ($($ptr:ident)::+) => {
        impl<T: Datastore + ?Sized> Datastore for $($ptr)::+<T> {
            fn get(&self, key: &str) -> Result<Option<Entry>> {
                (**self).get(key)
            }
            fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
                (**self).list(prefix)
            }
            fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
                (**self).create(key, value)
            }
            fn update(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
                (**self).update(key, value, expected)
            }
            fn delete(&self, key: &str, expected: &Revision) -> Result<()> {
                (**self).delete(key, expected)
            }
            fn update_relaxed(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
                (**self).update_relaxed(key, value, expected)
            }
            fn delete_relaxed(&self, key: &str, expected: &Revision) -> Result<()> {
                (**self).delete_relaxed(key, expected)
            }
            fn create_deferred(&self, key: &str, value: &[u8]) -> Result<Revision> {
                (**self).create_deferred(key, value)
            }
            fn update_deferred(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
                (**self).update_deferred(key, value, expected)
            }
            fn sync(&self, keys: &[String]) -> Result<()> {
                (**self).sync(keys)
            }
            fn ping(&self) -> Result<()> {
                (**self).ping()
            }
            fn describe(&self) -> String {
                (**self).describe()
            }
            fn node_lock(&self, node: &str) -> Result<NodeLock> {
                (**self).node_lock(node)
            }
        }
    };
}

forward_datastore!(std::sync::Arc);
forward_datastore!(Box);
