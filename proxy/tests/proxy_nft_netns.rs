//! Root tests of nftables mode: full then partial syncs in a fresh network
//! namespace, read back with `nft list table ip tabby-proxy` and compared
//! with the plan chain by chain and element by element; a transaction made
//! to fail leaves the table exactly as it was; a full resync keeps the
//! clients in the affinity sets.

mod proxy_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proxy_support::{load, node, parse_objects};
use tabby_proxy::conntrack::NoConntrack;
use tabby_proxy::error::Result;
use tabby_proxy::nftables::{Key, NftBatch, NftCli, NftExec, NftPlan, NftRewrite, Nftables, SetOp};
use tabby_proxy::proxier::{Proxier, ProxyEvent, SyncConfig, SyncReport};
use tabby_proxy::ProxyOptions;
use tabby_testkit::{require_root, Netns};

/// nft in the test's namespace; makes the next transaction fail on demand
/// by appending a rule that jumps to a chain that does not exist.
struct Exec {
    nft: NftCli,
    fail_next: bool,
    /// Makes the next full sync's netlink batch fail: a map it flushes is
    /// deleted first. Records the table before and after the failed batch.
    fail_rewrite: bool,
    failed_rewrite: Option<(String, String, String)>,
}

impl NftExec for Exec {
    fn apply(&mut self, payload: &str) -> Result<()> {
        if std::mem::take(&mut self.fail_next) {
            let broken = format!("{payload}add rule ip tabby-proxy services jump no-such-chain\n");
            return self.nft.apply(&broken);
        }
        self.nft.apply(payload)
    }
    fn json(&mut self, args: &[&str]) -> Result<String> {
        self.nft.json(args)
    }
    /// A failing batch deletes a `hairpin` pair that is not there.
    fn apply_batch(&mut self, batch: &NftBatch) -> Result<bool> {
        if std::mem::take(&mut self.fail_next) {
            let mut broken = batch.clone();
            let missing = "203.0.113.9".parse().unwrap();
            broken.ops.push(SetOp {
                delete: true,
                set: tabby_proxy::nftables::HAIRPIN,
                elements: vec![(Key::AddrAddr(missing, missing), None)],
            });
            return self.nft.apply_batch(&broken);
        }
        self.nft.apply_batch(batch)
    }
    fn apply_rewrite(&mut self, rewrite: &NftRewrite) -> Result<bool> {
        if !std::mem::take(&mut self.fail_rewrite) {
            return self.nft.apply_rewrite(rewrite);
        }
        self.nft.apply(&rewrite.skeleton)?;
        self.nft
            .apply("delete map ip tabby-proxy endpoints-sctp-015\n")?;
        let listing = |nft: &mut NftCli| nft.json(&["list", "table", "ip", "tabby-proxy"]);
        let before = listing(&mut self.nft)?;
        let err = self
            .nft
            .send_rewrite(rewrite)
            .expect_err("a batch that flushes a missing map fails");
        let after = listing(&mut self.nft)?;
        self.failed_rewrite = Some((before, after, tabby_proxy::error::chain(&err)));
        Err(err)
    }
}

type P = Proxier<Nftables<Exec>, NoConntrack>;

fn proxier(ns: &Netns) -> P {
    let exec = Exec {
        nft: NftCli::in_netns(ns.path()),
        fail_next: false,
        fail_rewrite: false,
        failed_rewrite: None,
    };
    Proxier::new(
        node(),
        ProxyOptions::default(),
        SyncConfig::default(),
        Nftables::new(exec),
        NoConntrack::default(),
    )
}

fn feed(
    p: &mut P,
    services: Vec<k8s_openapi::api::core::v1::Service>,
    slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    services
        .into_iter()
        .for_each(|s| p.apply_event(ProxyEvent::ServiceUpsert(Box::new(s))));
    slices
        .into_iter()
        .for_each(|s| p.apply_event(ProxyEvent::SliceUpsert(Box::new(s))));
}

fn feed_scenarios(p: &mut P) {
    for scenario in [
        "hello-service",
        "nodeport",
        "session-affinity",
        "features",
        "no-endpoints",
    ] {
        let (services, slices) = load(scenario);
        feed(p, services, slices);
    }
}

/// A proxier over `ns` fed every scenario, after its first sync (a full
/// one); with the time of that sync.
fn synced(ns: &Netns) -> (P, Instant, SyncReport) {
    let mut p = proxier(ns);
    feed_scenarios(&mut p);
    let t0 = Instant::now();
    let full = p.sync(t0).expect("full sync");
    assert!(full.full);
    (p, t0, full)
}

/// No full sync so far fell back to the text: the kernel took each batch.
fn assert_no_text_fallback(p: &mut P) {
    assert_eq!(
        p.dataplane_mut().text_fallbacks(),
        0,
        "the kernel took the batch"
    );
}

/// What `nft list table` shows: rules per chain, elements per set or map.
#[derive(Debug, Default, PartialEq)]
struct Listing {
    chains: BTreeMap<String, Vec<String>>,
    sets: BTreeMap<String, BTreeSet<String>>,
}

fn list(ns: &Netns) -> (Listing, String) {
    let text = ns.exec_ok("nft", &["list", "table", "ip", "tabby-proxy"]);
    let mut l = Listing::default();
    let mut chain: Option<String> = None;
    let mut set: Option<String> = None;
    let mut elems: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(acc) = elems.as_mut() {
            acc.push(' ');
            acc.push_str(line);
        } else if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|r| r.strip_suffix(" {"))
        {
            chain = Some(name.to_string());
            l.chains.insert(name.to_string(), Vec::new());
            continue;
        } else if let Some(name) = ["set ", "map "]
            .iter()
            .find_map(|k| line.strip_prefix(k))
            .and_then(|r| r.strip_suffix(" {"))
        {
            set = Some(name.to_string());
            l.sets.insert(name.to_string(), BTreeSet::new());
            continue;
        } else if line == "}" {
            chain = None;
            set = None;
            continue;
        } else if line.starts_with("elements = {") {
            elems = Some(line.to_string());
        } else if let Some(c) = &chain {
            if !line.starts_with("type ") && !line.is_empty() {
                l.chains.get_mut(c).unwrap().push(line.to_string());
            }
            continue;
        }
        if let (Some(acc), Some(s)) = (&elems, &set) {
            if acc.ends_with('}') {
                let inner = acc.trim_start_matches("elements = {").trim_end_matches('}');
                l.sets.get_mut(s).unwrap().extend(
                    inner
                        .split(',')
                        .map(|e| e.trim().to_string())
                        .filter(|e| !e.is_empty()),
                );
                elems = None;
            }
        }
    }
    (l, text)
}

/// The listing the plan describes (affinity sets empty).
fn expected(plan: &NftPlan) -> Listing {
    let mut l = Listing::default();
    for c in plan.chains() {
        l.chains.insert(
            c.name.clone(),
            c.rules.iter().map(ToString::to_string).collect(),
        );
    }
    for (set, _) in tabby_proxy::nftables::fixed_sets() {
        l.sets.insert(set.to_string(), BTreeSet::new());
    }
    for ((set, key), value) in plan.elements() {
        let e = match value {
            Some(v) => format!("{key} : {v}"),
            None => key.to_string(),
        };
        l.sets.get_mut(set).unwrap().insert(e);
    }
    for s in plan.affinity_sets() {
        l.sets.insert(s.name.clone(), BTreeSet::new());
    }
    l
}

/// The listing matches the plan; chains the plan lacks must be empty (flushed, deleted by the next full sync).
fn assert_matches(ns: &Netns, plan: &NftPlan, what: &str) {
    let (mut have, text) = list(ns);
    let want = expected(plan);
    let extra: Vec<String> = have
        .chains
        .keys()
        .filter(|c| !want.chains.contains_key(*c))
        .cloned()
        .collect();
    for c in &extra {
        assert_eq!(
            have.chains.remove(c).unwrap(),
            Vec::<String>::new(),
            "{what}: stale {c} is flushed:\n{text}"
        );
    }
    have.sets.retain(|s, _| want.sets.contains_key(s));
    for (c, rules) in &want.chains {
        assert_eq!(
            have.chains.get(c),
            Some(rules),
            "{what}: chain {c}:\n{text}"
        );
    }
    assert_eq!(have.chains.len(), want.chains.len(), "{what}:\n{text}");
    assert_eq!(have.sets, want.sets, "{what}:\n{text}");
}

const HELLO_TWO_LEFT: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-service-abcde, namespace: default, labels: {kubernetes.io/service-name: hello-service}}
addressType: IPv4
ports: [{protocol: TCP, port: 8080}]
endpoints:
- {addresses: [10.244.0.131], nodeName: worker-node3}
- {addresses: [10.244.1.131], nodeName: worker-node2}
- {addresses: [10.244.1.200], nodeName: worker-node2}
"#;

/// The session affinity service loses an endpoint: the one kind of service
/// with a chain per endpoint, so the partial sync leaves a stale chain.
const STICKY_TWO_LEFT: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc-clusterip-7xk2p, namespace: default, labels: {kubernetes.io/service-name: svc-clusterip}}
addressType: IPv4
ports: [{name: svc-webport, protocol: TCP, port: 80}]
endpoints:
- {addresses: [10.10.1.2], conditions: {ready: true}, nodeName: myk8s-worker}
- {addresses: [10.10.2.2], conditions: {ready: true}, nodeName: myk8s-worker2}
"#;

/// hello-service with 10.244.1.3 replaced by 10.244.1.77: same count, so element operations only.
const HELLO_REPLACED: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-service-abcde, namespace: default, labels: {kubernetes.io/service-name: hello-service}}
addressType: IPv4
ports: [{protocol: TCP, port: 8080}]
endpoints:
- {addresses: [10.244.0.131], nodeName: worker-node3}
- {addresses: [10.244.1.77], nodeName: worker-node1}
- {addresses: [10.244.1.131], nodeName: worker-node2}
"#;

#[test]
fn an_endpoint_replaced_is_one_netlink_batch_and_a_failed_batch_changes_nothing() {
    if !require_root("an_endpoint_replaced_is_one_netlink_batch_and_a_failed_batch_changes_nothing")
    {
        return;
    }
    let ns = Netns::new("nft");
    let (mut p, t0, _) = synced(&ns);
    let (before, before_text) = list(&ns);

    feed(&mut p, vec![], parse_objects(HELLO_REPLACED).1);
    p.dataplane_mut().exec.fail_next = true;
    let err = p
        .sync(t0 + Duration::from_secs(2))
        .expect_err("the broken batch fails");
    let chain = tabby_proxy::error::chain(&err);
    assert!(chain.contains("hairpin"), "{chain}");
    let (after, after_text) = list(&ns);
    assert_eq!(
        before, after,
        "nothing of the failed batch landed:\n{before_text}\n---\n{after_text}"
    );
    let retry = p.sync(t0 + Duration::from_secs(4)).expect("retry");
    assert!(retry.full, "a failure makes the next sync full");
    assert_matches(&ns, p.applied().unwrap(), "after the retry");

    feed(&mut p, vec![], parse_objects(HELLO_TWO_LEFT).1);
    p.sync(t0 + Duration::from_secs(6)).expect("partial sync");
    feed(&mut p, vec![], parse_objects(HELLO_REPLACED).1);
    let partial = p.sync(t0 + Duration::from_secs(8)).expect("partial sync");
    assert!(!partial.full);
    let batch = partial
        .payload
        .batch
        .as_ref()
        .expect("element operations only");
    let sets: BTreeSet<(bool, &str)> = batch.ops.iter().map(|op| (op.delete, op.set)).collect();
    assert!(
        sets.iter()
            .all(|(_, s)| *s == "hairpin" || s.starts_with("endpoints-tcp-")),
        "only the endpoint's slot and hairpin pair: {batch:?}"
    );
    assert_matches(&ns, p.applied().unwrap(), "after the netlink batch");
    let (_, text) = list(&ns);
    assert!(
        text.contains("10.244.1.77 . 8080") && !text.contains("10.244.1.200"),
        "{text}"
    );
}

#[test]
fn nftables_full_then_partial_syncs_program_exactly_the_planned_table() {
    if !require_root("nftables_full_then_partial_syncs_program_exactly_the_planned_table") {
        return;
    }
    let ns = Netns::new("nft");
    let (mut p, t0, full) = synced(&ns);
    assert!(
        full.payload.rewrite.is_some(),
        "a full sync is one netlink batch"
    );
    assert_no_text_fallback(&mut p);
    assert_matches(&ns, p.applied().unwrap(), "after the full sync");

    let (_, mut slices) = parse_objects(HELLO_TWO_LEFT);
    slices.extend(parse_objects(STICKY_TWO_LEFT).1);
    feed(&mut p, vec![], slices);
    let partial = p.sync(t0 + Duration::from_secs(2)).expect("partial sync");
    assert!(!partial.full);
    let text = &partial.payload.text;
    assert!(
        !text.contains("add table") && !text.contains("flush map"),
        "{text}"
    );
    assert!(
        text.lines().all(|l| !l.contains("hello-nodeport-service")),
        "only hello-service changes:\n{text}"
    );
    assert!(
        partial.payload.text.len() * 10 < full.payload.text.len(),
        "{text}"
    );
    assert_matches(&ns, p.applied().unwrap(), "after the partial sync");

    p.apply_event(ProxyEvent::FullSync);
    let again = p.sync(t0 + Duration::from_secs(4)).expect("full resync");
    assert!(again.full);
    assert!(
        again
            .payload
            .text
            .contains("delete chain ip tabby-proxy endpoint-"),
        "{}",
        again.payload.text
    );
    assert_no_text_fallback(&mut p);
    let (have, text) = list(&ns);
    assert_eq!(
        have.chains.len(),
        expected(p.applied().unwrap()).chains.len(),
        "stale chains deleted:\n{text}"
    );
    assert_matches(&ns, p.applied().unwrap(), "after the full resync");
}

#[test]
fn a_failed_transaction_leaves_the_table_untouched_and_the_next_sync_is_full() {
    if !require_root("a_failed_transaction_leaves_the_table_untouched_and_the_next_sync_is_full") {
        return;
    }
    let ns = Netns::new("nft");
    let (mut p, t0, _) = synced(&ns);
    let (before, before_text) = list(&ns);

    let (_, slices) = parse_objects(HELLO_TWO_LEFT);
    feed(&mut p, vec![], slices);
    p.dataplane_mut().exec.fail_next = true;
    let err = p
        .sync(t0 + Duration::from_secs(2))
        .expect_err("the broken transaction fails");
    let chain = tabby_proxy::error::chain(&err);
    assert!(
        chain.contains("no-such-chain") || chain.contains("No such file"),
        "{chain}"
    );
    assert_eq!(p.metrics().partial_restore_failures(), 1);
    let (after, after_text) = list(&ns);
    assert_eq!(
        before, after,
        "nothing of the failed transaction landed:\n{before_text}\n---\n{after_text}"
    );

    let retry = p.sync(t0 + Duration::from_secs(4)).expect("retry");
    assert!(retry.full, "a failure makes the next sync full");
    assert_matches(&ns, p.applied().unwrap(), "after the retry");
}

#[test]
fn a_full_resync_keeps_the_clients_in_the_affinity_sets() {
    if !require_root("a_full_resync_keeps_the_clients_in_the_affinity_sets") {
        return;
    }
    let ns = Netns::new("nft");
    let mut p = proxier(&ns);
    let (services, slices) = load("session-affinity");
    feed(&mut p, services, slices);
    let t0 = Instant::now();
    p.sync(t0).expect("full sync");
    let set = p
        .applied()
        .unwrap()
        .affinity_sets()
        .next()
        .expect("an affinity set")
        .name
        .clone();
    ns.exec_ok(
        "nft",
        &["add", "element", "ip", "tabby-proxy", &set, "{ 10.10.0.6 }"],
    );
    p.apply_event(ProxyEvent::FullSync);
    assert!(
        p.sync(t0 + Duration::from_secs(2))
            .expect("full resync")
            .full
    );
    let shown = ns.exec_ok("nft", &["list", "set", "ip", "tabby-proxy", &set]);
    assert!(shown.contains("10.10.0.6"), "{shown}");
}

#[test]
fn a_failed_full_batch_changes_nothing_and_the_text_applies_instead() {
    if !require_root("a_failed_full_batch_changes_nothing_and_the_text_applies_instead") {
        return;
    }
    let ns = Netns::new("nft");
    let (mut p, t0, _) = synced(&ns);

    feed(&mut p, vec![], parse_objects(HELLO_TWO_LEFT).1);
    p.apply_event(ProxyEvent::FullSync);
    p.dataplane_mut().exec.fail_rewrite = true;
    let again = p
        .sync(t0 + Duration::from_secs(2))
        .expect("the text applies");
    assert!(again.full);
    let (before, after, err) = p
        .dataplane_mut()
        .exec
        .failed_rewrite
        .take()
        .expect("the batch was sent and failed");
    assert!(err.contains("endpoints-sctp-015"), "{err}");
    assert_eq!(before, after, "nothing of the failed batch landed");
    assert!(
        before.contains("10.244.1.3") && !before.contains("10.244.1.200"),
        "the table before the batch: {before}"
    );
    assert_eq!(p.dataplane_mut().text_fallbacks(), 1);
    assert_matches(&ns, p.applied().unwrap(), "after the text");
}
