use std::collections::BTreeMap;

use tabby_ipam::{Block, EncapMode, IpPool, Node};

use super::*;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}
fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A node on `underlay` (address/prefix) with, optionally, a VTEP.
fn node(name: &str, underlay: &str, vtep: Option<(&str, [u8; 6])>) -> Node {
    let underlay: IpNetwork = net(underlay);
    Node {
        name: name.into(),
        address: Some(underlay.ip()),
        ipv4_address: Some(underlay),
        ipv4_vxlan_tunnel_addr: vtep.map(|(ip, _)| v4(ip)),
        vxlan_tunnel_mac_addr: vtep.map(|(_, mac)| format_mac(mac)),
        ..Default::default()
    }
}

fn pool(name: &str, cidr: &str, ipip: EncapMode, vxlan: EncapMode) -> IpPool {
    IpPool {
        name: name.into(),
        cidr: net(cidr),
        block_size: 26,
        ipip_mode: ipip,
        vxlan_mode: vxlan,
        nat_outgoing: false,
        disabled: false,
        node_selector: "all()".into(),
    }
}

const MAC2: [u8; 6] = [0x66, 0, 0, 0, 0, 2];
const MAC3: [u8; 6] = [0x66, 0, 0, 0, 0, 3];

/// node-1 and node-2 on 10.98.0.0/24, node-3 on 10.99.0.0/24; one block
/// each of pool `p`, and node-3 holds one in pool `q` too.
fn view(p: (EncapMode, EncapMode), q: (EncapMode, EncapMode)) -> ClusterView {
    let mut v = ClusterView::default();
    v.snapshot.nodes = vec![
        node(
            "node-1",
            "10.98.0.1/24",
            Some(("10.244.0.0", [0x66, 0, 0, 0, 0, 1])),
        ),
        node("node-2", "10.98.0.2/24", Some(("10.244.0.64", MAC2))),
        node("node-3", "10.99.0.3/24", Some(("10.244.0.128", MAC3))),
    ];
    v.snapshot.pools = vec![
        pool("p", "10.244.0.0/16", p.0, p.1),
        pool("q", "10.245.0.0/16", q.0, q.1),
    ];
    v.snapshot.blocks = vec![
        Block::new(net("10.244.0.0/26"), Some("node-1")),
        Block::new(net("10.244.0.64/26"), Some("node-2")),
        Block::new(net("10.244.0.128/26"), Some("node-3")),
        Block::new(net("10.245.0.0/26"), Some("node-3")),
    ];
    v
}

const NEVER: (EncapMode, EncapMode) = (EncapMode::Never, EncapMode::Never);
const VXLAN: (EncapMode, EncapMode) = (EncapMode::Never, EncapMode::Always);
const VXLAN_CROSS: (EncapMode, EncapMode) = (EncapMode::Never, EncapMode::CrossSubnet);
const IPIP: (EncapMode, EncapMode) = (EncapMode::Always, EncapMode::Never);
const IPIP_CROSS: (EncapMode, EncapMode) = (EncapMode::CrossSubnet, EncapMode::Never);

fn routes(plan: &EncapPlan) -> BTreeMap<String, Hop> {
    (plan.routes.iter())
        .map(|(p, h)| (p.to_string(), *h))
        .collect()
}

#[test]
fn vxlan_always_routes_every_remote_block_through_the_remote_vtep() {
    let plan = plan(&view(VXLAN, NEVER), "node-1");
    assert_eq!(
        routes(&plan),
        BTreeMap::from([
            ("10.244.0.64/26".into(), Hop::Vxlan(v4("10.244.0.64"))),
            ("10.244.0.128/26".into(), Hop::Vxlan(v4("10.244.0.128"))),
        ]),
        "the local block has no route here, pool q is native"
    );
    assert_eq!(plan.devices, BTreeSet::from([Encap::Vxlan]));
    assert_eq!(
        plan.vteps,
        BTreeSet::from([
            Vtep {
                tunnel_ip: v4("10.244.0.64"),
                mac: MAC2,
                node_ip: v4("10.98.0.2")
            },
            Vtep {
                tunnel_ip: v4("10.244.0.128"),
                mac: MAC3,
                node_ip: v4("10.99.0.3")
            },
        ]),
        "one neighbour and FDB entry per remote node, none for ourselves"
    );
}

#[test]
fn vxlan_cross_subnet_encapsulates_only_towards_other_subnets() {
    let plan = plan(&view(VXLAN_CROSS, NEVER), "node-1");
    assert_eq!(
        routes(&plan),
        BTreeMap::from([("10.244.0.128/26".into(), Hop::Vxlan(v4("10.244.0.128")))]),
        "node-2 shares our subnet: native"
    );
    assert_eq!(plan.devices, BTreeSet::from([Encap::Vxlan]));
    let r = &plan.resolver;
    assert_eq!(
        r.resolve(net("10.244.0.64/26"), "10.98.0.2".parse().unwrap()),
        Hop::Native("10.98.0.2".parse().unwrap())
    );
    assert_eq!(
        r.resolve(net("10.244.0.130/32"), "10.99.0.3".parse().unwrap()),
        Hop::Vxlan(v4("10.244.0.128"))
    );
}

#[test]
fn ipip_routes_via_the_remote_node_address_always_or_across_subnets() {
    let always = plan(&view(IPIP, NEVER), "node-1");
    assert_eq!(
        routes(&always),
        BTreeMap::from([
            ("10.244.0.64/26".into(), Hop::Ipip(v4("10.98.0.2"))),
            ("10.244.0.128/26".into(), Hop::Ipip(v4("10.99.0.3"))),
        ])
    );
    assert_eq!(always.devices, BTreeSet::from([Encap::Ipip]));
    assert!(always.vteps.is_empty(), "no VXLAN pool, no VTEPs");
    let cross = plan(&view(IPIP_CROSS, NEVER), "node-1");
    assert_eq!(
        routes(&cross),
        BTreeMap::from([("10.244.0.128/26".into(), Hop::Ipip(v4("10.99.0.3")))])
    );
    assert_eq!(
        cross
            .resolver
            .resolve(net("10.244.0.128/26"), "10.99.0.3".parse().unwrap()),
        Hop::Ipip(v4("10.99.0.3"))
    );
}

#[test]
fn a_learned_ipip_prefix_goes_through_tunl0_even_from_a_node_the_datastore_lacks() {
    let plan = plan(&view(IPIP_CROSS, NEVER), "node-1");
    let r = &plan.resolver;
    let far: IpAddr = "10.97.0.9".parse().unwrap();
    let near: IpAddr = "10.98.0.9".parse().unwrap();
    assert_eq!(
        r.resolve(net("10.244.9.0/26"), far),
        Hop::Ipip(v4("10.97.0.9"))
    );
    assert_eq!(r.resolve(net("10.244.9.0/26"), near), Hop::Native(near));
    assert_eq!(
        r.resolve(net("10.250.0.0/26"), far),
        Hop::Native(far),
        "outside every pool: native"
    );
}

#[test]
fn never_needs_no_device_and_leaves_every_route_to_bgp() {
    let plan = plan(&view(NEVER, NEVER), "node-1");
    assert!(plan.routes.is_empty());
    assert!(plan.devices.is_empty());
    assert!(plan.vteps.is_empty());
    let nh: IpAddr = "10.99.0.3".parse().unwrap();
    assert_eq!(
        plan.resolver.resolve(net("10.244.0.128/26"), nh),
        Hop::Native(nh)
    );
}

#[test]
fn mixed_pools_route_each_block_by_its_own_pool() {
    let plan = plan(&view(IPIP, VXLAN), "node-2");
    assert_eq!(
        routes(&plan),
        BTreeMap::from([
            ("10.244.0.0/26".into(), Hop::Ipip(v4("10.98.0.1"))),
            ("10.244.0.128/26".into(), Hop::Ipip(v4("10.99.0.3"))),
            ("10.245.0.0/26".into(), Hop::Vxlan(v4("10.244.0.128"))),
        ])
    );
    assert_eq!(plan.devices, BTreeSet::from([Encap::Ipip, Encap::Vxlan]));
}

#[test]
fn a_node_without_a_tunnel_address_yet_gets_no_vxlan_route_or_vtep() {
    let mut v = view(VXLAN, NEVER);
    v.snapshot.nodes[2].ipv4_vxlan_tunnel_addr = None;
    let plan = plan(&v, "node-1");
    assert_eq!(
        routes(&plan),
        BTreeMap::from([("10.244.0.64/26".into(), Hop::Vxlan(v4("10.244.0.64")))])
    );
    assert_eq!(plan.vteps.len(), 1);
    let nh: IpAddr = "10.99.0.3".parse().unwrap();
    assert_eq!(
        plan.resolver.resolve(net("10.244.0.128/26"), nh),
        Hop::Native(nh),
        "what BGP learned stays native until the VTEP is known"
    );
}

#[test]
fn a_mode_change_moves_the_routes_with_it() {
    let vxlan = plan(&view(VXLAN, NEVER), "node-1");
    let never = plan(&view(NEVER, NEVER), "node-1");
    let ipip = plan(&view(IPIP, NEVER), "node-1");
    assert_ne!(vxlan.routes, never.routes);
    assert!(never.routes.is_empty());
    assert!(ipip.routes.values().all(|h| matches!(h, Hop::Ipip(_))));
    assert_eq!(ipip.routes.len(), vxlan.routes.len());
}

#[test]
fn an_unknown_local_subnet_counts_as_another_subnet() {
    let mut v = view(VXLAN_CROSS, NEVER);
    v.snapshot.nodes[0].ipv4_address = None;
    assert_eq!(plan(&v, "node-1").routes.len(), 2);
}

#[test]
fn addresses_borrowed_by_a_remote_node_are_routed_to_that_node() {
    let mut v = view(VXLAN, NEVER);
    let attrs = BTreeMap::from([("node".to_string(), "node-3".to_string())]);
    v.snapshot.blocks[1].assign(1, "k8s-pod-network.x", &attrs);
    let plan = plan(&v, "node-1");
    let borrowed = plan.routes.iter().find(|(p, _)| p.prefix() == 32);
    assert_eq!(
        borrowed.map(|(p, h)| (p.to_string(), *h)),
        Some(("10.244.0.64/32".into(), Hop::Vxlan(v4("10.244.0.128"))))
    );
}

#[test]
fn vtep_macs_are_stable_locally_administered_unicast_and_parse_back() {
    let a = mac_for_node("node-1");
    assert_eq!(a, mac_for_node("node-1"));
    assert_ne!(a, mac_for_node("node-2"));
    assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
    assert_eq!(parse_mac(&format_mac(a)), Some(a));
    assert_eq!(parse_mac("66:00:00:00:00"), None);
    assert_eq!(parse_mac("66:00:00:00:00:00:00"), None);
    assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
}

#[test]
fn the_enabled_encapsulations_ignore_ipv6_pools() {
    let mut v6 = pool("v6", "fd00::/64", EncapMode::Never, EncapMode::Always);
    v6.block_size = 122;
    assert!(enabled(&[v6]).is_empty());
}
