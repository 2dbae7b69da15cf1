//! Network namespaces: open one by path and run code inside it.
//!
//! `setns(2)` with `CLONE_NEWNET` only moves the calling thread, so
//! [`NetNs::run`] is safe in a multi-threaded process as long as the closure
//! does not hand work to other threads and expect it to run in the namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

use crate::error::{Error, Result};

/// The network namespace of the calling thread (not of the whole process:
/// `/proc/self` names the thread-group leader).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// An open handle on a network namespace.
///
/// Holding the file descriptor keeps the namespace alive even if its
/// `/run/netns` bind mount is removed meanwhile.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the network namespace at `path`, e.g. `/run/netns/cni-1234` or
    /// `/proc/42/ns/net` (the `CNI_NETNS` of a pod).
    ///
    /// Returns [`Error::NetnsNotFound`] when the path does not exist and
    /// [`Error::NotANetns`] when it is not a namespace file.
    pub fn open(path: impl AsRef<Path>) -> Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NetnsNotFound { path })
            }
            Err(source) => return Err(Error::NetnsOpen { path, source }),
        };
        match fstatfs(&file) {
            Ok(fs) if fs.filesystem_type() == NSFS_MAGIC => Ok(NetNs { file, path }),
            Ok(_) => Err(Error::NotANetns { path }),
            Err(errno) => Err(Error::NetnsOpen {
                path,
                source: errno.into(),
            }),
        }
    }

    /// Opens the network namespace of the calling thread.
    pub fn current() -> Result<NetNs> {
        NetNs::open(THREAD_NETNS)
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the
    /// thread back to the namespace it was in, also when `f` panics.
    ///
    /// The shell equivalent is `ip netns exec NAME ...`, but only for this
    /// thread: sockets opened and `/proc/sys/net` files written by `f` belong
    /// to this namespace.
    ///
    /// # Aborts
    ///
    /// If the thread cannot be moved back to its original namespace the
    /// process aborts: carrying on would silently apply later host-side
    /// changes to the wrong namespace. This cannot happen in practice, since
    /// the original namespace is held open and the thread just left it.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let _guard = self.enter()?;
        Ok(f())
    }

    /// Moves the calling thread into this namespace until the returned guard
    /// is dropped.
    pub(crate) fn enter(&self) -> Result<RestoreGuard> {
        let original = NetNs::current()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Setns {
            path: self.path.clone(),
            source,
        })?;
        Ok(RestoreGuard { original })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Moves the thread back into its original namespace on drop.
#[must_use = "the thread goes back to its namespace when the guard is dropped"]
pub(crate) struct RestoreGuard {
    original: NetNs,
}

impl Drop for RestoreGuard {
    fn drop(&mut self) {
        if let Err(errno) = setns(&self.original.file, CloneFlags::CLONE_NEWNET) {
            tracing::error!(
                netns = %self.original.path.display(),
                %errno,
                "cannot restore the thread's network namespace; aborting"
            );
            std::process::abort();
        }
    }
}
