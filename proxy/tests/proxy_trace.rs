//! Traced flows per feature: packets walked through the generated rules
//! (kube-proxy's tracePacket approach), no root needed. Every flow runs in
//! both modes: through the iptables payload and through the nftables plan.

mod proxy_support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use proxy_support::{load, node, node_for};
use tabby_proxy::model::Protocol;
use tabby_proxy::payload::{render_full, Extras};
use tabby_proxy::{generate, NodeFacts, ProxyOptions};
use tabby_testkit::trace::{Env, NftTables, Origin, Outcome, Packet, Tables, Tracer, Verdict};

const NODE1: &str = "192.168.1.11";
const NODE3: &str = "192.168.1.13";

/// worker-node3: no endpoint of any scenario runs there.
fn node3() -> NodeFacts {
    NodeFacts {
        name: "worker-node3".into(),
        node_ips: vec![NODE3.parse().unwrap()],
        ..node()
    }
}

fn tables(scenario: &str, node: &NodeFacts) -> (Tables, String) {
    let (services, slices) = load(scenario);
    let text = render_full(
        &generate(&services, &slices, node, &ProxyOptions::default()),
        [],
        &Extras::default(),
    )
    .text;
    (Tables::parse(&text).expect("own payload parses"), text)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Iptables,
    Nftables,
}

/// The tracer of a scenario in `mode`, and the payload it was built from.
fn tracer(mode: Mode, scenario: &str, node: &NodeFacts) -> (Box<dyn Tracer>, String) {
    match mode {
        Mode::Iptables => {
            let (t, text) = tables(scenario, node);
            (Box::new(t), text)
        }
        Mode::Nftables => {
            let (services, slices) = load(scenario);
            let plan =
                tabby_proxy::nftables::generate(&services, &slices, node, &ProxyOptions::default());
            let text = tabby_proxy::nftables::render_full(&plan, &Default::default()).text;
            (Box::new(NftTables::from_plan(&plan)), text)
        }
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn pkt(src: &str, dst: &str, dport: u16, proto: Protocol, origin: Origin) -> Packet {
    Packet {
        src: ip(src),
        dst: ip(dst),
        dport,
        proto,
        origin,
    }
}

fn env(node: &NodeFacts) -> Env {
    Env {
        local_addrs: node.node_ips.clone(),
        recent: BTreeSet::new(),
    }
}

/// Outcomes as (dnat target, probability rounded to 3 places, masquerade, verdict), sorted.
fn summary(outcomes: &[Outcome]) -> Vec<(String, String, bool, Verdict)> {
    let mut v: Vec<_> = outcomes
        .iter()
        .map(|o| {
            (
                o.dnat.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
                format!("{:.3}", o.probability),
                o.masquerade,
                o.verdict,
            )
        })
        .collect();
    v.sort();
    v
}

fn row(dnat: &str, p: &str, masq: bool, verdict: Verdict) -> (String, String, bool, Verdict) {
    (dnat.into(), p.into(), masq, verdict)
}

use Origin::{Interface, LocalProcess};
use Protocol::{Sctp, Tcp, Udp};
use Verdict::{Accept, Drop, Reject};

struct Flow {
    what: &'static str,
    scenario: &'static str,
    on_node3: bool,
    packet: Packet,
    want: Vec<(String, String, bool, Verdict)>,
}

/// Where nftables mode differs on purpose: like kube-proxy's nftables mode
/// it rejects traffic to a port of a cluster IP that no service serves.
fn nft_want(flow: &Flow) -> Vec<(String, String, bool, Verdict)> {
    if flow.what == "another port of the cluster IP is not captured" {
        return vec![row("-", "1.000", false, Reject)];
    }
    flow.want.clone()
}

fn flows() -> Vec<Flow> {
    let f = |what, scenario, on_node3, packet, want| Flow {
        what,
        scenario,
        on_node3,
        packet,
        want,
    };
    vec![
        f(
            "ClusterIP from a pod spreads over 3 endpoints, keeps the pod's address",
            "hello-service",
            false,
            pkt("10.244.1.50", "10.101.96.60", 80, Tcp, Interface),
            vec![
                row("10.244.0.131:8080", "0.333", false, Accept),
                row("10.244.1.131:8080", "0.333", false, Accept),
                row("10.244.1.3:8080", "0.333", false, Accept),
            ],
        ),
        f(
            "ClusterIP from the node itself is masqueraded",
            "hello-service",
            false,
            pkt(NODE1, "10.101.96.60", 80, Tcp, LocalProcess),
            vec![
                row("10.244.0.131:8080", "0.333", true, Accept),
                row("10.244.1.131:8080", "0.333", true, Accept),
                row("10.244.1.3:8080", "0.333", true, Accept),
            ],
        ),
        f(
            "hairpin: a pod reaching itself through its service is masqueraded",
            "hello-service",
            false,
            pkt("10.244.1.3", "10.101.96.60", 80, Tcp, Interface),
            vec![
                row("10.244.0.131:8080", "0.333", false, Accept),
                row("10.244.1.131:8080", "0.333", false, Accept),
                row("10.244.1.3:8080", "0.333", true, Accept),
            ],
        ),
        f(
            "another port of the cluster IP is not captured",
            "hello-service",
            false,
            pkt("10.244.1.50", "10.101.96.60", 81, Tcp, Interface),
            vec![row("-", "1.000", false, Accept)],
        ),
        f(
            "NodePort 30080 from outside reaches both endpoints, source NATed",
            "nodeport",
            false,
            pkt("192.168.1.99", NODE1, 30080, Tcp, Interface),
            vec![
                row("10.244.1.3:8080", "0.500", true, Accept),
                row("10.244.2.3:8080", "0.500", true, Accept),
            ],
        ),
        f(
            "NodePort on an address that is not the node's is not captured",
            "nodeport",
            false,
            pkt("192.168.1.99", "192.168.1.77", 30080, Tcp, Interface),
            vec![row("-", "1.000", false, Accept)],
        ),
        f(
            "NodePort from the node's own loopback is not captured (localhost node ports off)",
            "nodeport",
            false,
            pkt("127.0.0.1", "127.0.0.1", 30080, Tcp, LocalProcess),
            vec![row("-", "1.000", false, Accept)],
        ),
        f(
            "externalIP from outside",
            "external-ips",
            false,
            pkt("192.168.1.99", "192.168.102.4", 34080, Tcp, Interface),
            vec![
                row("10.244.1.3:8080", "0.500", true, Accept),
                row("10.244.2.3:8080", "0.500", true, Accept),
            ],
        ),
        f(
            "no endpoints: the cluster IP is rejected at once",
            "no-endpoints",
            false,
            pkt("10.244.1.50", "10.97.33.14", 80, Tcp, Interface),
            vec![row("-", "1.000", false, Reject)],
        ),
        f(
            "no endpoints: the node port is rejected at once",
            "no-endpoints",
            false,
            pkt("192.168.1.99", NODE1, 31080, Tcp, Interface),
            vec![row("-", "1.000", false, Reject)],
        ),
        f(
            "no endpoints: the cluster IP from the node is rejected too",
            "no-endpoints",
            false,
            pkt(NODE1, "10.97.33.14", 80, Tcp, LocalProcess),
            vec![row("-", "1.000", false, Reject)],
        ),
        f(
            "LB IP with ETP Local: only the local endpoint, client address kept",
            "features",
            false,
            pkt("203.0.113.5", "192.168.1.240", 80, Tcp, Interface),
            vec![row("10.244.1.10:8080", "1.000", false, Accept)],
        ),
        f(
            "LB IP from outside loadBalancerSourceRanges is dropped",
            "features",
            false,
            pkt("198.51.100.1", "192.168.1.240", 80, Tcp, Interface),
            vec![row("-", "1.000", false, Drop)],
        ),
        f(
            "ETP Local NodePort with a local endpoint keeps the client address",
            "features",
            false,
            pkt("192.168.1.99", NODE1, 30800, Tcp, Interface),
            vec![row("10.244.1.10:8080", "1.000", false, Accept)],
        ),
        f(
            "ETP Local NodePort on a node without local endpoints is dropped",
            "features",
            true,
            pkt("192.168.1.99", NODE3, 30800, Tcp, Interface),
            vec![row("-", "1.000", false, Drop)],
        ),
        f(
            "ETP Local NodePort from a pod short-circuits to every endpoint",
            "features",
            true,
            pkt("10.244.3.5", NODE3, 30800, Tcp, Interface),
            vec![
                row("10.244.1.10:8080", "0.500", false, Accept),
                row("10.244.2.10:8080", "0.500", false, Accept),
            ],
        ),
        f(
            "ETP Local NodePort from the node itself is masqueraded to every endpoint",
            "features",
            true,
            pkt(NODE3, NODE3, 30800, Tcp, LocalProcess),
            vec![
                row("10.244.1.10:8080", "0.500", true, Accept),
                row("10.244.2.10:8080", "0.500", true, Accept),
            ],
        ),
        f(
            "health check node port is accepted",
            "features",
            false,
            pkt("192.168.1.99", NODE1, 32100, Tcp, Interface),
            vec![row("-", "1.000", false, Accept)],
        ),
        f(
            "ITP Local UDP goes to the node's own endpoint only",
            "features",
            false,
            pkt("10.244.1.50", "10.96.0.10", 53, Udp, Interface),
            vec![row("10.244.1.53:53", "1.000", false, Accept)],
        ),
        f(
            "ITP Local on a node without a local endpoint drops",
            "features",
            true,
            pkt("10.244.3.5", "10.96.0.10", 53, Udp, Interface),
            vec![row("-", "1.000", false, Drop)],
        ),
        f(
            "SCTP port of a multi-port service",
            "features",
            false,
            pkt("10.244.1.50", "10.96.0.10", 3868, Sctp, Interface),
            vec![row("10.244.1.53:3868", "1.000", false, Accept)],
        ),
        f(
            "terminating-but-serving endpoint is used when none is ready",
            "features",
            false,
            pkt("10.244.1.50", "10.96.7.7", 80, Tcp, Interface),
            vec![row("10.244.2.70:80", "1.000", false, Accept)],
        ),
        f(
            "headless service: traffic to a pod address is untouched",
            "features",
            false,
            pkt("10.244.1.50", "10.244.1.3", 80, Tcp, Interface),
            vec![row("-", "1.000", false, Accept)],
        ),
    ]
}

fn flow_node(flow: &Flow) -> NodeFacts {
    if flow.on_node3 {
        node3()
    } else {
        node_for(flow.scenario)
    }
}

fn check_flows(mode: Mode) {
    let mut failures = Vec::new();
    for flow in flows() {
        let node = flow_node(&flow);
        let (t, _) = tracer(mode, flow.scenario, &node);
        let got = summary(&t.trace(&flow.packet, &env(&node)));
        let want = match mode {
            Mode::Iptables => flow.want.clone(),
            Mode::Nftables => nft_want(&flow),
        };
        if got != want {
            failures.push(format!("{}:\n  want {want:?}\n  got  {got:?}", flow.what));
        }
    }
    assert!(failures.is_empty(), "{mode:?}:\n{}", failures.join("\n"));
}

fn check_affinity(mode: Mode) {
    let node = node_for("session-affinity");
    let (t, _) = tracer(mode, "session-affinity", &node);
    let p = pkt("10.10.0.6", "10.200.1.201", 9000, Tcp, Interface);
    let first = t.trace(&p, &env(&node));
    assert_eq!(first.len(), 3, "a new client is spread: {first:?}");
    let chosen = first
        .iter()
        .find(|o| o.dnat == Some(SocketAddrV4::new(ip("10.10.2.2"), 80)))
        .unwrap();
    let list = chosen
        .recent_set
        .clone()
        .expect("the endpoint chain records the client");
    let again = t.trace(
        &p,
        &Env {
            recent: [list].into(),
            ..env(&node)
        },
    );
    assert_eq!(
        summary(&again),
        vec![row("10.10.2.2:80", "1.000", false, Accept)]
    );
}

fn check_probabilities(mode: Mode) {
    for flow in flows() {
        let node = flow_node(&flow);
        let (t, _) = tracer(mode, flow.scenario, &node);
        let total: f64 = t
            .trace(&flow.packet, &env(&node))
            .iter()
            .map(|o| o.probability)
            .sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "{mode:?} {}: {total}",
            flow.what
        );
    }
}

/// Named `proxy` so that `cargo test -p tabby-proxy proxy` selects these tests.
mod proxy {
    use super::*;

    #[test]
    fn every_feature_flow_reaches_the_expected_endpoints() {
        check_flows(Mode::Iptables);
    }

    #[test]
    fn every_feature_flow_reaches_the_expected_endpoints_in_nftables_mode() {
        check_flows(Mode::Nftables);
    }

    #[test]
    fn session_affinity_sticks_to_the_endpoint_that_served_the_client_first() {
        check_affinity(Mode::Iptables);
    }

    #[test]
    fn session_affinity_sticks_to_the_endpoint_that_served_the_client_first_in_nftables_mode() {
        check_affinity(Mode::Nftables);
    }

    #[test]
    fn headless_and_externalname_services_produce_no_rules_in_either_mode() {
        for mode in [Mode::Iptables, Mode::Nftables] {
            let (_, text) = tracer(mode, "features", &node());
            assert!(!text.contains("hello-headless-service"), "{text}");
            assert!(!text.contains("search-engine"), "{text}");
        }
    }

    #[test]
    fn probabilities_of_every_flow_add_up_to_one_in_either_mode() {
        check_probabilities(Mode::Iptables);
        check_probabilities(Mode::Nftables);
    }
}
