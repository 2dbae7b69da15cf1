//! natOutgoing against the real iptables (legacy and nft) and ipset in a
//! fresh namespace each: the rule and the sets follow the plan, a restart
//! adds no duplicate, a set in the way is refused and rolled back, and
//! nothing is left once no pool asks for it (root only).

use std::collections::BTreeSet;

use tabby_node::nat_outgoing::plan::{ALL_HOSTS, ALL_POOLS, CHAIN, MASQ_POOLS};
use tabby_node::nat_outgoing::{KernelNat, NatOutgoing, NatPlan};
use tabby_proxy::iptables::{Backend, Iptables};
use tabby_testkit::netns::Netns;
use tabby_testkit::require_root;

fn plan(masq: &[&str], all: &[&str], hosts: &[&str]) -> NatPlan {
    NatPlan {
        masq_pools: masq.iter().map(|s| s.parse().unwrap()).collect(),
        all_pools: all.iter().map(|s| s.parse().unwrap()).collect(),
        hosts: hosts.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

fn nat(ns: &Netns, backend: Backend) -> NatOutgoing<KernelNat> {
    NatOutgoing::new(KernelNat::new(Iptables::new(backend).in_netns(ns.path())))
}

/// The members of set `name` in `ns`.
fn members(ns: &Netns, name: &str) -> BTreeSet<String> {
    let out = ns.exec_ok("ipset", &["list", name]);
    let after = out.split("Members:\n").nth(1).unwrap_or_default();
    after
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn set(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The nat table's lines that mention Tabby's chain.
fn nat_lines(ns: &Netns, backend: Backend) -> Vec<String> {
    let out = ns.exec_ok(&backend.save_program(), &["-t", "nat"]);
    out.lines()
        .filter(|l| l.contains(CHAIN))
        .map(String::from)
        .collect()
}

fn sets(ns: &Netns) -> Vec<String> {
    let out = ns.exec_ok("ipset", &["list", "-n"]);
    out.lines()
        .filter(|l| l.starts_with("tabby-"))
        .map(String::from)
        .collect()
}

fn follows_the_plan_survives_a_restart_and_leaves_nothing(backend: Backend) {
    let ns = Netns::new("tnat");
    let mut n = nat(&ns, backend);
    let first = plan(
        &["10.244.0.0/16"],
        &["10.244.0.0/16", "10.245.0.0/16"],
        &["10.98.0.1"],
    );
    assert!(n.sync(&first).unwrap());
    assert!(
        !n.sync(&first).unwrap(),
        "an unchanged plan must not touch the kernel"
    );
    let lines = nat_lines(&ns, backend);
    let rule = format!(
        "-A {CHAIN} -m set --match-set {MASQ_POOLS} src -m set ! --match-set {ALL_POOLS} dst \
         -m set ! --match-set {ALL_HOSTS} dst -j MASQUERADE --random-fully"
    );
    let jump = format!("-A POSTROUTING -m comment --comment \"tabby nat outgoing\" -j {CHAIN}");
    assert_eq!(
        lines,
        [format!(":{CHAIN} - [0:0]"), jump.clone(), rule.clone()],
        "{backend:?}"
    );
    assert_eq!(members(&ns, MASQ_POOLS), set(&["10.244.0.0/16"]));
    assert_eq!(
        members(&ns, ALL_POOLS),
        set(&["10.244.0.0/16", "10.245.0.0/16"])
    );
    assert_eq!(members(&ns, ALL_HOSTS), set(&["10.98.0.1"]));

    // A node joins and a second pool asks for NAT, seen by a restarted agent.
    let second = plan(
        &["10.244.0.0/16", "10.245.0.0/16"],
        &["10.244.0.0/16", "10.245.0.0/16"],
        &["10.98.0.1", "10.98.0.2"],
    );
    let mut restarted = nat(&ns, backend);
    assert!(restarted.sync(&second).unwrap());
    assert_eq!(
        nat_lines(&ns, backend),
        [format!(":{CHAIN} - [0:0]"), jump, rule]
    );
    assert_eq!(
        members(&ns, MASQ_POOLS),
        set(&["10.244.0.0/16", "10.245.0.0/16"])
    );
    assert_eq!(members(&ns, ALL_HOSTS), set(&["10.98.0.1", "10.98.0.2"]));
    assert_eq!(sets(&ns).len(), 3, "no temporary set left: {:?}", sets(&ns));

    // No pool asks for it any more: chain, jump and sets go.
    let off = plan(&[], &["10.244.0.0/16"], &["10.98.0.1"]);
    assert!(restarted.sync(&off).unwrap());
    assert!(
        nat_lines(&ns, backend).is_empty(),
        "{:?}",
        nat_lines(&ns, backend)
    );
    assert!(sets(&ns).is_empty(), "{:?}", sets(&ns));
}

#[test]
fn nat_outgoing_follows_the_plan_survives_a_restart_and_leaves_nothing_with_iptables_legacy() {
    if !require_root("nat_outgoing_follows_the_plan_with_iptables_legacy") {
        return;
    }
    follows_the_plan_survives_a_restart_and_leaves_nothing(Backend::Legacy);
}

#[test]
fn nat_outgoing_follows_the_plan_survives_a_restart_and_leaves_nothing_with_iptables_nft() {
    if !require_root("nat_outgoing_follows_the_plan_with_iptables_nft") {
        return;
    }
    follows_the_plan_survives_a_restart_and_leaves_nothing(Backend::Nft);
}

#[test]
fn a_foreign_set_in_the_way_is_refused_with_the_chain_and_no_rule_or_set_is_left() {
    if !require_root(
        "a_foreign_set_in_the_way_is_refused_with_the_chain_and_no_rule_or_set_is_left",
    ) {
        return;
    }
    let ns = Netns::new("tnatf");
    // Someone else's set of another type under the hosts set's name.
    ns.exec_ok("ipset", &["create", ALL_HOSTS, "hash:net,port"]);
    let mut n = nat(&ns, Backend::Nft);
    let want = plan(&["10.244.0.0/16"], &["10.244.0.0/16"], &["10.98.0.1"]);
    let err = n.sync(&want).unwrap_err();
    let text = tabby_errors::chain(&err).to_string();
    assert!(text.contains("ipset restore"), "{text}");
    assert!(nat_lines(&ns, Backend::Nft).is_empty());
    // Only the foreign set is there; the next pass tries again (and fails again).
    assert_eq!(sets(&ns), [ALL_HOSTS]);
    assert!(n.sync(&want).is_err());
}
