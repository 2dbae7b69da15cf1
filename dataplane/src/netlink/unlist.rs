//! Deleting a link without waiting out the kernel's tail.
//!
//! An `RTM_DELLINK` request returns only when the kernel is done with the
//! device: after unlisting it, it waits for RCU callbacks (`rcu_barrier`)
//! and for the last references before it frees it, most of the ~20 ms a
//! veth delete costs. The device is gone for everyone well before that: the
//! kernel closes and unlists it (both ends of a veth pair, in one batch under
//! the RTNL lock), removes its addresses and routes, and then sends the
//! `RTM_DELLINK` notification to the namespace's `RTNLGRP_LINK` listeners.
//! [`Netlink::delete_link_detached`] sends the request on a thread of its
//! own and returns at that notification, so a caller can do work that only
//! needs the device gone (a CNI DEL releasing its addresses) while the
//! kernel finishes; [`Deletion::wait`] then gives the request's outcome.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};

use super::{deleted, Netlink};
use crate::error::{Error, Result};
use crate::netns::NetNs;

/// The rtnetlink multicast group of link notifications.
const RTNLGRP_LINK: u32 = 1;

/// How long [`Netlink::delete_link_detached`] waits for the notification
/// before it waits for the request instead (the request always ends: it
/// runs inside the kernel's `sendmsg`).
const UNLIST_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket subscribed to the link notifications of one namespace.
#[derive(Debug)]
pub struct LinkWatch {
    socket: Socket,
    netns: PathBuf,
}

impl LinkWatch {
    /// Subscribes in `ns` (entered on this thread for the socket's creation).
    pub fn open_in(ns: &NetNs) -> Result<LinkWatch> {
        ns.run(|| LinkWatch::open_here(ns.path()))?
    }

    /// Subscribes in the calling thread's current namespace.
    pub fn open_here(netns: &Path) -> Result<LinkWatch> {
        let socket_error = |source| Error::Socket {
            netns: netns.to_path_buf(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(socket_error)?;
        socket.bind_auto().map_err(socket_error)?;
        socket.add_membership(RTNLGRP_LINK).map_err(socket_error)?;
        socket.set_non_blocking(true).map_err(socket_error)?;
        Ok(LinkWatch {
            socket,
            netns: netns.to_path_buf(),
        })
    }

    /// Reads every queued notification; whether one was `RTM_DELLINK` of
    /// `index`. An overrun (`ENOBUFS`: notifications were dropped) is read
    /// past: the caller then learns the outcome from the request itself.
    fn saw_deleted(&self, index: u32, rx: &mut Vec<u8>) -> bool {
        loop {
            rx.clear();
            match self.socket.recv(rx, 0) {
                Ok(_) if is_dellink_of(rx, index) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => return false,
            }
        }
    }
}

/// Whether the datagram `rx` holds an `RTM_DELLINK` of `index`.
fn is_dellink_of(rx: &[u8], index: u32) -> bool {
    let mut offset = 0;
    while offset < rx.len() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[offset..]) else {
            return false;
        };
        let len = msg.header.length as usize;
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) = &msg.payload {
            if link.header.index == index {
                return true;
            }
        }
        if len == 0 {
            return false;
        }
        offset += (len + 3) & !3;
    }
    false
}

/// A link delete running on its own thread.
#[derive(Debug)]
pub struct Deletion {
    /// Whether the kernel has unlisted the link (its notification arrived):
    /// its addresses and routes are gone and its name is free. `false` when
    /// the request ended first (an error, a link already gone).
    pub unlisted: bool,
    done: mpsc::Receiver<Result<bool>>,
    thread: JoinHandle<()>,
}

impl Deletion {
    /// Waits for the request's end: `Ok(true)` when it deleted the link,
    /// `Ok(false)` when there was no such link.
    pub fn wait(self) -> Result<bool> {
        let outcome = self.done.recv();
        let _ = self.thread.join();
        outcome.unwrap_or_else(|_| {
            Err(Error::Netlink {
                what: "delete link".to_string(),
                source: io::Error::other("the deleting thread ended without an answer"),
            })
        })
    }
}

impl Netlink {
    /// Deletes link `index` of this socket's namespace (both ends of a veth
    /// pair) on a thread of its own, and returns once `watch` (subscribed in
    /// the same namespace before the call) saw the kernel unlist it, or once
    /// the request ended, whichever is first. See the [module](self).
    pub fn delete_link_detached(self, index: u32, watch: &LinkWatch) -> Result<Deletion> {
        let spawn_error = |source| Error::Socket {
            netns: watch.netns.clone(),
            source,
        };
        let (mut woken, mut wake) = UnixStream::pair().map_err(spawn_error)?;
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("dellink".to_string())
            .spawn(move || {
                tracing::debug!(link = index, "delete link");
                let result = self.block_on(self.handle.link().del(index).execute());
                let _ = tx.send(deleted(result, || format!("delete link #{index}")));
                let _ = wake.write_all(&[1]);
            })
            .map_err(spawn_error)?;
        let unlisted = wait_unlisted(watch, index, &mut woken);
        Ok(Deletion {
            unlisted,
            done,
            thread,
        })
    }
}

/// Polls the watch and the thread's wake-up socket until the link's
/// notification (`true`) or the request's end (`false`).
fn wait_unlisted(watch: &LinkWatch, index: u32, woken: &mut UnixStream) -> bool {
    let deadline = Instant::now() + UNLIST_TIMEOUT;
    let mut rx = Vec::with_capacity(16 * 1024);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [
            PollFd::new(watch.socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(woken.as_fd(), PollFlags::POLLIN),
        ];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let (notified, ended) = (ready(&fds[0]), ready(&fds[1]));
        if notified && watch.saw_deleted(index, &mut rx) {
            return true;
        }
        if ended {
            let _ = woken.read(&mut [0u8; 1]);
            // The notification precedes the answer: look once more.
            return watch.saw_deleted(index, &mut rx);
        }
    }
}
