use tabby_ipam::{IpPool, Node};

use super::*;

fn pool(name: &str, cidr: &str, nat: bool, disabled: bool) -> IpPool {
    IpPool {
        name: name.into(),
        cidr: cidr.parse().unwrap(),
        block_size: 26,
        ipip_mode: Default::default(),
        vxlan_mode: Default::default(),
        nat_outgoing: nat,
        disabled,
        node_selector: "all()".into(),
    }
}

fn node(name: &str, address: Option<&str>, underlay: Option<&str>) -> Node {
    Node {
        name: name.into(),
        address: address.map(|a| a.parse().unwrap()),
        ipv4_address: underlay.map(|u| u.parse().unwrap()),
        ..Default::default()
    }
}

fn nets(list: &[&str]) -> BTreeSet<Ipv4Network> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn view(pools: Vec<IpPool>, nodes: Vec<Node>) -> ClusterView {
    let mut v = ClusterView::default();
    v.snapshot.pools = pools;
    v.snapshot.nodes = nodes;
    v
}

#[test]
fn masq_pools_are_those_asking_for_it_and_all_pools_are_every_ipv4_pool() {
    let v = view(
        vec![
            pool("a", "10.244.0.0/16", true, false),
            pool("b", "10.245.0.0/16", false, false),
            pool("old", "10.246.0.0/16", true, true),
            pool("v6", "fd00:10::/48", true, false),
        ],
        vec![],
    );
    let p = plan(&v);
    assert_eq!(p.masq_pools, nets(&["10.244.0.0/16", "10.246.0.0/16"]));
    assert_eq!(
        p.all_pools,
        nets(&["10.244.0.0/16", "10.245.0.0/16", "10.246.0.0/16"])
    );
    assert!(p.wanted());
}

#[test]
fn hosts_are_every_node_address_v4_once_and_unregistered_nodes_add_nothing() {
    let v = view(
        vec![pool("a", "10.244.0.0/16", true, false)],
        vec![
            node("n1", Some("10.98.0.1"), Some("10.98.0.1/24")),
            node("n2", Some("10.99.0.2"), Some("10.99.0.2/24")),
            node("n3", None, None),
            node("n6", Some("fd00::6"), None),
        ],
    );
    let hosts: Vec<String> = plan(&v).hosts.iter().map(ToString::to_string).collect();
    assert_eq!(hosts, ["10.98.0.1", "10.99.0.2"]);
}

#[test]
fn no_pool_asking_for_nat_wants_nothing() {
    let v = view(
        vec![pool("a", "10.244.0.0/16", false, false)],
        vec![node("n1", Some("10.98.0.1"), None)],
    );
    assert!(!plan(&v).wanted());
    assert!(!plan(&ClusterView::default()).wanted());
}

#[test]
fn the_rule_masquerades_masq_pools_leaving_pools_and_hosts_randomly_when_it_can() {
    assert_eq!(
        rule(true),
        "-A TABBY-NAT-OUTGOING -m set --match-set tabby-masq-ipam-pools src \
         -m set ! --match-set tabby-all-ipam-pools dst \
         -m set ! --match-set tabby-all-hosts-net dst -j MASQUERADE --random-fully"
    );
    assert!(rule(false).ends_with("-j MASQUERADE"));
}

#[test]
fn the_rules_payload_flushes_the_chain_and_leaves_exactly_one_jump() {
    let jump = "-A POSTROUTING -m comment --comment \"tabby nat outgoing\" -j TABBY-NAT-OUTGOING";
    let fresh = rules_payload(true, 0);
    assert!(fresh.starts_with("*nat\n:TABBY-NAT-OUTGOING - [0:0]\n-A TABBY-NAT-OUTGOING "));
    assert!(fresh.contains(jump), "{fresh}");
    assert!(fresh.ends_with("COMMIT\n"));
    let again = rules_payload(true, 1);
    assert!(!again.contains("POSTROUTING"), "{again}");
    let doubled = rules_payload(true, 3);
    assert_eq!(doubled.matches("-D POSTROUTING").count(), 2, "{doubled}");
}

#[test]
fn sets_are_refilled_through_a_swapped_temporary() {
    let v = view(
        vec![pool("a", "10.244.0.0/16", true, false)],
        vec![node("n1", Some("10.98.0.1"), None)],
    );
    let out = ipset_payload(&plan(&v));
    let masq: Vec<&str> = out.lines().take(6).collect();
    assert_eq!(
        masq,
        [
            "create tabby-masq-ipam-pools hash:net family inet -exist",
            "create tabby-masq-ipam-pools-tmp hash:net family inet -exist",
            "flush tabby-masq-ipam-pools-tmp",
            "add tabby-masq-ipam-pools-tmp 10.244.0.0/16",
            "swap tabby-masq-ipam-pools-tmp tabby-masq-ipam-pools",
            "destroy tabby-masq-ipam-pools-tmp",
        ]
    );
    assert!(out.contains("create tabby-all-hosts-net hash:ip family inet -exist\n"));
    assert!(out.contains("add tabby-all-hosts-net-tmp 10.98.0.1\n"));
}

#[test]
fn removal_drops_the_jumps_then_the_chain_and_only_existing_sets() {
    let out = removal_payload(2, true);
    assert_eq!(out.matches("-D POSTROUTING").count(), 2);
    let (d, x) = (
        out.find("-D POSTROUTING").unwrap(),
        out.find("-X TABBY-NAT-OUTGOING").unwrap(),
    );
    assert!(d < x, "{out}");
    assert_eq!(removal_payload(0, false), "*nat\nCOMMIT\n");
    let sets = ipset_removal(&["tabby-all-ipam-pools".into(), "other".into()]);
    assert_eq!(sets, "destroy tabby-all-ipam-pools\n");
}
