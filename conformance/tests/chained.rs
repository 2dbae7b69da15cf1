//! `tabby` with the upstream meta plugins v1.10 chained after it in one
//! cniVersion 1.1.0 conflist, through libcni v1.3.1: `portmap` (iptables-nft
//! backend), `bandwidth`, `tuning` and `firewall` (iptables-nft backend).
//!
//! The plugins' own behaviour is not what is tested; what is tested is that
//! tabby's result, passed on as prevResult, is what each of them needs:
//! portmap's DNAT reaches the pod from a client outside the node, bandwidth's
//! qdiscs land on tabby's host veth, tuning's sysctl lands in the pod, and
//! firewall's rules name the pod's address. ADD, CHECK, GC (which DELs a
//! stale attachment through the whole chain), STATUS, DEL and DEL again.
//!
//! The test runs in its own "host", client and pod namespaces with its own
//! datastore and libcni cache, so it runs in parallel with the others.

use std::net::{Ipv4Addr, SocketAddr};

use serde_json::{json, Value};
use tabby_conformance::{
    assert_gone, assert_tabby_pod, conflist, plugins_dir, ready, release_dir, result_ipv4,
    tabby_plugin, tcp_echo, unique_octet, Driver,
};
use tabby_testkit::netns::veth_pair;
use tabby_testkit::{run_ok, unique, Netns};

const HOST_PORT: u16 = 18080;
const POD_PORT: u16 = 8080;

/// The chain: tabby, then portmap, bandwidth, tuning, firewall.
fn chain(dir: &std::path::Path, cidr: &str) -> Value {
    conflist(
        "1.1.0",
        vec![
            tabby_plugin(dir, cidr),
            json!({"type": "portmap", "backend": "iptables", "snat": true,
                   "capabilities": {"portMappings": true}}),
            json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
            json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_ignore": "1"}}),
            json!({"type": "firewall", "backend": "iptables"}),
        ],
    )
}

/// The capability args a runtime passes for one pod.
fn capability_args() -> String {
    json!({
        "portMappings": [{"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 262_144,
                      "egressRate": 8_000_000, "egressBurst": 262_144},
    })
    .to_string()
}

/// Every iptables table of `host` (iptables-nft), as iptables-save prints it.
fn iptables(host: &Netns) -> String {
    let out = run_ok(&mut host.command("iptables-save"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts what portmap, bandwidth, tuning and firewall did for the pod at
/// `ip` whose host veth is `veth`.
fn assert_chain_applied(host: &Netns, pod: &Netns, client: &Netns, ip: Ipv4Addr, veth: &str) {
    let rules = iptables(host);
    assert!(
        rules.contains(&format!("--to-destination {ip}:{POD_PORT}")),
        "portmap did not DNAT {HOST_PORT} to {ip}:{POD_PORT}: {rules}"
    );
    assert!(
        rules
            .lines()
            .any(|l| l.starts_with("-A CNI-FORWARD") && l.contains(&ip.to_string())),
        "firewall added no CNI-FORWARD rule for {ip}: {rules}"
    );
    let node_ip: Ipv4Addr = "192.0.2.1".parse().unwrap();
    tcp_echo(
        pod,
        POD_PORT,
        client,
        SocketAddr::from((node_ip, HOST_PORT)),
    )
    .unwrap_or_else(|e| {
        panic!("portmap's DNAT of {node_ip}:{HOST_PORT} did not reach the pod: {e}")
    });

    let qdiscs = String::from_utf8_lossy(
        &run_ok(host.command("tc").args(["qdisc", "show", "dev", veth])).stdout,
    )
    .into_owned();
    assert!(
        qdiscs.contains("qdisc tbf"),
        "bandwidth put no tbf qdisc (ingress shaping) on tabby's host veth {veth}: {qdiscs}"
    );
    assert!(
        qdiscs.contains("qdisc ingress"),
        "bandwidth put no ingress qdisc (egress shaping) on tabby's host veth {veth}: {qdiscs}"
    );
    let sysctl = pod.exec_ok("sysctl", &["-n", "net.ipv4.conf.eth0.arp_ignore"]);
    assert_eq!(
        sysctl.trim(),
        "1",
        "tuning's sysctl net.ipv4.conf.eth0.arp_ignore=1 is not set in the pod"
    );
}

/// Asserts nothing of portmap's or firewall's rules names `ip` any more.
fn assert_no_rules_for(host: &Netns, ip: Ipv4Addr, id: &str) {
    let rules = iptables(host);
    let left: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains(&format!("{ip}")) || l.contains(id))
        .collect();
    assert!(left.is_empty(), "rules for {id} ({ip}) left: {left:#?}");
}

#[test]
fn tabby_chained_with_portmap_bandwidth_tuning_firewall_add_check_gc_del() {
    if !ready("tabby_chained_with_portmap_bandwidth_tuning_firewall_add_check_gc_del") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("tcf-ch-host");
    let (pod, stale_pod, client) = (
        Netns::new("tcf-ch-pod"),
        Netns::new("tcf-ch-old"),
        Netns::new("tcf-ch-cli"),
    );
    // A client outside the node: 192.0.2.2 -> the node's 192.0.2.1.
    let uplink = unique("up");
    veth_pair(
        &host,
        &uplink,
        "192.0.2.1/24",
        &client,
        "eth0",
        "192.0.2.2/24",
    );
    // The node's default route (proxy ARP answers for 169.254.1.1 only when
    // the node has a route to it).
    host.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.0.2.2",
        "dev",
        &uplink,
    ]);
    host.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);

    let cidr = format!("10.{}.0.0/16", unique_octet());
    let cni = Driver::new(
        &host,
        dir.path(),
        &chain(dir.path(), &cidr),
        &[&release_dir(), &plugins_dir()],
    );
    let (id, stale) = (unique("chain"), unique("stale"));
    let caps = capability_args();
    let extra = ["--capability-args", caps.as_str()];

    let result = cni.add(&pod, &id, &extra);
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"));
    let veth = assert_tabby_pod(&host, &pod, ip);
    assert_chain_applied(&host, &pod, &client, ip, &veth);
    cni.check(&pod, &id, &extra);

    // A second pod without port mappings, then forgotten by the runtime:
    // GC with only the first one valid DELs it through the whole chain.
    let links_before = host.links();
    let stale_result = cni.add(&stale_pod, &stale, &[]);
    let stale_ip =
        result_ipv4(&stale_result).unwrap_or_else(|| panic!("no IPv4 in {stale_result}"));
    cni.gc(&[(id.as_str(), "eth0")]);
    let store = dir.path().join("datastore");
    let keep: Vec<&str> = links_before.iter().map(String::as_str).collect();
    assert_gone_but(&host, &stale_pod, stale_ip, &store, &stale, &keep);
    assert_no_rules_for(&host, stale_ip, &stale);
    assert_chain_applied(&host, &pod, &client, ip, &veth);
    cni.check(&pod, &id, &extra);

    let status = cni.status();
    assert!(
        status.status.success(),
        "STATUS of the chain failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    cni.del(&pod, &id, &extra);
    host.ip(&["link", "del", &uplink]);
    assert_gone(&host, &pod, ip, &store, &id);
    assert_no_rules_for(&host, ip, &id);
    // A second DEL must succeed too.
    cni.del(&pod, &id, &extra);
}

/// [`assert_gone`] for one pod while other links (`keep`) stay in `host`.
fn assert_gone_but(
    host: &Netns,
    pod: &Netns,
    ip: Ipv4Addr,
    store: &std::path::Path,
    id: &str,
    keep: &[&str],
) {
    let extra: Vec<String> = host
        .links()
        .into_iter()
        .filter(|l| l != "lo" && !keep.contains(&l.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "links of {id} left in the host: {extra:?}"
    );
    assert!(
        !pod.links().iter().any(|l| l == "eth0"),
        "pod {id} still has eth0"
    );
    let routes = host.ip(&["-4", "route", "show"]);
    assert!(
        !routes.contains(&format!("{ip} ")),
        "host still routes {ip}: {routes}"
    );
    let left = tabby_conformance::files_mentioning(store, id);
    assert!(
        left.is_empty(),
        "allocation for {id} still recorded in {left:?}"
    );
}
