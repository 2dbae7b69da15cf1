//! The nftables objects Tabby writes, as data. Each one prints in the form
//! `nft list table` prints it back, so the planned rules, the payload, the
//! golden files and the kernel's listing read the same; the packet tracer
//! (testkit) evaluates these values rather than parsing text.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;

use crate::model::Protocol;

/// A match of a rule (all of a rule's matches must hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `ip saddr [!=] NET`.
    Saddr {
        /// `!=`.
        negate: bool,
        /// The network (a /32 prints as an address).
        net: Ipv4Network,
    },
    /// `ip daddr [!=] NET`.
    Daddr {
        /// `!=`.
        negate: bool,
        /// The network.
        net: Ipv4Network,
    },
    /// `tcp dport 80`.
    Dport(Protocol, u16),
    /// `meta l4proto tcp`.
    L4proto(Protocol),
    /// `fib saddr type local`: the source is one of the node's addresses.
    FibSaddrLocal,
    /// `fib daddr type local`: the destination is one of the node's addresses.
    FibDaddrLocal,
    /// `meta mark & M == 0x00000000`.
    MarkClear(u32),
    /// `ct state new`.
    CtStateNew,
    /// `numgen random mod N 0`: holds with probability 1/N.
    Random(u32),
    /// `ip saddr @SET`.
    SaddrIn(String),
    /// `ip daddr @SET`.
    DaddrIn(String),
    /// `ct status dnat`: the connection's destination was translated.
    CtStatusDnat,
    /// `ip saddr . ip daddr @SET`: the (source, destination) pair is in the set.
    SaddrDaddrIn(String),
}

/// Where a verdict map's key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmapKey {
    /// `ip daddr . meta l4proto . th dport`.
    DaddrProtoPort,
    /// `meta l4proto . th dport`.
    ProtoPort,
}

/// A verdict: what happens to the packet next.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// `jump CHAIN`: run it, then continue here.
    Jump(String),
    /// `goto CHAIN`: run it instead of the rest of this chain.
    Goto(String),
    /// `return`.
    Return,
    /// `accept`.
    Accept,
    /// `drop`.
    Drop,
    /// `reject` (ICMP port unreachable).
    Reject,
    /// `reject with tcp reset` (TCP packets only).
    RejectTcpReset,
}

/// A statement of a rule, run in order once the matches hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `meta mark set meta mark | M`.
    MarkOr(u32),
    /// `meta mark set meta mark ^ M`.
    MarkXor(u32),
    /// `update @SET { ip saddr }`: remember the client (session affinity).
    Update(String),
    /// `dnat to IP:PORT` (after a `meta l4proto` match).
    Dnat(SocketAddrV4),
    /// `dnat ip to numgen random mod N offset K map @MAP`: endpoint choice
    /// as a lookup of a random slot in `K..K+N` of an endpoint map.
    DnatMap {
        /// The number of endpoints (N).
        n: u32,
        /// The first slot (K).
        offset: u32,
        /// The map: slot to `address . port`.
        map: &'static str,
    },
    /// `masquerade [fully-random]`.
    Masquerade {
        /// `fully-random`.
        fully_random: bool,
    },
    /// `KEY vmap @MAP`: the verdict the map holds for the packet, if any.
    Vmap(VmapKey, &'static str),
    /// A verdict.
    Verdict(Verdict),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Matches, all of which must hold.
    pub matches: Vec<Match>,
    /// Statements.
    pub stmts: Vec<Stmt>,
}

impl Rule {
    /// A rule of matches and statements.
    pub fn new(matches: Vec<Match>, stmts: Vec<Stmt>) -> Self {
        Self { matches, stmts }
    }

    /// A rule that only runs a verdict.
    pub fn verdict(matches: Vec<Match>, v: Verdict) -> Self {
        Self::new(matches, vec![Stmt::Verdict(v)])
    }
}

/// The hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `nat` or `filter`.
    pub kind: &'static str,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`.
    pub hook: &'static str,
    /// Priority (dstnat is -100, srcnat 100; written as numbers: nft 1.0.6
    /// rejects `dstnat` on the output hook).
    pub priority: i32,
}

/// One chain and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Name.
    pub name: String,
    /// The hook, for base chains.
    pub hook: Option<Hook>,
    /// Rules in order.
    pub rules: Vec<Rule>,
}

/// The key of a set or map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `10.96.0.1` (`cluster-ips`).
    Addr(Ipv4Addr),
    /// `10.96.0.1 . tcp . 80` (`service-ips`, `no-endpoint-services`, `firewall-ips`).
    AddrProtoPort(Ipv4Addr, Protocol, u16),
    /// `tcp . 30080` (`service-nodeports`, `no-endpoint-nodeports`).
    ProtoPort(Protocol, u16),
    /// `10.244.1.5 . 10.244.1.5` (`hairpin`: an endpoint talking to itself).
    AddrAddr(Ipv4Addr, Ipv4Addr),
    /// `16` (`endpoints-…`: a slot of the random endpoint choice).
    Slot(u32),
}

/// What a map element maps its key to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// A verdict (`service-ips` and the other verdict maps).
    Verdict(Verdict),
    /// `10.244.1.5 . 8080`: the DNAT target (`endpoints-…`).
    Target(SocketAddrV4),
}

/// One element of one of the fixed sets or maps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    /// The set or map.
    pub set: &'static str,
    /// The key.
    pub key: Key,
    /// The value (maps only).
    pub value: Option<Value>,
}

/// A per-endpoint session affinity set: clients seen in the last `timeout` seconds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AffinitySet {
    /// Name.
    pub name: String,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub timeout: u32,
}

impl AffinitySet {
    /// `{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }`.
    pub fn spec(&self) -> String {
        format!(
            "{{ type ipv4_addr ; flags dynamic,timeout ; timeout {}s ; }}",
            self.timeout
        )
    }
}

struct Net(Ipv4Network);

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix() == 32 {
            write!(f, "{}", self.0.ip())
        } else {
            write!(f, "{}/{}", self.0.network(), self.0.prefix())
        }
    }
}

fn neg(n: bool) -> &'static str {
    if n {
        "!= "
    } else {
        ""
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Saddr { negate, net } => write!(f, "ip saddr {}{}", neg(*negate), Net(*net)),
            Self::Daddr { negate, net } => write!(f, "ip daddr {}{}", neg(*negate), Net(*net)),
            Self::Dport(p, port) => write!(f, "{} dport {port}", p.as_str()),
            Self::L4proto(p) => write!(f, "meta l4proto {}", p.as_str()),
            Self::FibSaddrLocal => f.write_str("fib saddr type local"),
            Self::FibDaddrLocal => f.write_str("fib daddr type local"),
            Self::MarkClear(m) => write!(f, "meta mark & {m:#010x} == 0x00000000"),
            Self::CtStateNew => f.write_str("ct state new"),
            Self::Random(n) => write!(f, "numgen random mod {n} 0"),
            Self::SaddrIn(s) => write!(f, "ip saddr @{s}"),
            Self::DaddrIn(s) => write!(f, "ip daddr @{s}"),
            Self::CtStatusDnat => f.write_str("ct status dnat"),
            Self::SaddrDaddrIn(s) => write!(f, "ip saddr . ip daddr @{s}"),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jump(c) => write!(f, "jump {c}"),
            Self::Goto(c) => write!(f, "goto {c}"),
            Self::Return => f.write_str("return"),
            Self::Accept => f.write_str("accept"),
            Self::Drop => f.write_str("drop"),
            Self::Reject => f.write_str("reject"),
            Self::RejectTcpReset => f.write_str("reject with tcp reset"),
        }
    }
}

impl fmt::Display for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MarkOr(m) => write!(f, "meta mark set meta mark | {m:#010x}"),
            Self::MarkXor(m) => write!(f, "meta mark set meta mark ^ {m:#010x}"),
            Self::Update(s) => write!(f, "update @{s} {{ ip saddr }}"),
            Self::Dnat(to) => write!(f, "dnat to {to}"),
            // As nft lists it: `offset 0` is left out.
            Self::DnatMap { n, offset: 0, map } => {
                write!(f, "dnat ip to numgen random mod {n} map @{map}")
            }
            Self::DnatMap { n, offset, map } => {
                write!(
                    f,
                    "dnat ip to numgen random mod {n} offset {offset} map @{map}"
                )
            }
            Self::Masquerade { fully_random } => f.write_str(if *fully_random {
                "masquerade fully-random"
            } else {
                "masquerade"
            }),
            Self::Vmap(VmapKey::DaddrProtoPort, m) => {
                write!(f, "ip daddr . meta l4proto . th dport vmap @{m}")
            }
            Self::Vmap(VmapKey::ProtoPort, m) => write!(f, "meta l4proto . th dport vmap @{m}"),
            Self::Verdict(v) => v.fmt(f),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let r = if first { Ok(()) } else { f.write_str(" ") };
            first = false;
            r
        };
        for m in &self.matches {
            sep(f)?;
            m.fmt(f)?;
        }
        for s in &self.stmts {
            sep(f)?;
            s.fmt(f)?;
        }
        Ok(())
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} hook {} priority {} ; policy accept ;",
            self.kind, self.hook, self.priority
        )
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::AddrProtoPort(a, p, port) => write!(f, "{a} . {} . {port}", p.as_str()),
            Self::ProtoPort(p, port) => write!(f, "{} . {port}", p.as_str()),
            Self::AddrAddr(a, b) => write!(f, "{a} . {b}"),
            Self::Slot(n) => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Verdict(v) => v.fmt(f),
            Self::Target(t) => write!(f, "{} . {}", t.ip(), t.port()),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} : {v}", self.key),
            None => self.key.fmt(f),
        }
    }
}
