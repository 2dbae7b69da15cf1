//! The import policy against a small cluster: pools, nodes, peers, filters.

use super::*;
use tabby_ipam::resources::PrefixLength;
use tabby_ipam::{IpPool, Node};

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const MESH: &str = "10.98.0.2";
const ROUTER: &str = "10.98.0.254";
const RR_NODE: &str = "10.97.0.9";

fn bgp_peer(name: &str, addr: &str, filters: &[&str]) -> BgpPeer {
    BgpPeer {
        name: name.into(),
        peer_ip: ip(addr),
        as_number: 65000,
        node: None,
        password: None,
        filters: filters.iter().map(|f| f.to_string()).collect(),
        max_prefix: None,
    }
}

fn view(filters: &[&str]) -> ClusterView {
    let mut v = ClusterView::default();
    v.snapshot.pools = vec![IpPool::new("default", net("10.244.0.0/16"))];
    v.snapshot.nodes = ["10.98.0.1", MESH, RR_NODE]
        .iter()
        .enumerate()
        .map(|(i, a)| Node {
            name: format!("node-{}", i + 1),
            address: Some(ip(a)),
            asn: None,
            labels: Default::default(),
            ..Default::default()
        })
        .collect();
    v.peers = vec![
        bgp_peer("tor", ROUTER, filters),
        bgp_peer("rr", RR_NODE, &[]),
    ];
    v.filters = vec![
        BgpFilter {
            name: "allow-default".into(),
            import_v4: vec![BgpFilterRule {
                action: FilterAction::Accept,
                cidr: Some("0.0.0.0/0".parse().unwrap()),
                match_operator: Some(MatchOperator::Equal),
                prefix_length: None,
            }],
            export_v4: vec![],
        },
        BgpFilter {
            name: "no-small".into(),
            import_v4: vec![BgpFilterRule {
                action: FilterAction::Reject,
                cidr: Some("0.0.0.0/0".parse().unwrap()),
                match_operator: Some(MatchOperator::In),
                prefix_length: Some(PrefixLength {
                    min: Some(25),
                    max: None,
                }),
            }],
            export_v4: vec![BgpFilterRule {
                action: FilterAction::Reject,
                cidr: None,
                match_operator: None,
                prefix_length: None,
            }],
        },
    ];
    v
}

fn policy(filters: &[&str]) -> ImportPolicy {
    let peers = BTreeMap::from([
        (ip(MESH), PeerType::NodeMesh),
        (ip(ROUTER), PeerType::Global),
        (ip(RR_NODE), PeerType::Global),
    ]);
    ImportPolicy::new(&view(filters), "node-1", &peers, &[net("10.98.0.1/24")])
}

#[test]
fn external_peers_give_no_default_route_no_pool_prefix_and_no_underlay() {
    let p = policy(&[]);
    let from_router = |s: &str| p.accepts(ip(ROUTER), &net(s));
    assert!(!from_router("0.0.0.0/0"), "default route");
    assert!(!from_router("10.244.1.64/26"), "another node's block");
    assert!(!from_router("10.244.7.7/32"), "a borrowed address");
    assert!(!from_router("10.244.0.0/16"), "the pool itself");
    assert!(!from_router("10.0.0.0/8"), "a prefix that covers the pool");
    assert!(!from_router("10.98.0.0/24"), "the uplink subnet");
    assert!(!from_router("10.98.0.0/25"), "inside the uplink subnet");
    assert!(!from_router("10.97.0.9/32"), "a node's address");
    assert!(from_router("192.0.2.0/24"));
    assert!(
        from_router("10.96.0.0/12"),
        "service CIDRs and other networks"
    );
    assert!(
        !from_router("0.0.0.0/1"),
        "half a default route, over the pool"
    );
    assert!(from_router("128.0.0.0/1"));
}

#[test]
fn tabby_nodes_give_only_prefixes_inside_the_pools() {
    let p = policy(&[]);
    for peer in [MESH, RR_NODE] {
        let from = |s: &str| p.accepts(ip(peer), &net(s));
        assert!(from("10.244.1.64/26"), "{peer}: a block");
        assert!(from("10.244.7.7/32"), "{peer}: a borrowed address");
        assert!(!from("0.0.0.0/0"), "{peer}: default route");
        assert!(!from("192.0.2.0/24"), "{peer}: outside the pools");
        assert!(!from("10.0.0.0/8"), "{peer}: larger than the pool");
    }
}

#[test]
fn filter_rules_come_first_in_the_order_the_peer_names_its_filters() {
    let p = policy(&["allow-default", "no-small"]);
    let from_router = |s: &str| p.accepts(ip(ROUTER), &net(s));
    assert!(from_router("0.0.0.0/0"), "allowed by allow-default");
    assert!(!from_router("192.0.2.0/25"), "rejected by no-small");
    assert!(from_router("192.0.2.0/24"), "no rule: the default");
    assert!(!from_router("10.244.1.64/26"), "no rule: the default");
    // The mesh peer has no filters.
    assert!(!p.accepts(ip(MESH), &net("0.0.0.0/0")));
}

#[test]
fn a_missing_filter_adds_no_rule_and_unknown_peers_give_nothing() {
    let p = policy(&["deleted-meanwhile"]);
    assert!(!p.accepts(ip(ROUTER), &net("0.0.0.0/0")));
    assert!(p.accepts(ip(ROUTER), &net("192.0.2.0/24")));
    assert!(!p.accepts(ip("10.1.1.1"), &net("192.0.2.0/24")));
}

#[test]
fn export_rules_reach_the_peer_spec() {
    let v = view(&["no-small"]);
    let peers = crate::desired::desired_peers(&v, "node-1", ip("10.98.0.1"));
    let tor = peers.iter().find(|p| p.addr == ip(ROUTER)).unwrap();
    assert_eq!(
        tor.export,
        vec![Rule {
            action: Action::Reject,
            prefix: None
        }]
    );
    let mesh = peers.iter().find(|p| p.addr == ip(MESH)).unwrap();
    assert!(mesh.export.is_empty());
}
