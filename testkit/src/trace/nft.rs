//! The packet tracer over an nftables plan: the same packets, environment
//! and outcomes as the iptables tracer, evaluated on the planned chains and
//! maps (`tabby_proxy::nftables::NftPlan`) rather than on text. The payload
//! nft applies is printed from the same plan, and a root test checks that
//! `nft list table` shows what the plan holds.
//!
//! Hooks in priority order: an interface packet meets filter-prerouting
//! (-110), nat-prerouting (-100), then filter-input or filter-forward after
//! the routing decision on the DNATed address; a local one filter-output
//! (-110), nat-output (-100), filter-output-post-dnat (-90), and
//! filter-input when it stays on the node. Every packet that survives ends in
//! nat-postrouting, which decides masquerade.

use std::collections::HashMap;

use tabby_proxy::model::Protocol;
use tabby_proxy::nftables::{
    Key, Match, NftPlan, Rule, Stmt, Value, Verdict as NftVerdict, VmapKey,
};

use super::{is_local, Env, Origin, Outcome, Packet, State, Tracer, Verdict};

/// The chains and maps of a plan, ready to trace.
#[derive(Debug, Clone, Default)]
pub struct NftTables {
    chains: HashMap<String, Vec<Rule>>,
    maps: HashMap<&'static str, HashMap<Key, Option<Value>>>,
}

/// How a walk through a chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The rule did not end the chain: go on with the next rule.
    Next,
    /// The chain ended (its last rule, or `return`).
    Fell,
    /// The base chain is done (accept, dnat, masquerade).
    Stop,
    /// The packet is dropped or rejected.
    Final,
}

impl NftTables {
    /// The chains and elements of `plan`.
    pub fn from_plan(plan: &NftPlan) -> Self {
        let mut t = Self::default();
        for c in plan.chains() {
            t.chains.insert(c.name.clone(), c.rules.clone());
        }
        for ((set, key), value) in plan.elements() {
            t.maps
                .entry(set)
                .or_default()
                .insert(key.clone(), value.cloned());
        }
        t
    }

    fn hook(&self, chain: &str, pkt: &Packet, env: &Env, states: Vec<State>) -> Vec<State> {
        let mut out = Vec::new();
        for s in states {
            if s.verdict.is_some() {
                out.push(s);
                continue;
            }
            out.extend(self.walk(chain, pkt, env, s).into_iter().map(|(s, _)| s));
        }
        out
    }

    fn walk(&self, chain: &str, pkt: &Packet, env: &Env, st: State) -> Vec<(State, End)> {
        let Some(rules) = self.chains.get(chain) else {
            return vec![(st, End::Fell)];
        };
        let mut active = vec![st];
        let mut done = Vec::new();
        for rule in rules {
            let mut next = Vec::new();
            for s in active {
                let p = self.match_probability(rule, pkt, env, &s);
                let (missed, matched) = s.split(p);
                next.extend(missed);
                let Some(s) = matched else { continue };
                for (s, end) in self.run(&rule.stmts, pkt, env, s) {
                    match end {
                        End::Next => next.push(s),
                        other => done.push((s, other)),
                    }
                }
            }
            active = next;
        }
        done.extend(active.into_iter().map(|s| (s, End::Fell)));
        done
    }

    fn run(&self, stmts: &[Stmt], pkt: &Packet, env: &Env, mut s: State) -> Vec<(State, End)> {
        for stmt in stmts {
            match stmt {
                Stmt::MarkOr(m) => s.mark |= m,
                Stmt::MarkXor(m) => s.mark ^= m,
                Stmt::Update(set) => s.recent_set = Some(set.clone()),
                Stmt::Dnat(to) => {
                    s.dnat = Some(*to);
                    return vec![(s, End::Stop)];
                }
                Stmt::DnatMap { n, offset, map } => return self.dnat_map(*n, *offset, map, s),
                Stmt::Masquerade { .. } => {
                    s.masquerade = true;
                    return vec![(s, End::Stop)];
                }
                Stmt::Vmap(key, map) => {
                    return match self.lookup(*key, map, pkt, &s) {
                        Some(v) => self.verdict(&v, pkt, env, s),
                        None => vec![(s, End::Next)],
                    };
                }
                Stmt::Verdict(v) => return self.verdict(v, pkt, env, s),
            }
        }
        vec![(s, End::Next)]
    }

    /// `dnat ip to numgen random mod N offset K map @MAP`: each slot with
    /// chance 1/N; a slot the map lacks matches nothing (the rule is skipped).
    fn dnat_map(&self, n: u32, offset: u32, map: &str, s: State) -> Vec<(State, End)> {
        let slots = self.maps.get(map);
        let share = 1.0 / f64::from(n.max(1));
        (offset..offset.saturating_add(n))
            .map(|slot| {
                let target = slots.and_then(|m| m.get(&Key::Slot(slot)));
                let mut s = State {
                    prob: s.prob * share,
                    ..s.clone()
                };
                match target {
                    Some(Some(Value::Target(to))) => {
                        s.dnat = Some(*to);
                        (s, End::Stop)
                    }
                    _ => (s, End::Next),
                }
            })
            .collect()
    }

    fn verdict(&self, v: &NftVerdict, pkt: &Packet, env: &Env, mut s: State) -> Vec<(State, End)> {
        let stop = |mut s: State, v: Verdict| {
            s.verdict = Some(v);
            vec![(s, End::Final)]
        };
        match v {
            NftVerdict::Jump(c) => self
                .walk(c, pkt, env, s)
                .into_iter()
                .map(|(s, e)| (s, if e == End::Fell { End::Next } else { e }))
                .collect(),
            NftVerdict::Goto(c) => self.walk(c, pkt, env, s),
            NftVerdict::Return => vec![(s, End::Fell)],
            NftVerdict::Accept => vec![(s, End::Stop)],
            NftVerdict::Drop => stop(s, Verdict::Drop),
            NftVerdict::Reject => stop(s, Verdict::Reject),
            NftVerdict::RejectTcpReset if pkt.proto == Protocol::Tcp => {
                s.verdict = Some(Verdict::Reject);
                vec![(s, End::Final)]
            }
            NftVerdict::RejectTcpReset => vec![(s, End::Next)],
        }
    }

    fn lookup(&self, key: VmapKey, map: &str, pkt: &Packet, s: &State) -> Option<NftVerdict> {
        let (dst, dport) = s.dnat.map_or((pkt.dst, pkt.dport), |d| (*d.ip(), d.port()));
        let k = match key {
            VmapKey::DaddrProtoPort => Key::AddrProtoPort(dst, pkt.proto, dport),
            VmapKey::ProtoPort => Key::ProtoPort(pkt.proto, dport),
        };
        match self.maps.get(map)?.get(&k)? {
            Some(Value::Verdict(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// 0 when a match fails, else the product of the random matches' chances.
    fn match_probability(&self, rule: &Rule, pkt: &Packet, env: &Env, s: &State) -> f64 {
        let (dst, dport) = s.dnat.map_or((pkt.dst, pkt.dport), |d| (*d.ip(), d.port()));
        let mut p = 1.0;
        for m in &rule.matches {
            let ok = match m {
                Match::Saddr { negate, net } => net.contains(pkt.src) != *negate,
                Match::Daddr { negate, net } => net.contains(dst) != *negate,
                Match::Dport(proto, port) => pkt.proto == *proto && dport == *port,
                Match::L4proto(proto) => pkt.proto == *proto,
                Match::FibSaddrLocal => is_local(env, pkt.src),
                Match::FibDaddrLocal => is_local(env, dst),
                Match::MarkClear(mask) => s.mark & mask == 0,
                Match::CtStateNew => true,
                Match::Random(n) => {
                    p /= f64::from(*n);
                    true
                }
                Match::SaddrIn(set) => env.recent.contains(set),
                Match::DaddrIn(set) => self
                    .maps
                    .get(set.as_str())
                    .is_some_and(|m| m.contains_key(&Key::Addr(dst))),
                Match::CtStatusDnat => s.dnat.is_some(),
                Match::SaddrDaddrIn(set) => self
                    .maps
                    .get(set.as_str())
                    .is_some_and(|m| m.contains_key(&Key::AddrAddr(pkt.src, dst))),
            };
            if !ok {
                return 0.0;
            }
        }
        p
    }
}

impl Tracer for NftTables {
    fn trace(&self, pkt: &Packet, env: &Env) -> Vec<Outcome> {
        let before: &[&str] = match pkt.origin {
            Origin::Interface => &["filter-prerouting", "nat-prerouting"],
            Origin::LocalProcess => &["filter-output", "nat-output", "filter-output-post-dnat"],
        };
        let mut active = vec![State::start()];
        for chain in before {
            active = self.hook(chain, pkt, env, active);
        }
        let mut routed = Vec::new();
        for s in active {
            let dst = s.dnat.map_or(pkt.dst, |d| *d.ip());
            let next = match (pkt.origin, is_local(env, dst)) {
                (_, true) => Some("filter-input"),
                (Origin::Interface, false) => Some("filter-forward"),
                (Origin::LocalProcess, false) => None,
            };
            match next {
                Some(chain) => routed.extend(self.hook(chain, pkt, env, vec![s])),
                None => routed.push(s),
            }
        }
        let done = self.hook("nat-postrouting", pkt, env, routed);
        super::merge(done.into_iter().map(|s| Outcome {
            probability: s.prob,
            dnat: s.dnat,
            masquerade: s.masquerade,
            verdict: s.verdict.unwrap_or(Verdict::Accept),
            recent_set: s.recent_set,
        }))
    }
}
