//! Rendering a [`RuleSet`] as `iptables-restore --noflush` input.
//!
//! A payload has a `*filter` and a `*nat` section. Each declares the chains it
//! writes with `:CHAIN - [0:0]` (which creates or flushes them), appends their
//! rules, and deletes stale chains with `-X` after flushing them the same way.
//! Chains that are not declared (PREROUTING, other programs' chains, and in a
//! partial sync Tabby's unchanged per-service chains) are left as they are.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use super::names;
use super::rules::{Chain, RuleSet, ServicePortRules};

/// A rendered payload and its size, for metrics. The nftables backend
/// counts its rules in `nat_rules`, its chains in `nat_chains`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    /// The `iptables-restore` input.
    pub text: String,
    /// Rules written in the nat table.
    pub nat_rules: usize,
    /// Rules written in the filter table.
    pub filter_rules: usize,
    /// Chains declared (created or flushed) in the nat table.
    pub nat_chains: usize,
    /// Chains deleted from the nat table.
    pub deleted_chains: usize,
    /// Set and map elements written (nftables).
    pub elements: usize,
    /// The same change as element operations only, when it is only that
    /// (nftables: applied over netlink, without running nft).
    pub batch: Option<crate::nftables::NftBatch>,
    /// A full sync as one netlink batch (nftables), applied instead of
    /// the text when netlink is there.
    pub rewrite: Option<crate::nftables::NftRewrite>,
}

/// Extra lines a payload carries besides the rule set: jump rules missing
/// from the built-in chains, inserted in the same transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// `-I CHAIN ...` lines for the filter table.
    pub filter_jumps: Vec<String>,
    /// `-I CHAIN ...` lines for the nat table.
    pub nat_jumps: Vec<String>,
}

/// The full payload: every chain, and `-X` for each of `stale` (chain names
/// found in the kernel, e.g. by `iptables-save`) that Tabby owns but no
/// longer uses.
pub fn render_full<'a>(
    set: &RuleSet,
    stale: impl IntoIterator<Item = &'a str>,
    extras: &Extras,
) -> Payload {
    let live: BTreeSet<&str> = set
        .ports
        .values()
        .flat_map(|p| p.chains.iter().map(|c| c.name.as_str()))
        .collect();
    let deleted: BTreeSet<&str> = stale
        .into_iter()
        .filter(|c| names::is_service_chain(c) && !live.contains(c))
        .collect();
    let changed: Vec<&ServicePortRules> = set.ports.values().map(Arc::as_ref).collect();
    render(set, &changed, &deleted, extras)
}

/// A partial payload: the filter table and nat dispatch chains in full, the
/// per-service chains that differ from `previous`, and `-X` for the chains
/// `previous` had and `set` does not. Ports whose rules are the same `Arc`
/// in both sets are skipped without comparing their contents.
pub fn render_partial(previous: &RuleSet, set: &RuleSet, extras: &Extras) -> Payload {
    let mut changed: Vec<&ServicePortRules> = Vec::new();
    let mut deleted: BTreeSet<&str> = BTreeSet::new();
    for (key, cur) in &set.ports {
        match previous.ports.get(key) {
            Some(prev) if Arc::ptr_eq(prev, cur) => {}
            Some(prev) => {
                if prev.chains != cur.chains {
                    changed.push(cur);
                }
                deleted.extend(gone_chains(&prev.chains, &cur.chains));
            }
            None => changed.push(cur),
        }
    }
    for (key, prev) in &previous.ports {
        if !set.ports.contains_key(key) {
            deleted.extend(prev.chains.iter().map(|c| c.name.as_str()));
        }
    }
    render(set, &changed, &deleted, extras)
}

/// Names of chains in `before` that are not in `after`.
fn gone_chains<'a>(before: &'a [Chain], after: &[Chain]) -> Vec<&'a str> {
    let after: BTreeSet<&str> = after.iter().map(|c| c.name.as_str()).collect();
    before
        .iter()
        .map(|c| c.name.as_str())
        .filter(|c| !after.contains(c))
        .collect()
}

fn render(
    set: &RuleSet,
    changed: &[&ServicePortRules],
    deleted: &BTreeSet<&str>,
    extras: &Extras,
) -> Payload {
    let mut p = Payload::default();
    let mut out = String::with_capacity(estimate(changed));
    render_filter(set, extras, &mut out, &mut p);
    render_nat(set, changed, deleted, extras, &mut out, &mut p);
    p.text = out;
    p
}

fn estimate(changed: &[&ServicePortRules]) -> usize {
    4096 + changed
        .iter()
        .map(|c| {
            c.chains
                .iter()
                .map(|ch| 48 + ch.rules.len() * 160)
                .sum::<usize>()
                + 400
        })
        .sum::<usize>()
}

fn push_lines<'a>(out: &mut String, lines: impl IntoIterator<Item = &'a String>) -> usize {
    let mut n = 0;
    for l in lines {
        out.push_str(l);
        out.push('\n');
        n += 1;
    }
    n
}

fn declare(out: &mut String, chain: &str) {
    let _ = writeln!(out, ":{chain} - [0:0]");
}

fn render_filter(set: &RuleSet, extras: &Extras, out: &mut String, p: &mut Payload) {
    out.push_str("*filter\n");
    for c in names::FILTER_CHAINS {
        declare(out, c);
    }
    let ports = || set.ports.values();
    p.filter_rules += push_lines(out, ports().flat_map(|r| &r.filter_services));
    p.filter_rules += push_lines(out, ports().flat_map(|r| &r.filter_external));
    p.filter_rules += push_lines(out, ports().flat_map(|r| &r.filter_nodeports));
    p.filter_rules += push_lines(out, ports().flat_map(|r| &r.filter_firewall));
    p.filter_rules += push_lines(out, &set.filter_forward);
    p.filter_rules += push_lines(out, &extras.filter_jumps);
    out.push_str("COMMIT\n");
}

fn render_nat(
    set: &RuleSet,
    changed: &[&ServicePortRules],
    deleted: &BTreeSet<&str>,
    extras: &Extras,
    out: &mut String,
    p: &mut Payload,
) {
    out.push_str("*nat\n");
    for c in names::NAT_DISPATCH_CHAINS {
        declare(out, c);
    }
    p.nat_chains += names::NAT_DISPATCH_CHAINS.len();
    for ch in changed.iter().flat_map(|r| &r.chains) {
        declare(out, &ch.name);
        p.nat_chains += 1;
    }
    for c in deleted {
        declare(out, c);
    }
    let ports = || set.ports.values();
    p.nat_rules += push_lines(out, ports().flat_map(|r| &r.nat_services));
    p.nat_rules += push_lines(out, &set.nat_services_tail);
    p.nat_rules += push_lines(out, ports().flat_map(|r| &r.nat_nodeports));
    p.nat_rules += push_lines(out, &set.nat_postrouting);
    p.nat_rules += push_lines(out, &set.nat_mark_masq);
    for ch in changed.iter().flat_map(|r| &r.chains) {
        p.nat_rules += push_lines(out, &ch.rules);
    }
    for c in deleted {
        let _ = writeln!(out, "-X {c}");
    }
    p.deleted_chains = deleted.len();
    p.nat_rules += push_lines(out, &extras.nat_jumps);
    out.push_str("COMMIT\n");
}

/// Count of nat rules the whole set holds (for the rules-count metric).
pub fn nat_rule_count(set: &RuleSet) -> usize {
    set.ports
        .values()
        .map(|r| {
            r.nat_services.len()
                + r.nat_nodeports.len()
                + r.chains.iter().map(|c| c.rules.len()).sum::<usize>()
        })
        .sum::<usize>()
        + set.nat_services_tail.len()
        + set.nat_postrouting.len()
        + set.nat_mark_masq.len()
}
