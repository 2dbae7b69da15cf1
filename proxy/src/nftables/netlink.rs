//! Element-only syncs over netlink: one nfnetlink batch of
//! `NFT_MSG_DELSETELEM` then `NFT_MSG_NEWSETELEM` messages, committed by the
//! kernel all or nothing, like an `nft -f` file.
//!
//! Why not `nft -f` for these: nft 1.0.6 lists every chain and set of the
//! ruleset before it runs a `delete element` (at 10k services that listing
//! is about 50 ms of CPU, the whole cost of a one-endpoint change), and each
//! run starts a process. An endpoint change is element operations only, so
//! they go to the kernel directly, encoded here as nft encodes them: the
//! set's name, and per element its key and data, each field of a
//! concatenation padded to 4 bytes, network byte order except the numgen
//! slots (host byte order, as `numgen` writes its register). Everything
//! else (chains, rules, sets) still goes through `nft -f`.
//!
//! Libraries weighed: `rustables` is GPL-3.0, `nftnl`/`mnl` bind the C
//! libnftnl/libmnl; the socket is `netlink-sys` (rust-netlink, already in
//! the tree under rtnetlink) and the handful of attributes is written here.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::ir::{Key, Value, Verdict};
use super::plan::TABLE;
use crate::error::{Error, Result};
use crate::model::Protocol;

pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 16;
pub(super) const NFNL_MSG_BATCH_END: u16 = 17;
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(super) const NFT_MSG_DELSETELEM: u16 = 14;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
pub(super) const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
pub(super) const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// Element operations on one set or map of Tabby's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOp {
    /// Delete (else add).
    pub delete: bool,
    /// The set or map.
    pub set: &'static str,
    /// Keys, with their data for map additions.
    pub elements: Vec<(Key, Option<Value>)>,
}

/// A transaction of element operations only, in order (deletions first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftBatch {
    /// The operations.
    pub ops: Vec<SetOp>,
}

pub(super) fn proto_byte(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn push_addr(out: &mut Vec<u8>, a: Ipv4Addr) {
    out.extend_from_slice(&a.octets());
}

/// A field shorter than a register, zero-padded to 4 bytes.
pub(super) fn push_padded(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
    out.resize(out.len() + (4 - bytes.len() % 4) % 4, 0);
}

/// The key as the kernel stores it.
fn key_bytes(k: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    match k {
        Key::Addr(a) => push_addr(&mut out, *a),
        Key::AddrProtoPort(a, p, port) => {
            push_addr(&mut out, *a);
            push_padded(&mut out, &[proto_byte(*p)]);
            push_padded(&mut out, &port.to_be_bytes());
        }
        Key::ProtoPort(p, port) => {
            push_padded(&mut out, &[proto_byte(*p)]);
            push_padded(&mut out, &port.to_be_bytes());
        }
        Key::AddrAddr(a, b) => {
            push_addr(&mut out, *a);
            push_addr(&mut out, *b);
        }
        Key::Slot(n) => out.extend_from_slice(&n.to_ne_bytes()),
    }
    out
}

/// The verdict code and chain, or `None` for verdicts a map cannot hold.
pub(super) fn verdict(v: &Verdict) -> Option<(i32, Option<&str>)> {
    Some(match v {
        Verdict::Jump(c) => (NFT_JUMP, Some(c)),
        Verdict::Goto(c) => (NFT_GOTO, Some(c)),
        Verdict::Return => (NFT_RETURN, None),
        Verdict::Accept => (NF_ACCEPT, None),
        Verdict::Drop => (NF_DROP, None),
        Verdict::Reject | Verdict::RejectTcpReset => return None,
    })
}

/// Netlink messages, built in one buffer.
#[derive(Default)]
pub(super) struct Writer {
    pub(super) buf: Vec<u8>,
}

impl Writer {
    pub(super) fn align(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    /// One message: header, `nfgenmsg`, then what `body` writes.
    pub(super) fn msg(
        &mut self,
        ty: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
        body: impl FnOnce(&mut Self) -> Option<()>,
    ) -> Option<()> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        body(self)?;
        let len = u32::try_from(self.buf.len() - start).ok()?;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        Some(())
    }

    pub(super) fn attr(&mut self, ty: u16, data: &[u8]) -> Option<()> {
        let len = u16::try_from(4 + data.len()).ok()?;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.align();
        Some(())
    }

    pub(super) fn str_attr(&mut self, ty: u16, s: &str) -> Option<()> {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data)
    }

    pub(super) fn nest(
        &mut self,
        ty: u16,
        body: impl FnOnce(&mut Self) -> Option<()>,
    ) -> Option<()> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 2]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        body(self)?;
        let len = u16::try_from(self.buf.len() - start).ok()?;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        Some(())
    }

    pub(super) fn element(&mut self, key: &Key, value: Option<&Value>) -> Option<()> {
        self.nest(NFTA_LIST_ELEM, |w| {
            w.nest(NFTA_SET_ELEM_KEY, |w| {
                w.attr(NFTA_DATA_VALUE, &key_bytes(key))
            })?;
            match value {
                None => Some(()),
                Some(Value::Target(t)) => w.nest(NFTA_SET_ELEM_DATA, |w| {
                    let mut data = t.ip().octets().to_vec();
                    push_padded(&mut data, &t.port().to_be_bytes());
                    w.attr(NFTA_DATA_VALUE, &data)
                }),
                Some(Value::Verdict(v)) => {
                    let (code, chain) = verdict(v)?;
                    w.nest(NFTA_SET_ELEM_DATA, |w| {
                        w.nest(NFTA_DATA_VERDICT, |w| {
                            w.attr(NFTA_VERDICT_CODE, &code.to_be_bytes())?;
                            chain.map_or(Some(()), |c| w.str_attr(NFTA_VERDICT_CHAIN, c))
                        })
                    })
                }
            }
        })
    }
}

impl NftBatch {
    /// The batch as netlink messages with sequence numbers from `seq`, and
    /// the number of messages the kernel acknowledges; `None` when an
    /// element cannot be encoded (the caller applies the text instead).
    fn encode(&self, seq: u32) -> Option<(Vec<u8>, u32)> {
        let mut w = Writer::default();
        let res = NFNL_SUBSYS_NFTABLES;
        w.msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, res, |_| {
            Some(())
        })?;
        let mut n = 0u32;
        for op in self.ops.iter().filter(|op| !op.elements.is_empty()) {
            let (ty, flags) = match op.delete {
                true => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
                false => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
            };
            n += 1;
            w.msg(
                (NFNL_SUBSYS_NFTABLES << 8) | ty,
                flags,
                seq.wrapping_add(n),
                NFPROTO_IPV4,
                0,
                |w| {
                    w.str_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE)?;
                    w.str_attr(NFTA_SET_ELEM_LIST_SET, op.set)?;
                    w.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |w| {
                        op.elements
                            .iter()
                            .try_for_each(|(k, v)| w.element(k, v.as_ref()))
                    })
                },
            )?;
        }
        w.msg(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq.wrapping_add(n + 1),
            0,
            res,
            |_| Some(()),
        )?;
        Some((w.buf, n))
    }

    /// The set an acknowledged sequence number belongs to.
    fn set_of(&self, first: u32, seq: u32) -> &str {
        let i = seq.wrapping_sub(first).wrapping_sub(1) as usize;
        self.ops
            .iter()
            .filter(|op| !op.elements.is_empty())
            .nth(i)
            .map_or("?", |op| op.set)
    }
}

/// A netfilter netlink socket in one network namespace.
#[derive(Debug)]
pub struct NlSocket {
    sock: Socket,
    seq: u32,
}

pub(super) fn nl_error(what: &str, source: io::Error) -> Error {
    Error::Io {
        what: format!("nftables netlink: {what}"),
        source,
    }
}

impl NlSocket {
    /// A socket in the current namespace, or in the one at `netns`.
    pub fn open(netns: Option<&Path>) -> Result<Self> {
        let open = || -> io::Result<Socket> {
            let mut s = Socket::new(NETLINK_NETFILTER)?;
            s.bind_auto()?;
            s.connect(&SocketAddr::new(0, 0))?;
            s.set_cap_ack(true)?;
            Ok(s)
        };
        let sock = match netns {
            None => open(),
            Some(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| nl_error(&format!("open {}", path.display()), e))?;
                std::thread::scope(|s| {
                    s.spawn(|| {
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(io::Error::from)?;
                        open()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("socket thread panicked")))
                })
            }
        }
        .map_err(|e| nl_error("socket", e))?;
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos());
        Ok(Self { sock, seq })
    }

    /// Applies a whole-table rewrite as one transaction (see `rewrite.rs`).
    pub fn apply_rewrite(&mut self, rw: &super::NftRewrite) -> Result<()> {
        super::rewrite::send(&self.sock, rw)
    }

    /// Applies `batch` as one transaction. `Ok(false)`: it holds an element
    /// netlink cannot carry; nothing was sent.
    pub fn apply(&mut self, batch: &NftBatch) -> Result<bool> {
        let first = self.seq;
        let Some((buf, expected)) = batch.encode(first) else {
            return Ok(false);
        };
        self.seq = first.wrapping_add(expected + 2);
        self.sock.send(&buf, 0).map_err(|e| nl_error("send", e))?;
        // The kernel runs the batch inside send(): every acknowledgement is queued by now.
        let mut acks = 0;
        let mut rx = Vec::with_capacity(16 * 1024);
        while acks < expected {
            rx.clear();
            let n = self
                .sock
                .recv(&mut rx, libc::MSG_DONTWAIT)
                .map_err(|e| nl_error(&format!("{acks} of {expected} acknowledgements"), e))?;
            let mut at = 0;
            while at + 20 <= n.min(rx.len()) {
                let word =
                    |o: usize| u32::from_ne_bytes(rx[o..o + 4].try_into().unwrap_or_default());
                let len = word(at) as usize;
                let ty = u16::from_ne_bytes([rx[at + 4], rx[at + 5]]);
                if ty == NLMSG_ERROR {
                    let code = word(at + 16) as i32;
                    let seq = word(at + 28.min(len.saturating_sub(4)));
                    acks += 1;
                    if code != 0 {
                        let set = batch.set_of(first, seq);
                        return Err(nl_error(
                            &format!("set {set}"),
                            io::Error::from_raw_os_error(-code),
                        ));
                    }
                }
                if len < 16 {
                    break;
                }
                at += len.next_multiple_of(4);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_laid_out_as_nft_lays_out_concatenations() {
        let ip: Ipv4Addr = "10.96.0.1".parse().unwrap();
        assert_eq!(
            key_bytes(&Key::AddrProtoPort(ip, Protocol::Tcp, 80)),
            [10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]
        );
        assert_eq!(
            key_bytes(&Key::ProtoPort(Protocol::Udp, 30053)),
            [17, 0, 0, 0, 0x75, 0x65, 0, 0]
        );
        assert_eq!(key_bytes(&Key::Slot(7)), 7u32.to_ne_bytes());
    }

    #[test]
    fn a_batch_is_framed_by_begin_and_end_and_rejects_what_a_map_cannot_hold() {
        let ok = NftBatch {
            ops: vec![SetOp {
                delete: true,
                set: "hairpin",
                elements: vec![(
                    Key::AddrAddr([10, 0, 0, 1].into(), [10, 0, 0, 1].into()),
                    None,
                )],
            }],
        };
        let (buf, n) = ok.encode(100).unwrap();
        assert_eq!(n, 1);
        let first_len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(first_len, 20, "batch begin: header and nfgenmsg");
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(ok.set_of(100, 101), "hairpin");
        let bad = NftBatch {
            ops: vec![SetOp {
                delete: false,
                set: "service-ips",
                elements: vec![(
                    Key::Addr([10, 0, 0, 1].into()),
                    Some(Value::Verdict(Verdict::Reject)),
                )],
            }],
        };
        assert!(bad.encode(1).is_none());
    }
}
