use std::sync::Arc;

use super::*;
use crate::model::{Endpoint, NodeFacts, Protocol, ServiceKey, ServicePortInfo};
use crate::rules::{port_key, Ctx, ProxyOptions};

fn node() -> NodeFacts {
    NodeFacts {
        name: "node1".into(),
        node_ips: vec!["192.168.1.11".parse().unwrap()],
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        pod_cidrs: vec![],
    }
}

fn ep(ip: &str, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        is_local: local,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn info(name: &str, eps: Vec<Endpoint>) -> ServicePortInfo {
    ServicePortInfo {
        service: ServiceKey {
            namespace: "default".into(),
            name: name.into(),
        },
        port_name: "http".into(),
        name: format!("default/{name}:http"),
        protocol: Protocol::Tcp,
        cluster_ip: "10.96.0.10".parse().unwrap(),
        port: 80,
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        endpoints: eps,
    }
}

fn plan_of(info: ServicePortInfo) -> NftPort {
    let (node, opts) = (node(), ProxyOptions::default());
    let ctx = Ctx {
        node: &node,
        opts: &opts,
        large_cluster: false,
    };
    plan_port(info, &ctx, &mut Slots::default())
}

fn texts(c: &Chain) -> Vec<String> {
    c.rules.iter().map(ToString::to_string).collect()
}

fn chain<'a>(p: &'a NftPort, prefix: &str) -> &'a Chain {
    p.chains
        .iter()
        .find(|c| c.name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} chain in {:?}", p.chains))
}

fn element(p: &NftPort, set: &str) -> Option<String> {
    p.elements
        .iter()
        .find(|e| e.set == set)
        .map(ToString::to_string)
}

/// A plan of `ports`, their ranges handed out by one allocator in key order (as a full sync does).
fn whole(ports: Vec<ServicePortInfo>) -> NftPlan {
    let (node, opts) = (node(), ProxyOptions::default());
    let ctx = Ctx {
        node: &node,
        opts: &opts,
        large_cluster: false,
    };
    let sorted: std::collections::BTreeMap<_, _> =
        ports.into_iter().map(|i| (port_key(&i), i)).collect();
    let mut plan = NftPlan::empty(&opts);
    let mut slots = Slots::default();
    for (k, i) in sorted {
        plan.ports
            .insert(k, Arc::new(plan_port(i, &ctx, &mut slots)));
    }
    plan
}

#[test]
fn a_service_with_endpoints_is_dispatched_from_service_ips_to_its_service_chain() {
    let p = plan_of(info("web", vec![ep("10.244.1.3", false)]));
    let svc = chain(&p, "service-");
    assert!(svc.name.ends_with("-default/web/tcp/http"), "{}", svc.name);
    assert_eq!(
        element(&p, SERVICE_IPS).unwrap(),
        format!("10.96.0.10 . tcp . 80 : goto {}", svc.name)
    );
    assert_eq!(element(&p, CLUSTER_IPS).unwrap(), "10.96.0.10");
    assert_eq!(element(&p, NO_ENDPOINT_SERVICES), None);
}

#[test]
fn endpoints_are_picked_by_numgen_from_the_service_slots_of_an_endpoint_map() {
    let eps = vec![
        ep("10.244.1.3", false),
        ep("10.244.1.4", false),
        ep("10.244.2.5", false),
    ];
    let p = plan_of(info("web", eps));
    let rules = texts(chain(&p, "service-"));
    assert_eq!(
        rules,
        [
            "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
            "meta l4proto tcp dnat ip to numgen random mod 3 map @endpoints-tcp-000",
        ]
    );
    let slots: Vec<String> = p
        .elements
        .iter()
        .filter(|e| e.set == "endpoints-tcp-000")
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        slots,
        [
            "0 : 10.244.1.3 . 8080",
            "1 : 10.244.1.4 . 8080",
            "2 : 10.244.2.5 . 8080"
        ]
    );
    assert!(
        p.chains.iter().all(|c| !c.name.starts_with("endpoint-")),
        "no chain per endpoint without affinity"
    );
}

#[test]
fn each_dispatch_chain_keeps_its_own_range_while_its_endpoints_change() {
    let key = |name: &str| (port_key(&info(name, vec![])), false);
    let mut slots = Slots::default();
    assert_eq!(slots.range(&key("a"), 3), 0);
    assert_eq!(slots.range(&key("b"), 20), 16);
    assert_eq!(slots.range(&key("a"), 16), 0, "still fits");
    assert_eq!(slots.range(&key("a"), 17), 48, "grows: a new range");
    assert_eq!(slots.range(&key("c"), 1), 0, "the old one is reused");
    slots.retain(|k| k.0.name != "b");
    assert_eq!(slots.range(&key("d"), 32), 16, "b's range is free again");
    assert_eq!(shard_name(Protocol::Tcp, 0), "endpoints-tcp-000");
    assert_eq!(
        shard_name(Protocol::Tcp, SHARDS[0] + 1),
        "endpoints-tcp-001"
    );
    assert_eq!(shard_name(Protocol::Sctp, 17), "endpoints-sctp-001");
}

#[test]
fn endpoints_are_in_the_hairpin_set_and_masquerading_marks_hairpin_connections() {
    let p = plan_of(info("web", vec![ep("10.244.1.3", false)]));
    let hairpin: Vec<String> = p
        .elements
        .iter()
        .filter(|e| e.set == HAIRPIN)
        .map(ToString::to_string)
        .collect();
    assert_eq!(hairpin, ["10.244.1.3 . 10.244.1.3"]);
    let fixed = fixed_chains(&ProxyOptions::default());
    let masq = fixed.iter().find(|c| c.name == MASQUERADING).unwrap();
    assert_eq!(
        masq.rules[0].to_string(),
        "ct status dnat ip saddr . ip daddr @hairpin meta mark set meta mark | 0x00004000"
    );
}

#[test]
fn a_service_without_endpoints_is_rejected_at_once() {
    let mut i = info("empty", vec![]);
    i.node_port = Some(30080);
    let p = plan_of(i);
    assert!(p.chains.is_empty(), "{:?}", p.chains);
    assert_eq!(
        element(&p, NO_ENDPOINT_SERVICES).unwrap(),
        "10.96.0.10 . tcp . 80 : goto reject-chain"
    );
    assert_eq!(
        element(&p, NO_ENDPOINT_NODEPORTS).unwrap(),
        "tcp . 30080 : goto reject-chain"
    );
    assert_eq!(element(&p, SERVICE_IPS), None);
}

#[test]
fn internal_policy_local_without_a_local_endpoint_drops_instead_of_rejecting() {
    let mut i = info("dns", vec![ep("10.244.2.53", false)]);
    i.internal_policy_local = true;
    let p = plan_of(i);
    assert_eq!(
        element(&p, NO_ENDPOINT_SERVICES).unwrap(),
        "10.96.0.10 . tcp . 80 : drop"
    );
}

#[test]
fn external_policy_local_short_circuits_pods_and_the_node_then_goes_to_local_endpoints() {
    let mut i = info(
        "lb",
        vec![ep("10.244.1.10", true), ep("10.244.2.10", false)],
    );
    i.node_port = Some(30800);
    i.external_policy_local = true;
    let p = plan_of(i);
    let ext = texts(chain(&p, "external-"));
    let svc = &chain(&p, "service-").name;
    let local = &chain(&p, "local-").name;
    assert_eq!(
        ext,
        [
            format!("ip saddr 10.244.0.0/16 goto {svc}"),
            "fib saddr type local jump mark-for-masquerade".to_string(),
            format!("fib saddr type local goto {svc}"),
            format!("goto {local}"),
        ]
    );
    assert_eq!(texts(chain(&p, "local-")).len(), 1, "one local endpoint");
}

#[test]
fn session_affinity_checks_each_endpoint_set_before_the_spread_and_updates_it_on_dnat() {
    let mut i = info(
        "sticky",
        vec![ep("10.244.1.3", false), ep("10.244.1.4", false)],
    );
    i.affinity_timeout = Some(30);
    let p = plan_of(i);
    assert_eq!(p.affinity.len(), 2);
    assert_eq!(p.affinity[0].timeout, 30);
    let svc = texts(chain(&p, "service-"));
    let set = &p.affinity[0].name;
    assert!(
        svc[1].starts_with(&format!("ip saddr @{set} goto endpoint-")),
        "{svc:?}"
    );
    let epc = texts(chain(&p, "endpoint-"));
    assert_eq!(epc[1], format!("update @{set} {{ ip saddr }}"));
}

#[test]
fn load_balancer_source_ranges_return_allowed_sources_and_drop_the_rest() {
    let mut i = info("lb", vec![ep("10.244.1.10", false)]);
    i.load_balancer_ips = vec!["192.168.1.240".parse().unwrap()];
    i.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let p = plan_of(i);
    let fw = chain(&p, "firewall-");
    assert_eq!(texts(fw), ["ip saddr 203.0.113.0/24 return", "drop"]);
    assert_eq!(
        element(&p, FIREWALL_IPS).unwrap(),
        format!("192.168.1.240 . tcp . 80 : goto {}", fw.name)
    );
}

#[test]
fn node_ports_are_captured_only_on_local_addresses_other_than_loopback() {
    let fixed = fixed_chains(&ProxyOptions::default());
    let services = fixed.iter().find(|c| c.name == SERVICES).unwrap();
    assert_eq!(
        texts(services),
        [
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
        ]
    );
    let post = fixed.iter().find(|c| c.name == "nat-postrouting").unwrap();
    assert_eq!(post.hook.unwrap().priority, 100);
    let out = fixed.iter().find(|c| c.name == "nat-output").unwrap();
    assert_eq!(
        out.hook.unwrap().to_string(),
        "type nat hook output priority -100 ; policy accept ;"
    );
}

#[test]
fn the_masquerade_mark_is_the_iptables_mode_bit() {
    let fixed = fixed_chains(&ProxyOptions::default());
    let m = fixed.iter().find(|c| c.name == MASQUERADING).unwrap();
    assert_eq!(
        texts(m),
        [
            "ct status dnat ip saddr . ip daddr @hairpin meta mark set meta mark | 0x00004000",
            "meta mark & 0x00004000 == 0x00000000 return",
            "meta mark set meta mark ^ 0x00004000",
            "masquerade fully-random",
        ]
    );
}

#[test]
fn a_full_payload_rewrites_the_table_without_deleting_it_and_drops_stale_objects() {
    let plan = whole(vec![info("web", vec![ep("10.244.1.3", false)])]);
    let kernel = NftKernel {
        chains: ["services".to_string(), "endpoint-OLD".to_string()].into(),
        affinity: [("affinity-OLD".to_string(), Some(30))].into(),
    };
    let text = render_full(&plan, &kernel).text;
    assert!(text.starts_with("add table ip tabby-proxy\n"), "{text}");
    assert!(!text.contains("delete table"), "{text}");
    assert!(
        text.contains("flush chain ip tabby-proxy endpoint-OLD\n"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "delete chain ip tabby-proxy endpoint-OLD\ndelete set ip tabby-proxy affinity-OLD\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("flush map ip tabby-proxy service-ips\n"),
        "{text}"
    );
    assert!(text.contains("add map ip tabby-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; elements = { 10.96.0.10 . tcp . 80 : goto service-"), "{text}");
}

#[test]
fn a_full_payload_keeps_affinity_sets_whose_timeout_did_not_change() {
    let mut i = info("sticky", vec![ep("10.244.1.3", false)]);
    i.affinity_timeout = Some(30);
    let plan = whole(vec![i]);
    let set = plan.affinity_sets().next().unwrap().name.clone();
    let same = NftKernel {
        chains: Default::default(),
        affinity: [(set.clone(), Some(30))].into(),
    };
    let text = render_full(&plan, &same).text;
    assert!(!text.contains("delete set"), "{text}");
    assert!(
        !text.contains(&format!("flush set ip tabby-proxy {set}")),
        "{text}"
    );
    let changed = NftKernel {
        affinity: [(set.clone(), Some(60))].into(),
        ..same
    };
    assert!(render_full(&plan, &changed)
        .text
        .contains(&format!("delete set ip tabby-proxy {set}\n")));
}

#[test]
fn a_partial_payload_without_changes_is_empty() {
    let plan = whole(vec![info("web", vec![ep("10.244.1.3", false)])]);
    assert_eq!(render_partial(&plan, &plan.clone()).text, "");
}

#[test]
fn a_partial_payload_after_one_endpoint_change_is_element_operations_only() {
    let other = info("other", vec![ep("10.244.9.9", false)]);
    let two = |second| info("web", vec![ep("10.244.1.3", false), ep(second, false)]);
    let before = whole(vec![two("10.244.1.4"), other.clone()]);
    let after = whole(vec![two("10.244.1.5"), other]);
    let text = render_partial(&before, &after).text;
    assert_eq!(
        text,
        "delete element ip tabby-proxy endpoints-tcp-001 { 17 }\n\
         delete element ip tabby-proxy hairpin { 10.244.1.4 . 10.244.1.4 }\n\
         add set ip tabby-proxy hairpin { type ipv4_addr . ipv4_addr ; elements = { 10.244.1.5 . 10.244.1.5 } ; }\n\
         add map ip tabby-proxy endpoints-tcp-001 { typeof numgen random mod 1 : ip daddr . tcp dport ; elements = { 17 : 10.244.1.5 . 8080 } ; }\n"
    );
}

#[test]
fn a_partial_payload_keeps_a_hairpin_pair_another_service_still_uses() {
    let shared = || ep("10.244.1.3", false);
    let before = whole(vec![
        info("web", vec![shared()]),
        info("other", vec![shared()]),
    ]);
    let after = whole(vec![
        info("web", vec![ep("10.244.1.4", false)]),
        info("other", vec![shared()]),
    ]);
    let text = render_partial(&before, &after).text;
    assert!(
        !text.contains("delete element ip tabby-proxy hairpin"),
        "{text}"
    );
    assert!(text.contains("10.244.1.4 . 10.244.1.4"), "{text}");
}

#[test]
fn a_partial_payload_after_the_endpoint_count_changes_rewrites_only_that_chain() {
    let before = whole(vec![info("web", vec![ep("10.244.1.3", false)])]);
    let after = whole(vec![info(
        "web",
        vec![ep("10.244.1.3", false), ep("10.244.1.4", false)],
    )]);
    let text = render_partial(&before, &after).text;
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("flush chain ip tabby-proxy service-"),
        "{text}"
    );
    assert_eq!(
        lines[3],
        "add map ip tabby-proxy endpoints-tcp-000 { typeof numgen random mod 1 : ip daddr . tcp dport ; }",
        "the map the rule names is declared first: {text}"
    );
    assert!(
        lines[4].ends_with(
            "meta l4proto tcp dnat ip to numgen random mod 2 map @endpoints-tcp-000 ; }"
        ),
        "{text}"
    );
    assert!(!text.contains("delete"), "{text}");
}

#[test]
fn a_partial_payload_moves_a_service_from_reject_to_dispatch_when_endpoints_appear() {
    let before = whole(vec![info("web", vec![])]);
    let after = whole(vec![info("web", vec![ep("10.244.1.3", false)])]);
    let text = render_partial(&before, &after).text;
    assert!(
        text.contains(
            "delete element ip tabby-proxy no-endpoint-services { 10.96.0.10 . tcp . 80 }\n"
        ),
        "{text}"
    );
    assert!(text.contains("add map ip tabby-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; elements = { 10.96.0.10 . tcp . 80 : goto service-"), "{text}");
    assert!(
        !text.contains("cluster-ips"),
        "the cluster IP stays: {text}"
    );
}

#[test]
fn the_kernel_state_lists_only_tabby_chains_and_affinity_sets() {
    let chains = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
        {"chain": {"family": "ip", "table": "tabby-proxy", "name": "services", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 2}}]}"#;
    let sets = r#"{"nftables": [{"set": {"family": "ip", "name": "cluster-ips", "table": "tabby-proxy", "type": "ipv4_addr"}},
        {"set": {"family": "ip", "name": "affinity-X", "table": "tabby-proxy", "type": "ipv4_addr", "timeout": 30}}]}"#;
    let k = parse_kernel(chains, sets).unwrap();
    assert_eq!(k.chains, ["services".to_string()].into());
    assert_eq!(k.affinity, [("affinity-X".to_string(), Some(30))].into());
    assert!(parse_kernel("not json", sets).is_err());
}

#[test]
fn a_partial_payload_after_the_endpoint_set_shrinks_deletes_the_slots_left_over() {
    let four: Vec<Endpoint> = (1..=4)
        .map(|i| ep(&format!("10.244.1.{i}"), false))
        .collect();
    let before = whole(vec![info("web", four.clone())]);
    let after = whole(vec![info("web", four[..2].to_vec())]);
    let payload = render_partial(&before, &after);
    let text = &payload.text;
    assert!(
        text.contains("delete element ip tabby-proxy endpoints-tcp-000 { 2, 3 }"),
        "{text}"
    );
    assert!(
        text.contains("delete element ip tabby-proxy hairpin { 10.244.1.3 . 10.244.1.3, 10.244.1.4 . 10.244.1.4 }"),
        "{text}"
    );
    assert!(
        text.contains("numgen random mod 2 map @endpoints-tcp-000"),
        "{text}"
    );
}
