//! An in-memory [`Datastore`] with the same compare-and-swap semantics as
//! the real backends: for unit and property tests of code built on IPAM
//! (the `fake_store` of CNI's host-local).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::datastore::{Datastore, DatastoreError, Entry, Result, Revision};
use crate::lock::{NodeLock, ProcessLocks};

/// A map from key to (revision, document) behind a mutex.
#[derive(Debug, Default)]
pub struct MemDatastore {
    docs: Mutex<BTreeMap<String, (Revision, Vec<u8>)>>,
    writes: AtomicU64,
    locks: ProcessLocks,
}

impl MemDatastore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn docs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Revision, Vec<u8>)>> {
        // A panicking test thread must not hide the store from the others.
        self.docs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_revision(&self) -> Revision {
        Revision(self.writes.fetch_add(1, Ordering::Relaxed).to_string())
    }
}

impl Datastore for MemDatastore {
    fn get(&self, key: &str) -> Result<Option<Entry>> {
        Ok(self.docs().get(key).map(|(revision, value)| Entry {
            key: key.to_string(),
            value: value.clone(),
            revision: revision.clone(),
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        Ok(self
            .docs()
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, (revision, value))| Entry {
                key: key.clone(),
                value: value.clone(),
                revision: revision.clone(),
            })
            .collect())
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        let mut docs = self.docs();
        if docs.contains_key(key) {
            return Err(DatastoreError::Conflict {
                key: key.to_string(),
            });
        }
        let revision = self.next_revision();
        docs.insert(key.to_string(), (revision.clone(), value.to_vec()));
        Ok(revision)
    }

    fn update(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        let mut docs = self.docs();
        match docs.get_mut(key) {
            Some((revision, doc)) if revision == expected => {
                *revision = self.next_revision();
                *doc = value.to_vec();
                Ok(revision.clone())
            }
            _ => Err(DatastoreError::Conflict {
                key: key.to_string(),
            }),
        }
    }

    fn delete(&self, key: &str, expected: &Revision) -> Result<()> {
        let mut docs = self.docs();
        match docs.get(key) {
            None => Err(DatastoreError::NotFound {
                key: key.to_string(),
            }),
            Some((revision, _)) if revision == expected => {
                docs.remove(key);
                Ok(())
            }
            Some(_) => Err(DatastoreError::Conflict {
                key: key.to_string(),
            }),
        }
    }

    fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_string()
    }

    /// In-process: one process owns a memory store.
    fn node_lock(&self, node: &str) -> Result<NodeLock> {
        Ok(self.locks.lock(node))
    }
}
