//! Sources of cluster state for the service proxy: Services and
//! EndpointSlices as [`ProxyEvent`]s. The file backend watches a directory of
//! Kubernetes YAML (what the lab writes); the Kubernetes backend
//! ([`kubernetes`]) watches the API server behind the same trait.
//!
//! ```text
//!  every interval: list DIR ──changed files (mtime, size, inode)──▶ parse
//!      ──union of all files' objects──▶ diff with what was sent ──▶ mpsc<ProxyEvent>
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::model::ServiceKey;
use crate::proxier::SourceId;
use crate::yaml;
use crate::ProxyEvent;
use tabby_errors::chain;

pub mod kubernetes;

pub use kubernetes::KubeClusterState;

/// A source of cluster state for the proxy (files or the Kubernetes API).
pub trait ClusterState: Send + 'static {
    /// Sends every object once, then [`ProxyEvent::SourceSynced`] for each
    /// kind it serves (the proxy's first sync waits for it), then every
    /// change, until `tx` closes.
    fn run(self, tx: mpsc::Sender<ProxyEvent>) -> impl Future<Output = ()> + Send;
}

/// A directory of Kubernetes YAML: every file whose name ends in `.yaml` or
/// `.yml` (hidden files skipped), each holding one or more `---`-separated
/// documents. Kinds `Service` (v1) and `EndpointSlice` (discovery.k8s.io/v1)
/// are read, other kinds ignored. The directory is polled every `interval`;
/// a file is re-read when its mtime, size or inode changes (the lab writes
/// files atomically by rename).
///
/// A file that does not parse is logged and keeps the objects it last held
/// until its next change; a missing directory holds no objects. The first
/// scan that could list the directory is the initial state: Services and
/// EndpointSlices are synced after it (a file that does not parse then is
/// an error to fix, not a state to wait for).
#[derive(Debug, Clone)]
pub struct FileClusterState {
    /// The directory.
    pub dir: PathBuf,
    /// Time between two scans.
    pub interval: Duration,
}

impl ClusterState for FileClusterState {
    async fn run(self, tx: mpsc::Sender<ProxyEvent>) {
        let mut scanner = Scanner::new(self.dir);
        let mut synced = false;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = tx.closed() => return,
            }
            // Reading and parsing files blocks: keep it off the runtime's threads.
            let scanned = tokio::task::spawn_blocking(move || {
                let events = scanner.scan();
                (scanner, events)
            })
            .await;
            let Ok((next, events)) = scanned else {
                warn!("resource directory scan panicked; stopping the file source");
                return;
            };
            scanner = next;
            let initial = !synced && scanner.listed;
            if initial {
                synced = true;
                debug!(dir = %scanner.dir.display(), "resource directory read: Services and EndpointSlices synced");
            }
            let sources = [SourceId::Services, SourceId::EndpointSlices];
            let done = sources
                .into_iter()
                .filter(|_| initial)
                .map(ProxyEvent::SourceSynced);
            for ev in events.into_iter().chain(done) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Identity of an object: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ObjectKey {
    Service(ServiceKey),
    Slice(String, String),
}

/// An object read from a file.
#[derive(Debug, Clone, PartialEq)]
enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
}

impl Object {
    fn upsert(&self) -> ProxyEvent {
        match self {
            Self::Service(s) => ProxyEvent::ServiceUpsert(s.clone()),
            Self::Slice(s) => ProxyEvent::SliceUpsert(s.clone()),
        }
    }
}

impl ObjectKey {
    fn delete(&self) -> ProxyEvent {
        match self {
            Self::Service(k) => ProxyEvent::ServiceDelete(k.clone()),
            Self::Slice(ns, name) => ProxyEvent::SliceDelete(ns.clone(), name.clone()),
        }
    }
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    objects: BTreeMap<ObjectKey, Object>,
}

/// The polling state: each file's objects and what was last sent.
#[derive(Debug)]
pub(crate) struct Scanner {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    sent: BTreeMap<ObjectKey, Object>,
    /// A scan could list the directory (or see that it does not exist).
    pub(crate) listed: bool,
}

impl Scanner {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            sent: BTreeMap::new(),
            listed: false,
        }
    }

    /// One pass over the directory: the events that bring the receiver from
    /// what was sent to what the files now hold.
    pub(crate) fn scan(&mut self) -> Vec<ProxyEvent> {
        let listing = match list(&self.dir) {
            Ok(l) => l,
            Err(error) => {
                warn!(dir = %self.dir.display(), error = %chain(&error), "cannot list the resource directory");
                return Vec::new();
            }
        };
        self.listed = true;
        let mut changed = false;
        self.files.retain(|path, _| {
            let keep = listing.contains_key(path);
            changed |= !keep;
            keep
        });
        for (path, stamp) in listing {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => match parse(&text) {
                    Ok(objects) => {
                        debug!(file = %path.display(), objects = objects.len(), "resource file read");
                        self.files.insert(path, FileState { stamp, objects });
                        changed = true;
                    }
                    Err(error) => {
                        warn!(file = %path.display(), error = %chain(&error), "cannot parse resource file; keeping its previous objects");
                        let state = self.files.entry(path).or_insert_with(|| FileState {
                            stamp,
                            objects: BTreeMap::new(),
                        });
                        state.stamp = stamp;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    changed |= self.files.remove(&path).is_some();
                }
                Err(error) => {
                    warn!(file = %path.display(), error = %chain(&error), "cannot read resource file")
                }
            }
        }
        if changed {
            self.diff()
        } else {
            Vec::new()
        }
    }

    /// Events from `sent` to the union of the files' objects (for an object
    /// in several files, the last file by name wins), then record it as sent.
    fn diff(&mut self) -> Vec<ProxyEvent> {
        let mut now: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        for f in self.files.values() {
            now.extend(f.objects.iter().map(|(k, o)| (k.clone(), o.clone())));
        }
        let mut events: Vec<ProxyEvent> = self
            .sent
            .keys()
            .filter(|k| !now.contains_key(*k))
            .map(ObjectKey::delete)
            .collect();
        events.extend(
            now.iter()
                .filter(|(k, o)| self.sent.get(*k) != Some(*o))
                .map(|(_, o)| o.upsert()),
        );
        self.sent = now;
        events
    }
}

/// The YAML files of `dir` with their stamps; a missing directory is empty.
fn list(dir: &Path) -> io::Result<BTreeMap<PathBuf, Stamp>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut out = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        // Follows symlinks; a file removed meanwhile is simply not listed.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        };
        out.insert(entry.path(), stamp);
    }
    Ok(out)
}

/// The Services and EndpointSlices of a multi-document YAML text (also
/// inside `kind: List` items), by identity; other kinds are ignored. Any
/// invalid document rejects the whole text.
fn parse(text: &str) -> Result<BTreeMap<ObjectKey, Object>, yaml::Error> {
    let objects = yaml::objects(text)?;
    let mut out = BTreeMap::new();
    for mut svc in objects.services {
        svc.metadata.managed_fields = None;
        out.insert(
            ObjectKey::Service(ServiceKey::of(&svc.metadata)),
            Object::Service(Box::new(svc)),
        );
    }
    for mut slice in objects.slices {
        slice.metadata.managed_fields = None;
        let meta = &slice.metadata;
        let key = ObjectKey::Slice(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        out.insert(key, Object::Slice(Box::new(slice)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
