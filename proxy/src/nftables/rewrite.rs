//! Full syncs over netlink: the whole table rewritten in one nfnetlink
//! batch, which the kernel commits all or nothing, like the `nft -f` file
//! of a full sync (`render_full`), which stays the reference (goldens,
//! fallback).
//!
//! Why: at 10k services × 10 endpoints that file is 10.9 MB, and nft 1.0.6
//! spends about 2 s of CPU parsing and evaluating it (two thirds of it on
//! the 220k elements), several times the kernel's own work. Here every
//! chain, rule and element is encoded as nft encodes it (`nft
//! --debug=netlink` shows the expressions), so `nft list table` reads it
//! back exactly as it reads the file's result; the netns tests compare that
//! listing with the plan.
//!
//! The sets and maps themselves (their `typeof` user data is nft's own
//! format) are declared by a short `nft -f` run first: it only creates
//! what is missing, empty and unreferenced, so it changes no packet's fate.
//! The batch then does what the file does: create the planned chains,
//! flush every rule of the table (`NFT_MSG_DELRULE` naming only the table)
//! and the fixed sets and maps, add the rules and elements, and delete the
//! stale chains and affinity sets.

use super::ir::{Chain, Hook, Key, Match, Rule, Stmt, Value, Verdict, VmapKey};
use super::netlink::{
    nl_error, proto_byte, verdict, Writer, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4, NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_LIST_ELEM,
    NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE,
    NFTA_VERDICT_CHAIN, NFTA_VERDICT_CODE, NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM, NLMSG_ERROR,
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};
use super::plan::TABLE;
use crate::error::Result;
use crate::model::Protocol;

const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_DELSET: u16 = 11;
const NLM_F_APPEND: u16 = 0x800;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

const NF_ACCEPT: u32 = 1;
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const REG32_01: u32 = 9;
const REG32_02: u32 = 10;
const NETWORK: u32 = 1;
const TRANSPORT: u32 = 2;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const META_MARK: u32 = 3;
const META_L4PROTO: u32 = 16;
const CT_STATE: u32 = 0;
const CT_STATUS: u32 = 2;
const CT_STATE_NEW: u32 = 8;
const IPS_DST_NAT: u32 = 0x20;
const FIB_F_SADDR: u32 = 1;
const FIB_F_DADDR: u32 = 2;
const FIB_RESULT_ADDRTYPE: u32 = 3;
const RTN_LOCAL: u32 = 2;
const NG_RANDOM: u32 = 1;
const NAT_DNAT: u32 = 1;
const NAT_PROTO_SPECIFIED: u32 = 2;
const NAT_RANDOM_FULLY: u32 = 0x10;
const DYNSET_UPDATE: u32 = 1;
const REJECT_ICMP_UNREACH: u32 = 0;
const REJECT_TCP_RST: u32 = 1;
const ICMP_PORT_UNREACH: u8 = 3;

/// Most bytes of elements in one message: the elements' nest has a 16-bit length.
const ELEMENTS_PER_MESSAGE: usize = 48 * 1024;

/// A whole-table rewrite: the declarations for `nft -f`, then one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftRewrite {
    /// `nft -f` input declaring the table, its sets and maps (creates only
    /// what is missing).
    pub skeleton: String,
    /// The batch: begin (sequence 0), the messages numbered 1..=count, end.
    msgs: Vec<u8>,
    count: u32,
    /// What the messages from each number on do, for error messages.
    labels: Vec<(u32, String)>,
}

impl NftRewrite {
    /// The number of messages in the batch.
    pub fn messages(&self) -> u32 {
        self.count
    }

    fn label(&self, seq: u32) -> &str {
        let i = self.labels.partition_point(|(first, _)| *first <= seq);
        i.checked_sub(1)
            .and_then(|i| self.labels.get(i))
            .map_or("batch", |(_, l)| l.as_str())
    }
}

/// Builds the batch of a rewrite.
pub(super) struct Builder {
    w: Writer,
    count: u32,
    labels: Vec<(u32, String)>,
    /// A message could not be encoded (a verdict a map cannot hold).
    broken: bool,
}

impl Default for Builder {
    /// A batch with its begin message.
    fn default() -> Self {
        let mut w = Writer {
            buf: Vec::with_capacity(1 << 20),
        };
        let res = NFNL_SUBSYS_NFTABLES;
        let _ = w.msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0, res, |_| Some(()));
        Self {
            w,
            count: 0,
            labels: Vec::new(),
            broken: false,
        }
    }
}

fn be(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

impl Builder {
    fn label(&mut self, what: String) {
        self.labels.push((self.count + 1, what));
    }

    fn msg(&mut self, ty: u16, flags: u16, body: impl FnOnce(&mut Writer) -> Option<()>) {
        self.count += 1;
        let start = self.w.buf.len();
        let ok = self.w.msg(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | flags,
            self.count,
            NFPROTO_IPV4,
            0,
            body,
        );
        if ok.is_none() {
            self.w.buf.truncate(start);
            self.count -= 1;
            self.broken = true;
        }
    }

    /// `add chain` (a base chain with its hook, type and policy accept).
    pub(super) fn chain(&mut self, c: &Chain) {
        self.label(format!("chain {}", c.name));
        self.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, |w| {
            w.str_attr(NFTA_CHAIN_TABLE, TABLE)?;
            w.str_attr(NFTA_CHAIN_NAME, &c.name)?;
            if let Some(h) = &c.hook {
                hook(w, h)?;
            }
            Some(())
        });
    }

    /// Every rule of every chain of the table goes (`flush table`).
    pub(super) fn flush_rules(&mut self) {
        self.label("flush of the table's rules".into());
        self.msg(NFT_MSG_DELRULE, 0, |w| w.str_attr(NFTA_RULE_TABLE, TABLE));
    }

    /// `flush set` / `flush map`.
    pub(super) fn flush_set(&mut self, set: &str) {
        self.label(format!("flush of set {set}"));
        self.msg(NFT_MSG_DELSETELEM, 0, |w| {
            w.str_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE)?;
            w.str_attr(NFTA_SET_ELEM_LIST_SET, set)
        });
    }

    /// The rules of `c`, appended.
    pub(super) fn rules(&mut self, c: &Chain) {
        if c.rules.is_empty() {
            return;
        }
        self.label(format!("rules of chain {}", c.name));
        for r in &c.rules {
            self.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |w| {
                w.str_attr(NFTA_RULE_TABLE, TABLE)?;
                w.str_attr(NFTA_RULE_CHAIN, &c.name)?;
                w.nest(NFTA_RULE_EXPRESSIONS, |w| encode_rule(w, r))
            });
        }
    }

    /// Elements of one set, in as many messages as their size needs.
    pub(super) fn elements(&mut self, set: &str, elems: &[(&Key, Option<&Value>)]) {
        if elems.is_empty() {
            return;
        }
        self.label(format!("elements of {set}"));
        let mut rest = elems;
        while !rest.is_empty() {
            let mut size = 0;
            let n = rest
                .iter()
                .take_while(|(_, v)| {
                    size += 48
                        + match v {
                            Some(Value::Verdict(Verdict::Jump(c) | Verdict::Goto(c))) => c.len(),
                            _ => 0,
                        };
                    size <= ELEMENTS_PER_MESSAGE
                })
                .count()
                .max(1);
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            self.msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE, |w| {
                w.str_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE)?;
                w.str_attr(NFTA_SET_ELEM_LIST_SET, set)?;
                w.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |w| {
                    chunk.iter().try_for_each(|(k, v)| w.element(k, *v))
                })
            });
        }
    }

    /// `delete chain` (after the flush nothing references it).
    pub(super) fn delete_chain(&mut self, name: &str) {
        self.label(format!("deletion of chain {name}"));
        self.msg(NFT_MSG_DELCHAIN, 0, |w| {
            w.str_attr(NFTA_CHAIN_TABLE, TABLE)?;
            w.str_attr(NFTA_CHAIN_NAME, name)
        });
    }

    /// `delete set`.
    pub(super) fn delete_set(&mut self, name: &str) {
        self.label(format!("deletion of set {name}"));
        self.msg(NFT_MSG_DELSET, 0, |w| {
            w.str_attr(NFTA_SET_TABLE, TABLE)?;
            w.str_attr(NFTA_SET_NAME, name)
        });
    }

    /// The rewrite, with the last message asking for the acknowledgement
    /// that tells the batch committed; `None` if a message could not be
    /// encoded (the text applies instead).
    pub(super) fn finish(mut self, skeleton: String) -> Option<NftRewrite> {
        if self.broken {
            return None;
        }
        if self.count == 0 {
            self.flush_rules();
        }
        let last = last_message(&self.w.buf);
        if let Some(at) = last {
            let flags = u16::from_ne_bytes([self.w.buf[at + 6], self.w.buf[at + 7]]) | NLM_F_ACK;
            self.w.buf[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
        }
        let res = NFNL_SUBSYS_NFTABLES;
        let end = self.count + 1;
        self.w
            .msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, 0, res, |_| Some(()))?;
        Some(NftRewrite {
            skeleton,
            msgs: self.w.buf,
            count: self.count,
            labels: self.labels,
        })
    }
}

/// The offset of the last message in `buf`.
fn last_message(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    let mut last = None;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().ok()?) as usize;
        if len < 16 {
            return None;
        }
        last = Some(at);
        at += len.next_multiple_of(4);
    }
    last
}

fn hook(w: &mut Writer, h: &Hook) -> Option<()> {
    let num: u32 = match h.hook {
        "prerouting" => 0,
        "input" => 1,
        "forward" => 2,
        "output" => 3,
        "postrouting" => 4,
        _ => return None,
    };
    w.nest(NFTA_CHAIN_HOOK, |w| {
        w.attr(NFTA_HOOK_HOOKNUM, &be(num))?;
        w.attr(NFTA_HOOK_PRIORITY, &h.priority.to_be_bytes())
    })?;
    w.attr(NFTA_CHAIN_POLICY, &be(NF_ACCEPT))?;
    w.str_attr(NFTA_CHAIN_TYPE, h.kind)
}

/// One expression of a rule: `name` and its attributes.
fn expr(w: &mut Writer, name: &str, body: impl FnOnce(&mut Writer) -> Option<()>) -> Option<()> {
    w.nest(NFTA_LIST_ELEM, |w| {
        w.str_attr(NFTA_EXPR_NAME, name)?;
        w.nest(NFTA_EXPR_DATA, body)
    })
}

fn value(w: &mut Writer, ty: u16, bytes: &[u8]) -> Option<()> {
    w.nest(ty, |w| w.attr(NFTA_DATA_VALUE, bytes))
}

/// `payload load LEN @ BASE + OFFSET => reg DREG`.
fn payload(w: &mut Writer, base: u32, offset: u32, len: u32, dreg: u32) -> Option<()> {
    expr(w, "payload", |w| {
        w.attr(1, &be(dreg))?; // NFTA_PAYLOAD_DREG
        w.attr(2, &be(base))?; // NFTA_PAYLOAD_BASE
        w.attr(3, &be(offset))?; // NFTA_PAYLOAD_OFFSET
        w.attr(4, &be(len)) // NFTA_PAYLOAD_LEN
    })
}

/// `cmp OP reg 1 DATA`.
fn cmp(w: &mut Writer, op: u32, data: &[u8]) -> Option<()> {
    expr(w, "cmp", |w| {
        w.attr(1, &be(REG_1))?; // NFTA_CMP_SREG
        w.attr(2, &be(op))?; // NFTA_CMP_OP
        value(w, 3, data) // NFTA_CMP_DATA
    })
}

/// `bitwise reg 1 = ( reg 1 & MASK ) ^ XOR` over 4 bytes.
fn bitwise(w: &mut Writer, mask: [u8; 4], xor: [u8; 4]) -> Option<()> {
    expr(w, "bitwise", |w| {
        w.attr(1, &be(REG_1))?; // NFTA_BITWISE_SREG
        w.attr(2, &be(REG_1))?; // NFTA_BITWISE_DREG
        w.attr(3, &be(4))?; // NFTA_BITWISE_LEN
        value(w, 4, &mask)?; // NFTA_BITWISE_MASK
        value(w, 5, &xor) // NFTA_BITWISE_XOR
    })
}

/// `meta load KEY => reg DREG`.
fn meta(w: &mut Writer, key: u32, dreg: u32) -> Option<()> {
    expr(w, "meta", |w| {
        w.attr(1, &be(dreg))?; // NFTA_META_DREG
        w.attr(2, &be(key)) // NFTA_META_KEY
    })
}

/// `ct load KEY => reg 1`.
fn ct(w: &mut Writer, key: u32) -> Option<()> {
    expr(w, "ct", |w| {
        w.attr(1, &be(REG_1))?; // NFTA_CT_DREG
        w.attr(2, &be(key)) // NFTA_CT_KEY
    })
}

/// `lookup reg 1 set SET [dreg DREG]`.
fn lookup(w: &mut Writer, set: &str, dreg: Option<u32>) -> Option<()> {
    expr(w, "lookup", |w| {
        w.str_attr(1, set)?; // NFTA_LOOKUP_SET
        w.attr(2, &be(REG_1))?; // NFTA_LOOKUP_SREG
        dreg.map_or(Some(()), |d| w.attr(3, &be(d))) // NFTA_LOOKUP_DREG
    })
}

/// `numgen reg 1 = random mod N [offset K]`.
fn numgen(w: &mut Writer, modulus: u32, offset: u32) -> Option<()> {
    expr(w, "numgen", |w| {
        w.attr(1, &be(REG_1))?; // NFTA_NG_DREG
        w.attr(2, &be(modulus))?; // NFTA_NG_MODULUS
        w.attr(3, &be(NG_RANDOM))?; // NFTA_NG_TYPE
        match offset {
            0 => Some(()),
            k => w.attr(4, &be(k)), // NFTA_NG_OFFSET
        }
    })
}

fn fib_local(w: &mut Writer, flag: u32) -> Option<()> {
    expr(w, "fib", |w| {
        w.attr(1, &be(REG_1))?; // NFTA_FIB_DREG
        w.attr(2, &be(FIB_RESULT_ADDRTYPE))?; // NFTA_FIB_RESULT
        w.attr(3, &be(flag)) // NFTA_FIB_FLAGS
    })?;
    cmp(w, CMP_EQ, &RTN_LOCAL.to_ne_bytes())
}

fn l4proto(w: &mut Writer, p: Protocol) -> Option<()> {
    meta(w, META_L4PROTO, REG_1)?;
    cmp(w, CMP_EQ, &[proto_byte(p)])
}

/// `ip saddr`/`ip daddr` (at `offset`) against a network, as nft reduces
/// it: whole bytes of a prefix are compared as they are, others masked.
fn address(w: &mut Writer, offset: u32, negate: bool, net: ipnetwork::Ipv4Network) -> Option<()> {
    let op = if negate { CMP_NEQ } else { CMP_EQ };
    let prefix = u32::from(net.prefix());
    let bytes = net.network().octets();
    if prefix > 0 && prefix % 8 == 0 {
        let n = prefix / 8;
        payload(w, NETWORK, offset, n, REG_1)?;
        return cmp(w, op, &bytes[..n as usize]);
    }
    payload(w, NETWORK, offset, 4, REG_1)?;
    bitwise(w, net.mask().octets(), [0; 4])?;
    cmp(w, op, &bytes)
}

fn encode_match(w: &mut Writer, m: &Match) -> Option<()> {
    match m {
        Match::Saddr { negate, net } => address(w, 12, *negate, *net),
        Match::Daddr { negate, net } => address(w, 16, *negate, *net),
        Match::Dport(p, port) => {
            l4proto(w, *p)?;
            payload(w, TRANSPORT, 2, 2, REG_1)?;
            cmp(w, CMP_EQ, &port.to_be_bytes())
        }
        Match::L4proto(p) => l4proto(w, *p),
        Match::FibSaddrLocal => fib_local(w, FIB_F_SADDR),
        Match::FibDaddrLocal => fib_local(w, FIB_F_DADDR),
        Match::MarkClear(m) => {
            meta(w, META_MARK, REG_1)?;
            bitwise(w, m.to_ne_bytes(), [0; 4])?;
            cmp(w, CMP_EQ, &[0; 4])
        }
        Match::CtStateNew => {
            ct(w, CT_STATE)?;
            bitwise(w, CT_STATE_NEW.to_ne_bytes(), [0; 4])?;
            cmp(w, CMP_NEQ, &[0; 4])
        }
        Match::Random(n) => {
            numgen(w, *n, 0)?;
            cmp(w, CMP_EQ, &[0; 4])
        }
        Match::SaddrIn(s) => {
            payload(w, NETWORK, 12, 4, REG_1)?;
            lookup(w, s, None)
        }
        Match::DaddrIn(s) => {
            payload(w, NETWORK, 16, 4, REG_1)?;
            lookup(w, s, None)
        }
        Match::CtStatusDnat => {
            ct(w, CT_STATUS)?;
            bitwise(w, IPS_DST_NAT.to_ne_bytes(), [0; 4])?;
            cmp(w, CMP_NEQ, &[0; 4])
        }
        Match::SaddrDaddrIn(s) => {
            payload(w, NETWORK, 12, 4, REG_1)?;
            payload(w, NETWORK, 16, 4, REG32_01)?;
            lookup(w, s, None)
        }
    }
}

fn mark_set(w: &mut Writer, mask: u32, xor: u32) -> Option<()> {
    meta(w, META_MARK, REG_1)?;
    bitwise(w, mask.to_ne_bytes(), xor.to_ne_bytes())?;
    expr(w, "meta", |w| {
        w.attr(2, &be(META_MARK))?; // NFTA_META_KEY
        w.attr(3, &be(REG_1)) // NFTA_META_SREG
    })
}

fn immediate(w: &mut Writer, dreg: u32, bytes: &[u8]) -> Option<()> {
    expr(w, "immediate", |w| {
        w.attr(1, &be(dreg))?; // NFTA_IMMEDIATE_DREG
        value(w, 2, bytes) // NFTA_IMMEDIATE_DATA
    })
}

fn encode_verdict(w: &mut Writer, v: &Verdict) -> Option<()> {
    let reject = |w: &mut Writer, ty: u32, code: u8| {
        expr(w, "reject", |w| {
            w.attr(1, &be(ty))?; // NFTA_REJECT_TYPE
            w.attr(2, &[code]) // NFTA_REJECT_ICMP_CODE
        })
    };
    match v {
        Verdict::Reject => reject(w, REJECT_ICMP_UNREACH, ICMP_PORT_UNREACH),
        Verdict::RejectTcpReset => {
            l4proto(w, Protocol::Tcp)?;
            reject(w, REJECT_TCP_RST, 0)
        }
        v => {
            let (code, chain) = verdict(v)?;
            expr(w, "immediate", |w| {
                w.attr(1, &be(REG_VERDICT))?;
                w.nest(2, |w| {
                    w.nest(NFTA_DATA_VERDICT, |w| {
                        w.attr(NFTA_VERDICT_CODE, &code.to_be_bytes())?;
                        chain.map_or(Some(()), |c| w.str_attr(NFTA_VERDICT_CHAIN, c))
                    })
                })
            })
        }
    }
}

fn nat(w: &mut Writer, addr: u32, proto: u32, flags: u32) -> Option<()> {
    expr(w, "nat", |w| {
        w.attr(1, &be(NAT_DNAT))?; // NFTA_NAT_TYPE
        w.attr(2, &be(u32::from(NFPROTO_IPV4)))?; // NFTA_NAT_FAMILY
        w.attr(3, &be(addr))?; // NFTA_NAT_REG_ADDR_MIN
        w.attr(5, &be(proto))?; // NFTA_NAT_REG_PROTO_MIN
        match flags {
            0 => Some(()),
            f => w.attr(7, &be(f)), // NFTA_NAT_FLAGS
        }
    })
}

fn encode_stmt(w: &mut Writer, s: &Stmt) -> Option<()> {
    match s {
        Stmt::MarkOr(m) => mark_set(w, !m, *m),
        Stmt::MarkXor(m) => mark_set(w, u32::MAX, *m),
        Stmt::Update(set) => {
            payload(w, NETWORK, 12, 4, REG_1)?;
            expr(w, "dynset", |w| {
                w.str_attr(1, set)?; // NFTA_DYNSET_SET_NAME
                w.attr(3, &be(DYNSET_UPDATE))?; // NFTA_DYNSET_OP
                w.attr(4, &be(REG_1)) // NFTA_DYNSET_SREG_KEY
            })
        }
        Stmt::Dnat(to) => {
            immediate(w, REG_1, &to.ip().octets())?;
            immediate(w, REG_2, &to.port().to_be_bytes())?;
            nat(w, REG_1, REG_2, NAT_PROTO_SPECIFIED)
        }
        Stmt::DnatMap { n, offset, map } => {
            numgen(w, *n, *offset)?;
            lookup(w, map, Some(REG_1))?;
            nat(w, REG_1, REG32_01, 0)
        }
        Stmt::Masquerade { fully_random } => expr(w, "masq", |w| match fully_random {
            true => w.attr(1, &be(NAT_RANDOM_FULLY)), // NFTA_MASQ_FLAGS
            false => Some(()),
        }),
        Stmt::Vmap(key, map) => {
            let (proto_reg, port_reg) = match key {
                VmapKey::DaddrProtoPort => {
                    payload(w, NETWORK, 16, 4, REG_1)?;
                    (REG32_01, REG32_02)
                }
                VmapKey::ProtoPort => (REG_1, REG32_01),
            };
            meta(w, META_L4PROTO, proto_reg)?;
            payload(w, TRANSPORT, 2, 2, port_reg)?;
            lookup(w, map, Some(REG_VERDICT))
        }
        Stmt::Verdict(v) => encode_verdict(w, v),
    }
}

fn encode_rule(w: &mut Writer, r: &Rule) -> Option<()> {
    r.matches.iter().try_for_each(|m| encode_match(w, m))?;
    r.stmts.iter().try_for_each(|s| encode_stmt(w, s))
}

/// Sends `rw` on `sock` and waits for its outcome: an error of any message
/// (or of the commit) fails it, the last message's acknowledgement tells
/// it committed. The kernel runs the batch inside `send`.
pub(super) fn send(sock: &netlink_sys::Socket, rw: &NftRewrite) -> Result<()> {
    use std::io;
    let buf = &rw.msgs;
    let size = usize::min(buf.len() + (1 << 16), i32::MAX as usize);
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::SndBufForce, &size)
        .map_err(|e| nl_error("send buffer", io::Error::from(e)))?;
    sock.send(buf, 0).map_err(|e| nl_error("send", e))?;
    let mut rx = Vec::with_capacity(64 * 1024);
    let mut first_error: Option<(u32, i32)> = None;
    loop {
        rx.clear();
        let n = match sock.recv(&mut rx, libc::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(e) => {
                return Err(match first_error {
                    Some((seq, code)) => failed(rw, seq, code),
                    None => nl_error("no acknowledgement of the batch", e),
                })
            }
        };
        let mut at = 0;
        let end = n.min(rx.len());
        while at + 16 <= end {
            let word = |o: usize| u32::from_ne_bytes(rx[o..o + 4].try_into().unwrap_or_default());
            let len = word(at) as usize;
            let ty = u16::from_ne_bytes([rx[at + 4], rx[at + 5]]);
            if ty == NLMSG_ERROR && at + 32 <= end {
                let code = word(at + 16) as i32;
                let seq = word(at + 28);
                if code != 0 && first_error.is_none() {
                    first_error = Some((seq, code));
                }
                if code == 0 && seq == rw.count {
                    return match first_error {
                        Some((seq, code)) => Err(failed(rw, seq, code)),
                        None => Ok(()),
                    };
                }
            }
            if len < 16 {
                break;
            }
            at += len.next_multiple_of(4);
        }
    }
}

fn failed(rw: &NftRewrite, seq: u32, code: i32) -> crate::error::Error {
    let what = if seq == 0 {
        "commit of the batch".to_string()
    } else {
        format!("message {seq} ({})", rw.label(seq))
    };
    nl_error(&what, std::io::Error::from_raw_os_error(-code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::ir::Element;

    /// (type, flags, seq, length) of each message of a batch.
    fn headers(buf: &[u8]) -> Vec<(u16, u16, u32, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let word = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
            let len = word(at) as usize;
            let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            let flags = u16::from_ne_bytes([buf[at + 6], buf[at + 7]]);
            out.push((ty, flags, word(at + 8), len));
            at += len.next_multiple_of(4);
        }
        out
    }

    #[test]
    fn a_rewrite_is_framed_acknowledged_once_and_splits_large_element_lists() {
        let chain = Chain {
            name: "services".into(),
            hook: None,
            rules: vec![Rule::new(
                vec![Match::CtStateNew],
                vec![Stmt::Verdict(Verdict::Jump("masquerading".into()))],
            )],
        };
        let elems: Vec<Element> = (0..3000u32)
            .map(|i| Element {
                set: "hairpin",
                key: Key::AddrAddr(i.into(), i.into()),
                value: None,
            })
            .collect();
        let refs: Vec<(&Key, Option<&Value>)> =
            elems.iter().map(|e| (&e.key, e.value.as_ref())).collect();
        let mut b = Builder::default();
        b.chain(&chain);
        b.flush_rules();
        b.rules(&chain);
        b.elements("hairpin", &refs);
        let rw = b.finish(String::new()).expect("encodable");
        let h = headers(&rw.msgs);
        assert_eq!(h.len() as u32, rw.messages() + 2, "begin, messages, end");
        assert_eq!((h[0].0, h[0].2), (NFNL_MSG_BATCH_BEGIN, 0));
        let end = h[h.len() - 1];
        assert_eq!((end.0, end.2), (NFNL_MSG_BATCH_END, rw.messages() + 1));
        let acked: Vec<u32> = h
            .iter()
            .filter(|m| m.1 & NLM_F_ACK != 0)
            .map(|m| m.2)
            .collect();
        assert_eq!(
            acked,
            [rw.messages()],
            "only the last message asks for an ack"
        );
        let newsetelem = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
        let chunks: Vec<usize> = h
            .iter()
            .filter(|m| m.0 == newsetelem)
            .map(|m| m.3)
            .collect();
        assert!(chunks.len() > 1, "3000 pairs do not fit one message");
        assert!(chunks.iter().all(|len| *len < 65_535), "{chunks:?}");
        assert_eq!(rw.label(1), "chain services");
        assert_eq!(rw.label(3), "rules of chain services");
        assert_eq!(rw.label(rw.messages()), "elements of hairpin");
    }

    #[test]
    fn a_verdict_a_map_cannot_hold_makes_the_rewrite_fall_back_to_text() {
        let key = Key::Addr([10, 0, 0, 1].into());
        let reject = Value::Verdict(Verdict::Reject);
        let mut b = Builder::default();
        b.elements("service-ips", &[(&key, Some(&reject))]);
        assert!(b.finish(String::new()).is_none());
    }
}
