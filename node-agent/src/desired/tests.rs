use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tabby_ipam::resources::{BgpConfiguration, BgpPeer};
use tabby_ipam::{AffinityState, Block, BlockAffinity, Node};

use super::*;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str, addr: &str) -> Node {
    Node {
        name: name.into(),
        address: Some(ip(addr)),
        asn: None,
        labels: Default::default(),
        ..Default::default()
    }
}

fn view() -> ClusterView {
    let mut v = ClusterView::default();
    v.snapshot.nodes = vec![
        node("node-1", "10.98.0.1"),
        node("node-2", "10.98.0.2"),
        node("node-3", "10.98.0.3"),
    ];
    let mut b1 = Block::new(net("10.244.0.0/26"), Some("node-1"));
    let mut attrs = BTreeMap::new();
    attrs.insert("node".to_string(), "node-1".to_string());
    b1.assign(1, "k8s-pod-network.a", &attrs);
    let mut b2 = Block::new(net("10.244.0.64/26"), Some("node-2"));
    // node-1 borrowed one address of node-2's block.
    b2.assign(1, "k8s-pod-network.b", &attrs);
    v.snapshot.blocks = vec![b1, b2];
    v.snapshot.affinities = vec![
        BlockAffinity {
            node: "node-1".into(),
            cidr: net("10.244.0.0/26"),
            state: AffinityState::Confirmed,
        },
        BlockAffinity {
            node: "node-2".into(),
            cidr: net("10.244.0.64/26"),
            state: AffinityState::Confirmed,
        },
        BlockAffinity {
            node: "node-1".into(),
            cidr: net("10.244.0.128/26"),
            state: AffinityState::Pending,
        },
    ];
    v
}

#[test]
fn the_mesh_peers_with_every_other_node_that_has_an_address() {
    let mut v = view();
    v.snapshot.nodes.push(Node {
        name: "node-4".into(),
        address: None,
        asn: None,
        labels: Default::default(),
        ..Default::default()
    });
    let peers = desired_peers(&v, "node-1", ip("10.98.0.1"));
    let addrs: Vec<IpAddr> = peers.iter().map(|p| p.addr).collect();
    assert_eq!(addrs, vec![ip("10.98.0.2"), ip("10.98.0.3")]);
    assert!(peers
        .iter()
        .all(|p| p.peer_type == PeerType::NodeMesh && p.asn == 64512));
}

#[test]
fn turning_the_mesh_off_leaves_only_explicit_peers_global_and_our_own() {
    let mut v = view();
    v.bgp = BgpConfiguration {
        as_number: 64512,
        node_to_node_mesh: false,
    };
    let peer = |name: &str, addr: &str, node: Option<&str>| BgpPeer {
        name: name.into(),
        peer_ip: ip(addr),
        as_number: 65000,
        node: node.map(str::to_string),
        password: Some("s3cret".into()),
        filters: vec![],
        max_prefix: None,
    };
    v.peers = vec![
        peer("tor", "10.98.0.254", None),
        peer("mine", "10.98.0.100", Some("node-1")),
        peer("theirs", "10.98.0.101", Some("node-2")),
    ];
    let peers = desired_peers(&v, "node-1", ip("10.98.0.1"));
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0].addr, ip("10.98.0.100"));
    assert_eq!(peers[0].peer_type, PeerType::NodeSpecific);
    assert_eq!(peers[1].peer_type, PeerType::Global);
    assert_eq!(peers[1].password.as_deref(), Some("s3cret"));
    assert_eq!(PeerType::NodeSpecific.to_string(), "node specific");
}

#[test]
fn a_node_originates_its_confirmed_blocks_and_its_borrowed_addresses() {
    let v = view();
    let p = local_prefixes(&v, "node-1");
    assert!(p.contains(&net("10.244.0.0/26")));
    assert!(
        !p.contains(&net("10.244.0.128/26")),
        "a pending claim is not announced"
    );
    assert!(
        p.contains(&net("10.244.0.64/32")),
        "the borrowed address is announced as a /32: {p:?}"
    );
    let p2 = local_prefixes(&v, "node-2");
    assert_eq!(
        p2.into_iter().collect::<Vec<_>>(),
        vec![net("10.244.0.64/26")]
    );
}

#[test]
fn the_proxy_learns_the_node_address_its_blocks_and_the_first_enabled_pool() {
    let mut v = view();
    let pool = |cidr: &str, disabled: bool| tabby_ipam::IpPool {
        disabled,
        ..tabby_ipam::IpPool::new(cidr, net(cidr))
    };
    v.snapshot.pools = vec![pool("10.200.0.0/16", true), pool("10.244.0.0/16", false)];
    let facts = node_facts(&v, "node-1", ip("10.98.0.1"), None);
    assert_eq!(facts.name, "node-1");
    assert_eq!(
        facts.node_ips,
        vec!["10.98.0.1".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(facts.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
    assert_eq!(facts.pod_cidrs, vec!["10.244.0.0/26".parse().unwrap()]);
    let set = node_facts(
        &v,
        "node-1",
        ip("10.98.0.1"),
        Some("10.0.0.0/8".parse().unwrap()),
    );
    assert_eq!(
        set.cluster_cidr,
        Some("10.0.0.0/8".parse().unwrap()),
        "configured wins"
    );
}
