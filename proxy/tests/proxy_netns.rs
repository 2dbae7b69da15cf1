//! Root tests: program real tables in a fresh network namespace with both
//! backends, then a partial update, and read them back with iptables-save.
//! They need root and the backend's programs (testkit's `require_root`).

mod proxy_support;

use std::time::{Duration, Instant};

use proxy_support::{load, node, parse_objects, upserts};
use tabby_proxy::conntrack::ConntrackCli;
use tabby_proxy::iptables::{Backend, Iptables};
use tabby_proxy::model::ServiceKey;
use tabby_proxy::proxier::{Proxier, ProxyEvent, SyncConfig};
use tabby_proxy::ProxyOptions;
use tabby_testkit::{require_programs, require_root, Netns};

/// `iptables-save -t TABLE` of `backend` inside `ns`.
fn save(ns: &Netns, backend: Backend, table: &str) -> String {
    ns.exec_ok(&backend.save_program(), &["-t", table])
}

/// Whether the test can run: root and both programs of `backend`.
fn ready(test: &str, backend: Backend) -> bool {
    require_root(test)
        && require_programs(test, &[&backend.save_program(), &backend.restore_program()])
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
"#;

fn chains(save: &str) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

fn full_then_partial(backend: Backend) {
    let ns = Netns::new("tpx");
    let ipt = Iptables::new(backend).in_netns(ns.path());
    let ct = ConntrackCli {
        netns: Some(ns.path()),
    };
    let mut p = Proxier::new(
        node(),
        ProxyOptions::default(),
        SyncConfig::default(),
        ipt,
        ct,
    );
    for scenario in [
        "hello-service",
        "nodeport",
        "session-affinity",
        "features",
        "no-endpoints",
    ] {
        upserts(load(scenario)).for_each(|e| p.apply_event(e));
    }
    let t0 = Instant::now();
    assert!(p.sync(t0).expect("full sync").full);

    let nat = save(&ns, backend, "nat");
    let have = chains(&nat);
    for c in [
        "TABBY-SERVICES",
        "TABBY-NODEPORTS",
        "TABBY-SVC-WR2LASOULGGSX3JN",
        "TABBY-SVC-KBDEBIL6IU6WL7RF",
        "TABBY-SEP-TBW2IYJKUCAC7GB3",
        "TABBY-EXT-KGTTXZQT54FX5FOU",
    ] {
        assert!(
            have.iter().any(|h| h == c),
            "{backend:?}: {c} missing:\n{nat}"
        );
    }
    assert!(
        nat.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j TABBY-SERVICES"
        ),
        "{nat}"
    );
    let filter = save(&ns, backend, "filter");
    assert!(filter.contains("has no endpoints"), "{filter}");

    // Partial: delete the affinity service, drop one hello endpoint.
    p.apply_event(ProxyEvent::ServiceDelete(ServiceKey {
        namespace: "default".into(),
        name: "svc-clusterip".into(),
    }));
    let (_, slices) = parse_objects(HELLO_TWO_LEFT);
    p.apply_event(ProxyEvent::SliceUpsert(Box::new(slices[0].clone())));
    let r = p.sync(t0 + Duration::from_secs(2)).expect("partial sync");
    assert!(!r.full);

    let nat = save(&ns, backend, "nat");
    let have = chains(&nat);
    let removed_ep =
        tabby_proxy::names::sep_chain("default/hello-service", "tcp", "10.244.1.3:8080");
    for gone in [
        "TABBY-SVC-KBDEBIL6IU6WL7RF",
        "TABBY-SEP-TBW2IYJKUCAC7GB3",
        "TABBY-SEP-DOIEFYKPESCDTYCH",
        removed_ep.as_str(),
    ] {
        assert!(
            !have.iter().any(|h| h == gone),
            "{backend:?}: {gone} still there:\n{nat}"
        );
    }
    assert!(have.iter().any(|h| h == "TABBY-SVC-WR2LASOULGGSX3JN"));
    assert!(
        nat.contains("--probability 0.5"),
        "hello-service now splits in two:\n{nat}"
    );
    assert!(!nat.contains("10.200.1.201"), "{nat}");

    // A forced full resync does not duplicate the jump rules.
    p.apply_event(ProxyEvent::FullSync);
    assert!(p.sync(t0 + Duration::from_secs(4)).unwrap().full);
    let nat = save(&ns, backend, "nat");
    assert_eq!(nat.matches("-A PREROUTING").count(), 1, "{nat}");
    assert_eq!(
        save(&ns, backend, "filter")
            .matches("-j TABBY-FORWARD")
            .count(),
        1
    );
    assert_eq!(p.metrics().conntrack_failures(), 0);
}

/// Named `proxy` so that `cargo test -p tabby-node proxy` selects these tests.
mod proxy {
    use super::*;

    #[test]
    fn legacy_backend_applies_full_then_partial_syncs() {
        if !ready(
            "legacy_backend_applies_full_then_partial_syncs",
            Backend::Legacy,
        ) {
            return;
        }
        full_then_partial(Backend::Legacy);
    }

    #[test]
    fn nft_backend_applies_full_then_partial_syncs() {
        if !ready("nft_backend_applies_full_then_partial_syncs", Backend::Nft) {
            return;
        }
        full_then_partial(Backend::Nft);
    }
}
