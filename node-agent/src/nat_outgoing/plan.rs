//! Pure: from the cluster view to the wanted natOutgoing sets, and the
//! `ipset restore` / `iptables-restore` payloads that make them so.
//!
//! As felix does it: one rule in Tabby's own chain of the nat table,
//! jumped from POSTROUTING,
//!
//! ```text
//! -A TABBY-NAT-OUTGOING -m set --match-set tabby-masq-ipam-pools src
//!    -m set ! --match-set tabby-all-ipam-pools dst
//!    -m set ! --match-set tabby-all-hosts-net dst -j MASQUERADE --random-fully
//! ```
//!
//! over three ipsets (felix: `cali40masq-ipam-pools`,
//! `cali40all-ipam-pools`, `cali40all-hosts-net`). The sets are refilled by
//! swapping in a freshly filled temporary set, so the rule never sees a
//! half-filled one.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::{IpNetwork, Ipv4Network};

use crate::desired::ClusterView;

/// Tabby's chain in the nat table.
pub const CHAIN: &str = "TABBY-NAT-OUTGOING";
/// The pools whose traffic is masqueraded.
pub const MASQ_POOLS: &str = "tabby-masq-ipam-pools";
/// Every pool.
pub const ALL_POOLS: &str = "tabby-all-ipam-pools";
/// Every node's address.
pub const ALL_HOSTS: &str = "tabby-all-hosts-net";
/// The comment of the POSTROUTING jump (how it is found again after a restart).
pub const JUMP_COMMENT: &str = "tabby nat outgoing";

/// What natOutgoing wants in the kernel (IPv4; `masq_pools` empty: nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatPlan {
    /// Pools with `natOutgoing: true` (disabled ones too: their pods still run).
    pub masq_pools: BTreeSet<Ipv4Network>,
    /// Every pool.
    pub all_pools: BTreeSet<Ipv4Network>,
    /// Every node's underlay address.
    pub hosts: BTreeSet<Ipv4Addr>,
}

impl NatPlan {
    /// Whether any pool asks for natOutgoing (else the chain and sets go).
    pub fn wanted(&self) -> bool {
        !self.masq_pools.is_empty()
    }
}

/// The natOutgoing sets of `view` (IPv4 pools and addresses only).
pub fn plan(view: &ClusterView) -> NatPlan {
    let mut p = NatPlan::default();
    for pool in &view.snapshot.pools {
        let IpNetwork::V4(cidr) = pool.cidr else {
            continue;
        };
        p.all_pools.insert(cidr);
        if pool.nat_outgoing {
            p.masq_pools.insert(cidr);
        }
    }
    for node in &view.snapshot.nodes {
        let addrs = [node.address, node.ipv4_address.map(|n| n.ip())];
        p.hosts
            .extend(addrs.into_iter().flatten().filter_map(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }));
    }
    p
}

/// The temporary set that `name` is refilled through.
fn tmp(name: &str) -> String {
    format!("{name}-tmp")
}

fn refill<T: std::fmt::Display>(out: &mut String, name: &str, kind: &str, members: &BTreeSet<T>) {
    let t = tmp(name);
    let _ = writeln!(out, "create {name} {kind} family inet -exist");
    let _ = writeln!(out, "create {t} {kind} family inet -exist");
    let _ = writeln!(out, "flush {t}");
    for m in members {
        let _ = writeln!(out, "add {t} {m}");
    }
    let _ = writeln!(out, "swap {t} {name}");
    let _ = writeln!(out, "destroy {t}");
}

/// `ipset restore` input that makes the three sets hold exactly `plan`.
pub fn ipset_payload(plan: &NatPlan) -> String {
    let mut out = String::new();
    refill(&mut out, MASQ_POOLS, "hash:net", &plan.masq_pools);
    refill(&mut out, ALL_POOLS, "hash:net", &plan.all_pools);
    refill(&mut out, ALL_HOSTS, "hash:ip", &plan.hosts);
    out
}

/// Tabby's sets and their temporaries, for removal.
pub fn set_names() -> Vec<String> {
    [MASQ_POOLS, ALL_POOLS, ALL_HOSTS]
        .iter()
        .flat_map(|s| [tmp(s), s.to_string()])
        .collect()
}

/// `ipset restore` input that destroys those of Tabby's sets in
/// `existing` (the output of `ipset list -n`), after the rule is gone.
pub fn ipset_removal(existing: &[String]) -> String {
    set_names()
        .into_iter()
        .filter(|s| existing.contains(s))
        .map(|s| format!("destroy {s}\n"))
        .collect()
}

/// The one MASQUERADE rule.
pub fn rule(random_fully: bool) -> String {
    format!(
        "-A {CHAIN} -m set --match-set {MASQ_POOLS} src -m set ! --match-set {ALL_POOLS} dst \
         -m set ! --match-set {ALL_HOSTS} dst -j MASQUERADE{}",
        if random_fully { " --random-fully" } else { "" }
    )
}

/// The POSTROUTING jump, with `-A` (as `iptables-save` shows it) or `-D`.
pub fn jump(verb: &str) -> String {
    format!("{verb} POSTROUTING -m comment --comment \"{JUMP_COMMENT}\" -j {CHAIN}")
}

/// `iptables-restore --noflush` input: the chain (declaring it flushes
/// it, so a restarted agent never doubles the rule) with its rule, and
/// exactly one POSTROUTING jump, given the `jumps` there are.
pub fn rules_payload(random_fully: bool, jumps: usize) -> String {
    let mut out = format!("*nat\n:{CHAIN} - [0:0]\n{}\n", rule(random_fully));
    if jumps == 0 {
        out.push_str(&jump("-A"));
        out.push('\n');
    }
    for _ in 1..jumps {
        out.push_str(&jump("-D"));
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// `iptables-restore --noflush` input removing the `jumps` POSTROUTING
/// jumps and the chain.
pub fn removal_payload(jumps: usize, chain_present: bool) -> String {
    let mut out = String::from("*nat\n");
    if chain_present {
        let _ = writeln!(out, ":{CHAIN} - [0:0]");
    }
    for _ in 0..jumps {
        out.push_str(&jump("-D"));
        out.push('\n');
    }
    if chain_present {
        let _ = writeln!(out, "-X {CHAIN}");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests;
