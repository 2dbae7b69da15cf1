//! A synchronous facade over rtnetlink.
//!
//! The CNI plugin is a short-lived synchronous process, so [`Netlink`] owns a
//! tokio current-thread runtime and one rtnetlink connection and blocks on each
//! request. Create one `Netlink` per namespace and reuse it: a CNI ADD makes
//! about eight requests over the same socket.
//!
//! A `Netlink` opened with [`Netlink::in_netns`] acts in that namespace from
//! any thread, without `setns`, because a netlink socket belongs to the
//! namespace it was created in.
//!
//! Its methods block: do not call them from inside an async runtime (use
//! `tokio::task::spawn_blocking` there).

mod addr;
mod batch;
mod link;
mod neigh;
mod route;
mod tunnel;
mod unlist;

use std::future::Future;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use tokio::runtime::{Builder, Runtime};

use crate::error::{Error, Result};
use crate::netns::NetNs;

pub use batch::RouteBatch;
pub use link::Link;
pub use neigh::{FdbEntry, Neighbour};
pub use route::{Family, Route, RouteKind, Scope, RTPROT_BOOT, RT_TABLE_MAIN};
pub use tunnel::VxlanSpec;
pub use unlist::{Deletion, LinkWatch};

/// How the namespace of a socket opened by [`Netlink::host`] is named in
/// error messages.
const CURRENT_NETNS: &str = "/proc/thread-self/ns/net";

/// An rtnetlink socket bound to one network namespace, with blocking methods.
#[derive(Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    netns: PathBuf,
    // Declared last so it is dropped last: dropping it stops the connection task.
    runtime: Runtime,
}

impl Netlink {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn host() -> Result<Netlink> {
        Netlink::connect(Path::new(CURRENT_NETNS))
    }

    /// Opens a socket inside `ns`: enters it on this thread, opens the socket
    /// and comes back. Every later call acts in `ns`.
    pub fn in_netns(ns: &NetNs) -> Result<Netlink> {
        let _restore = ns.enter()?;
        Netlink::connect(ns.path())
    }

    /// The namespace this socket was opened in, as given to [`Netlink::in_netns`].
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    fn connect(netns: &Path) -> Result<Netlink> {
        let socket_error = |source| Error::Socket {
            netns: netns.to_path_buf(),
            source,
        };
        let runtime = Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(socket_error)?;
        // The socket registers with the runtime's reactor when it is created.
        let (connection, handle, _) = {
            let _context = runtime.enter();
            rtnetlink::new_connection().map_err(socket_error)?
        };
        runtime.spawn(connection);
        Ok(Netlink {
            handle,
            netns: netns.to_path_buf(),
            runtime,
        })
    }

    /// Runs one request to completion on the owned runtime.
    fn block_on<F: Future>(&self, request: F) -> F::Output {
        self.runtime.block_on(request)
    }

    /// Runs a dump request and collects its answers.
    fn collect<T, S>(&self, dump: S) -> Result<Vec<T>, rtnetlink::Error>
    where
        S: futures::Stream<Item = Result<T, rtnetlink::Error>>,
    {
        self.block_on(dump.try_collect())
    }
}

/// Maps a delete request's outcome: `Ok(true)` when deleted, `Ok(false)` when
/// the object was already gone.
fn deleted(result: Result<(), rtnetlink::Error>, what: impl FnOnce() -> String) -> Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(e) => {
            let err = Error::netlink(what(), e);
            if err.is_not_found() {
                Ok(false)
            } else {
                Err(err)
            }
        }
    }
}
