//! A packet tracer over iptables rules, like kube-proxy's `tracePacket` tests.
//!
//! [`Tables::parse`] reads an `iptables-restore` payload or `iptables-save`
//! output (only the matches and targets Tabby generates are understood);
//! [`Tables::trace`] follows a new connection through nat (TABBY-SERVICES
//! as jumped to from PREROUTING or OUTPUT), the filter hooks the routing
//! decision picks, and nat TABBY-POSTROUTING. Statistic matches split the
//! walk into branches with their probabilities; `recent --rcheck` matches
//! when the list is in [`Env::recent`].
//!
//! [`NftTables`] traces the same packets through an nftables plan; both
//! implement [`Tracer`], so one table of flows checks both modes.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;

use tabby_proxy::model::Protocol;
use tabby_proxy::names;

mod nft;
pub use nft::NftTables;

/// Something that traces a packet to its possible fates.
pub trait Tracer {
    /// Every fate of `pkt`, with identical fates merged and probabilities summed.
    fn trace(&self, pkt: &Packet, env: &Env) -> Vec<Outcome>;
}

/// Merge identical fates, summing their probabilities.
fn merge(all: impl IntoIterator<Item = Outcome>) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> = Vec::new();
    for o in all {
        match outcomes.iter_mut().find(|x| {
            (x.dnat, x.masquerade, x.verdict, &x.recent_set)
                == (o.dnat, o.masquerade, o.verdict, &o.recent_set)
        }) {
            Some(x) => x.probability += o.probability,
            None => outcomes.push(o),
        }
    }
    outcomes
}

/// Where a traced packet comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Sent by a process on the node (nat OUTPUT, filter OUTPUT).
    LocalProcess,
    /// Received on an interface: a pod's veth or the uplink (nat PREROUTING).
    Interface,
}

/// The first packet of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Destination port.
    pub dport: u16,
    /// Protocol.
    pub proto: Protocol,
    /// Where it comes from.
    pub origin: Origin,
}

/// What the node looks like to the packet.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// The node's local addresses (127.0.0.0/8 is always local).
    pub local_addrs: Vec<Ipv4Addr>,
    /// `recent` lists that already hold the packet's source (session affinity).
    pub recent: BTreeSet<String>,
}

/// The final verdict of the filter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Let through.
    Accept,
    /// Silently dropped.
    Drop,
    /// Rejected (ICMP port unreachable): the client fails at once.
    Reject,
}

/// One possible fate of the packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Probability of this branch.
    pub probability: f64,
    /// Where DNAT sent it, if anywhere.
    pub dnat: Option<SocketAddrV4>,
    /// Whether TABBY-POSTROUTING masquerades it.
    pub masquerade: bool,
    /// The filter verdict.
    pub verdict: Verdict,
    /// The `recent` list its source was added to (session affinity).
    pub recent_set: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Jump(String),
    Dnat(SocketAddrV4),
    Masquerade,
    SetXmark(u32, u32),
    Return,
    Accept,
    Drop,
    Reject,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Rule {
    src: Option<(bool, Ipv4Network)>,
    dst: Option<(bool, Ipv4Network)>,
    proto: Option<Protocol>,
    dport: Option<u16>,
    src_local: bool,
    dst_local: bool,
    mark: Option<(bool, u32, u32)>,
    ctstate: Option<(bool, Vec<String>)>,
    probability: Option<f64>,
    rcheck: Option<String>,
    rset: Option<String>,
    target: Option<Target>,
}

/// The nat and filter chains of a payload.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    nat: HashMap<String, Vec<Rule>>,
    filter: HashMap<String, Vec<Rule>>,
}

/// A parse failure: the line number (1-based) and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// Line number.
    pub line: usize,
    /// What was wrong.
    pub message: String,
}

/// Split a rule line into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in line.chars() {
        match c {
            '"' => (quoted, any) = (!quoted, true),
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => (cur.push(c), any = true).1,
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn parse_net(s: &str) -> Result<Ipv4Network, String> {
    s.parse().map_err(|e| format!("address {s}: {e}"))
}

fn parse_mark(s: &str) -> Result<(u32, u32), String> {
    let num = |x: &str| {
        u32::from_str_radix(x.trim_start_matches("0x"), 16).map_err(|e| format!("mark {s}: {e}"))
    };
    let (v, m) = s.split_once('/').unwrap_or((s, "0xffffffff"));
    Ok((num(v)?, num(m)?))
}

fn parse_rule(w: &[String]) -> Result<Rule, String> {
    let mut r = Rule::default();
    let mut neg = false;
    let mut i = 0;
    while i < w.len() {
        let word = w[i].as_str();
        if word == "!" {
            neg = true;
            i += 1;
            continue;
        }
        if word == "-j" {
            r.target = Some(parse_target(&w[i + 1..])?);
            break;
        }
        let flag_only = matches!(word, "--rcheck" | "--set" | "--reap" | "--rsource");
        let val = if flag_only {
            ""
        } else {
            w.get(i + 1)
                .map(String::as_str)
                .ok_or_else(|| format!("{word} needs a value"))?
        };
        match word {
            "-s" => r.src = Some((neg, parse_net(val)?)),
            "-d" => r.dst = Some((neg, parse_net(val)?)),
            "-p" => {
                r.proto = Some(Protocol::from_api(Some(&val.to_uppercase())).ok_or("protocol")?)
            }
            "--dport" => r.dport = Some(val.parse().map_err(|_| "dport")?),
            "--src-type" => r.src_local = val == "LOCAL",
            "--dst-type" => r.dst_local = val == "LOCAL",
            "--mark" => {
                let (v, m) = parse_mark(val)?;
                r.mark = Some((neg, v, m));
            }
            "--ctstate" => r.ctstate = Some((neg, val.split(',').map(String::from).collect())),
            "--probability" => r.probability = Some(val.parse().map_err(|_| "probability")?),
            "--rcheck" => r.rcheck = Some(String::new()),
            "--set" => r.rset = Some(String::new()),
            "--name" => {
                if let Some(n) = r.rcheck.as_mut().filter(|n| n.is_empty()) {
                    *n = val.to_string();
                } else if let Some(n) = r.rset.as_mut() {
                    *n = val.to_string();
                }
            }
            _ => {} // -m, --comment, --mode, --seconds, --mask: nothing to evaluate
        }
        neg = false;
        i += if flag_only { 1 } else { 2 };
    }
    Ok(r)
}

fn parse_target(w: &[String]) -> Result<Target, String> {
    let name = w.first().ok_or("target")?.as_str();
    let opt = |key: &str| {
        w.iter()
            .position(|x| x == key)
            .and_then(|p| w.get(p + 1))
            .cloned()
    };
    Ok(match name {
        "DNAT" => Target::Dnat(
            opt("--to-destination")
                .ok_or("DNAT destination")?
                .parse()
                .map_err(|_| "DNAT address")?,
        ),
        "MASQUERADE" => Target::Masquerade,
        "MARK" => {
            let (v, m) = parse_mark(&opt("--set-xmark").ok_or("MARK needs --set-xmark")?)?;
            Target::SetXmark(v, m)
        }
        "RETURN" => Target::Return,
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "REJECT" => Target::Reject,
        chain => Target::Jump(chain.to_string()),
    })
}

impl Tables {
    /// Parse the `*nat` and `*filter` sections of a payload or of `iptables-save` output.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut t = Tables::default();
        let mut table: Option<&str> = None;
        for (n, line) in text.lines().enumerate() {
            let err = |message: String| ParseError {
                line: n + 1,
                message,
            };
            let line = line.trim();
            if let Some(name) = line.strip_prefix('*') {
                table = Some(if name == "nat" {
                    "nat"
                } else if name == "filter" {
                    "filter"
                } else {
                    "other"
                });
                continue;
            }
            let chains = match table {
                Some("nat") => &mut t.nat,
                Some("filter") => &mut t.filter,
                _ => continue,
            };
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                chains.insert(name.to_string(), Vec::new());
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let w = words(rest);
                let rule = parse_rule(&w[1..]).map_err(err)?;
                chains.entry(w[0].clone()).or_default().push(rule);
            } else if let Some(chain) = line.strip_prefix("-X ") {
                chains.remove(chain.trim());
            }
        }
        Ok(t)
    }

    /// Every fate of `pkt`, with identical fates merged and probabilities summed.
    pub fn trace(&self, pkt: &Packet, env: &Env) -> Vec<Outcome> {
        let start = State::start();
        let mut all = Vec::new();
        for nat in self.walk(&self.nat, names::SERVICES, pkt, env, start) {
            for st in self.filter_hooks(pkt, env, nat.0) {
                let masq = self
                    .walk(&self.nat, names::POSTROUTING, pkt, env, st.clone())
                    .into_iter()
                    .any(|(s, _)| s.masquerade);
                all.push(Outcome {
                    probability: st.prob,
                    dnat: st.dnat,
                    masquerade: masq,
                    verdict: st.verdict.unwrap_or(Verdict::Accept),
                    recent_set: st.recent_set,
                });
            }
        }
        merge(all)
    }

    /// The filter chains Tabby hooks, in the order they are reached.
    fn filter_hooks(&self, pkt: &Packet, env: &Env, st: State) -> Vec<State> {
        let dst = st.dnat.map(|d| *d.ip()).unwrap_or(pkt.dst);
        let hooks: &[&str] = match pkt.origin {
            Origin::LocalProcess => &[names::PROXY_FIREWALL, names::SERVICES],
            Origin::Interface if is_local(env, dst) => &[
                names::PROXY_FIREWALL,
                names::NODEPORTS,
                names::EXTERNAL_SERVICES,
            ],
            Origin::Interface => &[
                names::PROXY_FIREWALL,
                names::FORWARD,
                names::SERVICES,
                names::EXTERNAL_SERVICES,
            ],
        };
        let mut active = vec![st];
        for hook in hooks {
            let mut next = Vec::new();
            for s in active {
                if s.verdict.is_some() {
                    next.push(s);
                    continue;
                }
                next.extend(
                    self.walk(&self.filter, hook, pkt, env, s)
                        .into_iter()
                        .map(|(s, _)| s),
                );
            }
            active = next;
        }
        active
    }

    /// Walk one chain; each result says whether a terminal target stopped it.
    fn walk(
        &self,
        table: &HashMap<String, Vec<Rule>>,
        chain: &str,
        pkt: &Packet,
        env: &Env,
        st: State,
    ) -> Vec<(State, bool)> {
        let Some(rules) = table.get(chain) else {
            return vec![(st, false)];
        };
        let mut active = vec![st];
        let mut done = Vec::new();
        for rule in rules {
            let mut next = Vec::new();
            for s in active {
                let p = rule.match_probability(pkt, env, &s);
                let (missed, matched) = s.split(p);
                next.extend(missed);
                let Some(s) = matched else { continue };
                for (s, flow) in self.apply(table, rule, pkt, env, s) {
                    match flow {
                        Flow::Next => next.push(s),
                        Flow::Return => done.push((s, false)),
                        Flow::Stop => done.push((s, true)),
                    }
                }
            }
            active = next;
        }
        done.extend(active.into_iter().map(|s| (s, false)));
        done
    }

    fn apply(
        &self,
        table: &HashMap<String, Vec<Rule>>,
        rule: &Rule,
        pkt: &Packet,
        env: &Env,
        mut s: State,
    ) -> Vec<(State, Flow)> {
        if let Some(name) = &rule.rset {
            s.recent_set = Some(name.clone());
        }
        let flow = match &rule.target {
            None => Flow::Next,
            Some(Target::Jump(c)) => {
                return self
                    .walk(table, c, pkt, env, s)
                    .into_iter()
                    .map(|(s, stop)| (s, if stop { Flow::Stop } else { Flow::Next }))
                    .collect();
            }
            Some(Target::Dnat(to)) => (s.dnat = Some(*to), Flow::Stop).1,
            Some(Target::Masquerade) => (s.masquerade = true, Flow::Stop).1,
            Some(Target::SetXmark(v, m)) => (s.mark = (s.mark & !m) ^ v, Flow::Next).1,
            Some(Target::Return) => Flow::Return,
            Some(Target::Accept) => (s.verdict = Some(Verdict::Accept), Flow::Stop).1,
            Some(Target::Drop) => (s.verdict = Some(Verdict::Drop), Flow::Stop).1,
            Some(Target::Reject) => (s.verdict = Some(Verdict::Reject), Flow::Stop).1,
        };
        vec![(s, flow)]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Next,
    Return,
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
struct State {
    prob: f64,
    mark: u32,
    dnat: Option<SocketAddrV4>,
    verdict: Option<Verdict>,
    recent_set: Option<String>,
    masquerade: bool,
}

impl State {
    fn start() -> Self {
        State {
            prob: 1.0,
            mark: 0,
            dnat: None,
            verdict: None,
            recent_set: None,
            masquerade: false,
        }
    }

    /// The share of this state that a rule matching with probability `p`
    /// passes by, and the share it matches (`None` where a share is 0).
    fn split(self, p: f64) -> (Option<State>, Option<State>) {
        let missed = (p < 1.0).then(|| State {
            prob: self.prob * (1.0 - p),
            ..self.clone()
        });
        let matched = (p > 0.0).then_some(State {
            prob: self.prob * p,
            ..self
        });
        (missed, matched)
    }
}

impl Tracer for Tables {
    fn trace(&self, pkt: &Packet, env: &Env) -> Vec<Outcome> {
        Tables::trace(self, pkt, env)
    }
}

fn is_local(env: &Env, ip: Ipv4Addr) -> bool {
    ip.is_loopback() || env.local_addrs.contains(&ip)
}

impl Rule {
    /// 0 when the rule cannot match, its statistic probability, or 1.
    fn match_probability(&self, pkt: &Packet, env: &Env, s: &State) -> f64 {
        let dst = s.dnat.map(|d| *d.ip()).unwrap_or(pkt.dst);
        let dport = s.dnat.map(|d| d.port()).unwrap_or(pkt.dport);
        let net_ok = |m: &Option<(bool, Ipv4Network)>, ip: Ipv4Addr| {
            m.is_none_or(|(neg, net)| net.contains(ip) != neg)
        };
        let ok = net_ok(&self.src, pkt.src)
            && net_ok(&self.dst, dst)
            && self.proto.is_none_or(|p| p == pkt.proto)
            && self.dport.is_none_or(|p| p == dport)
            && (!self.src_local || is_local(env, pkt.src))
            && (!self.dst_local || is_local(env, dst))
            && self
                .mark
                .is_none_or(|(neg, v, m)| ((s.mark & m) == v) != neg)
            && self
                .ctstate
                .as_ref()
                .is_none_or(|(neg, states)| states.iter().any(|x| x == "NEW") != *neg)
            && self
                .rcheck
                .as_ref()
                .is_none_or(|name| env.recent.contains(name));
        match (ok, self.probability) {
            (false, _) => 0.0,
            (true, Some(p)) => p,
            (true, None) => 1.0,
        }
    }
}
