//! Many route changes in few system calls.
//!
//! rtnetlink sends one request per route and waits for its answer through
//! an async connection. For tens of thousands of learned routes (a BGP table)
//! that round trip, not the kernel's work, is what costs. The kernel takes
//! many netlink messages in one datagram and answers each with an ACK that
//! carries its sequence number, so [`RouteBatch`] writes whole batches with
//! one `send` on a plain blocking socket and then reads the ACKs. rtnetlink
//! has no such batch API; the messages themselves are built by the same
//! [`Route::to_message`] and the library's types (netlink-packet-*), only
//! the framing of a batch is done here.
//!
//! Every read of the ACKs has a deadline ([`ACK_TIMEOUT`] by default): an
//! ACK that never comes (dropped on a full receive buffer, or a peer that
//! does not answer) fails the routes still waiting with `ETIMEDOUT` instead
//! of blocking the caller forever. A late ACK carries a sequence number no
//! later batch uses, so it is skipped.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};

use super::route::Route;
use crate::error::{Error, Result};

/// Messages per datagram: large enough to amortize the system calls, small
/// enough that the ACKs (36 bytes each with `NETLINK_CAP_ACK`) fit the
/// socket's receive buffer.
const BATCH: usize = 512;

/// How long [`RouteBatch::apply`] waits for the ACKs of one datagram.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A blocking netlink socket for batches of route changes, in the network
/// namespace of the thread that opened it.
pub struct RouteBatch {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    ack_timeout: Duration,
}

impl RouteBatch {
    /// Opens the socket in the current thread's network namespace.
    pub fn open() -> Result<Self> {
        let sock_err = |e: io::Error| Error::Socket {
            netns: "/proc/thread-self/ns/net".into(),
            source: e,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(sock_err)?;
        socket.bind_auto().map_err(sock_err)?;
        // Errors then echo only the header, not the whole request.
        socket.set_cap_ack(true).map_err(sock_err)?;
        socket.set_rx_buf_sz(1 << 20).map_err(sock_err)?;
        let mut batch = Self {
            socket,
            seq: 0,
            buf: Vec::new(),
            ack_timeout: ACK_TIMEOUT,
        };
        batch.set_ack_timeout(ACK_TIMEOUT).map_err(sock_err)?;
        Ok(batch)
    }

    /// Changes how long one datagram's ACKs are waited for.
    pub fn set_ack_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        nix::sys::socket::setsockopt(&self.socket, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(io::Error::from)?;
        self.ack_timeout = timeout;
        Ok(())
    }

    /// Sends every later batch to the netlink socket with port id `port`
    /// instead of the kernel: a user-space netlink peer (a test peer that
    /// drops ACKs, say) answers instead.
    pub fn connect_to(&mut self, port: u32) -> io::Result<()> {
        self.socket
            .connect(&rtnetlink::sys::SocketAddr::new(port, 0))
    }

    /// The port id of this socket (where answers are sent).
    pub fn port(&self) -> io::Result<u32> {
        let mut addr = rtnetlink::sys::SocketAddr::new(0, 0);
        self.socket.get_address(&mut addr)?;
        Ok(addr.port_number())
    }

    /// Deletes `delete`, then replaces (adds or changes) `replace`; returns
    /// the routes the kernel refused, with its errors. Deleting a route that
    /// is already gone is not an error.
    pub fn apply(&mut self, delete: &[Route], replace: &[Route]) -> Vec<(Route, Error)> {
        let mut failed = Vec::new();
        for chunk in delete.chunks(BATCH) {
            failed.extend(self.send_chunk(chunk, Op::Delete));
        }
        for chunk in replace.chunks(BATCH) {
            failed.extend(self.send_chunk(chunk, Op::Replace));
        }
        failed
    }

    fn send_chunk(&mut self, routes: &[Route], op: Op) -> Vec<(Route, Error)> {
        let mut failed = Vec::new();
        let pending = self.frame(routes, op, &mut failed);
        if pending.is_empty() {
            return failed;
        }
        if let Err(e) = self.socket.send(&self.buf, 0) {
            failed.extend(
                pending
                    .values()
                    .map(|r| ((*r).clone(), io_error(op, r, same_errno(&e)))),
            );
            return failed;
        }
        self.read_acks(pending, op, &mut failed);
        failed
    }

    /// Serializes one request per route into `self.buf`; returns them by
    /// sequence number. Routes that cannot be encoded go to `failed`.
    fn frame<'r>(
        &mut self,
        routes: &'r [Route],
        op: Op,
        failed: &mut Vec<(Route, Error)>,
    ) -> HashMap<u32, &'r Route> {
        let mut pending = HashMap::with_capacity(routes.len());
        self.buf.clear();
        for route in routes {
            let built = match op {
                Op::Delete => route.to_delete_message().map(RouteNetlinkMessage::DelRoute),
                Op::Replace => route.to_message().map(RouteNetlinkMessage::NewRoute),
            };
            let inner = match built {
                Ok(m) => m,
                Err(e) => {
                    failed.push((route.clone(), e));
                    continue;
                }
            };
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST
                | NLM_F_ACK
                | if op == Op::Replace {
                    NLM_F_CREATE | NLM_F_REPLACE
                } else {
                    0
                };
            header.sequence_number = self.seq;
            let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
            msg.finalize();
            let start = self.buf.len();
            self.buf.resize(start + msg.buffer_len(), 0);
            msg.serialize(&mut self.buf[start..]);
            pending.insert(self.seq, route);
        }
        pending
    }

    /// Reads ACKs until every pending request has one, a read fails, or
    /// the ACK timeout passes; routes left without an ACK go to `failed`.
    fn read_acks(
        &mut self,
        mut pending: HashMap<u32, &Route>,
        op: Op,
        failed: &mut Vec<(Route, Error)>,
    ) {
        let deadline = Instant::now() + self.ack_timeout;
        let mut rx = Vec::with_capacity(64 * 1024);
        while !pending.is_empty() {
            rx.clear();
            let read = match self.socket.recv(&mut rx, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(timed_out()),
                other => other,
            };
            if let Err(e) = read {
                failed.extend(
                    pending
                        .drain()
                        .map(|(_, r)| (r.clone(), io_error(op, r, same_errno(&e)))),
                );
                break;
            }
            for (seq, code) in acks(&rx) {
                let Some(route) = pending.remove(&seq) else {
                    continue; // a late ACK of an earlier batch
                };
                let gone = op == Op::Delete && code == Some(libc::ESRCH);
                if let (Some(errno), false) = (code, gone) {
                    failed.push((
                        route.clone(),
                        io_error(op, route, io::Error::from_raw_os_error(errno)),
                    ));
                }
            }
            if Instant::now() >= deadline && !pending.is_empty() {
                // ACKs of other requests keep coming, but not ours.
                let e = timed_out();
                failed.extend(
                    pending
                        .drain()
                        .map(|(_, r)| (r.clone(), io_error(op, r, same_errno(&e)))),
                );
            }
        }
    }
}

/// The ACKs in one datagram: (sequence number, errno if the request failed).
fn acks(rx: &[u8]) -> Vec<(u32, Option<i32>)> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < rx.len() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[offset..]) else {
            break;
        };
        let len = msg.header.length as usize;
        if let NetlinkPayload::Error(ack) = &msg.payload {
            out.push((msg.header.sequence_number, ack.code.map(|c| -c.get())));
        }
        if len == 0 {
            break;
        }
        offset += (len + 3) & !3;
    }
    out
}

fn timed_out() -> io::Error {
    io::Error::from_raw_os_error(libc::ETIMEDOUT)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Delete,
    Replace,
}

/// A copy of a socket error for each route it failed.
fn same_errno(e: &io::Error) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
}

fn io_error(op: Op, route: &Route, source: io::Error) -> Error {
    let what = match op {
        Op::Delete => format!("delete route \"{route}\""),
        Op::Replace => format!("replace route \"{route}\""),
    };
    if source.raw_os_error() == Some(libc::EEXIST) {
        Error::Exists { what }
    } else {
        Error::Netlink { what, source }
    }
}
