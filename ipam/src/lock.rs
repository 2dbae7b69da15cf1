//! The node lock of [`crate::Datastore::node_lock`]: it serializes one
//! node's assigns and releases with the GC and repairs of that node, so a GC
//! never sees an ADD between its allocation and its interfaces, and a
//! handle repair never sees a writer between its handle and its block write
//! (conflicts between nodes are settled by compare-and-swap, not by locks).
//!
//! Every writer of one node's attachments runs on that node (its plugin, its
//! GC, `tabbyctl ipam check --fix` for the local node), so a host-local
//! `flock` is a correct lock for every backend: the kernel releases it when
//! its holder dies, also when it is SIGKILLed, which no lease in a remote
//! store does. The file backend keeps it beside its documents; the
//! Kubernetes backend in [`HOST_LOCK_DIR`]; the memory backend, which one
//! process owns, in an in-process table ([`ProcessLocks`]).

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};

use crate::datastore::{DatastoreError, Result};

/// Where backends without a directory of their own keep their host-local
/// node locks (tmpfs: no lock file outlives a reboot).
pub const HOST_LOCK_DIR: &str = "/run/tabby";

/// A held node lock; released when dropped (or when its process dies).
pub struct NodeLock(Held);

enum Held {
    Host(#[allow(dead_code)] Flock<File>),
    Process(ProcessGuard),
}

impl fmt::Debug for NodeLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Held::Host(_) => f.write_str("NodeLock(flock)"),
            Held::Process(guard) => write!(f, "NodeLock(in-process {})", guard.node),
        }
    }
}

impl NodeLock {
    /// Takes an exclusive `flock` on `path`, creating the file and its
    /// directory if needed; waits while another process holds it.
    pub fn host(path: &Path) -> Result<Self> {
        let unavailable = |source: io::Error| DatastoreError::Unavailable {
            location: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(unavailable)?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| unavailable(io::Error::from(errno)))?;
        Ok(Self(Held::Host(lock)))
    }
}

/// Node locks of one process (the memory backend's): a set of held node
/// names and a condition variable to wait on.
#[derive(Debug, Default, Clone)]
pub struct ProcessLocks(Arc<(Mutex<HashSet<String>>, Condvar)>);

impl ProcessLocks {
    /// Takes the lock of `node`; waits while another thread holds it.
    pub fn lock(&self, node: &str) -> NodeLock {
        let (held, freed) = &*self.0;
        let mut held = relock(held.lock());
        while held.contains(node) {
            held = relock(freed.wait(held));
        }
        held.insert(node.to_string());
        NodeLock(Held::Process(ProcessGuard {
            locks: self.clone(),
            node: node.to_string(),
        }))
    }
}

/// A panicking holder must not lock the others out: its guard still frees
/// its node on unwind, so the set itself stays right.
fn relock<'a, T>(
    r: std::result::Result<MutexGuard<'a, T>, std::sync::PoisonError<MutexGuard<'a, T>>>,
) -> MutexGuard<'a, T> {
    r.unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct ProcessGuard {
    locks: ProcessLocks,
    node: String,
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let (held, freed) = &*self.locks.0;
        relock(held.lock()).remove(&self.node);
        freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_process_lock_excludes_the_same_node_only() {
        let locks = ProcessLocks::default();
        let a = locks.lock("a");
        let _b = locks.lock("b");
        let released = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (locks, released) = (locks.clone(), released.clone());
            std::thread::spawn(move || {
                let _a = locks.lock("a");
                assert!(released.load(Ordering::SeqCst), "took a held lock");
            })
        };
        // Give the waiter a chance to take the lock wrongly before it is free.
        std::thread::sleep(Duration::from_millis(50));
        released.store(true, Ordering::SeqCst);
        drop(a);
        waiter.join().expect("waiter");
    }

    #[test]
    fn a_host_lock_excludes_another_open_of_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/ipam-a.lock");
        let held = NodeLock::host(&path).expect("lock");
        let file = File::open(&path).expect("open");
        let again = Flock::lock(file, FlockArg::LockExclusiveNonblock);
        assert!(again.is_err(), "a second flock succeeded while held");
        drop(held);
        let file = File::open(&path).expect("open");
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok());
    }
}
