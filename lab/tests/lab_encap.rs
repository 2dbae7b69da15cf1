//! Encapsulation and egress in the lab (root only; each test has a lab of
//! its own, torn down on drop): VXLAN Always and CrossSubnet across two
//! underlay subnets, a pool's mode switched while the pods keep running,
//! natOutgoing towards the "internet", the pods' MTU from their agent's
//! MTU file, and `--encap ipip` on a kernel without ipip.
//!
//! What the wire shows comes from the lab's underlay counters: the underlay
//! namespace counts UDP 4789 frames it bridges inside a subnet and packets
//! it routes between subnets (nft, `bridge`/`ip tabby-lab encap`).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tabby_dataplane::NetNs;

const POOL: &str = "default-ipv4-ippool";
/// How long the agents get to program a lab or follow a pool change.
const CONVERGE: Duration = Duration::from_secs(30);

/// A pod as the tests need it: name, namespace, address, node address, echo pid.
#[derive(Debug, Clone, PartialEq)]
struct Pod {
    name: String,
    netns: String,
    ip: String,
    node: String,
    echo_pid: i64,
}

fn pods(lab: &TestLab) -> Vec<Pod> {
    let state = lab.state().expect("a state file");
    state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pod {
            name: p["name"].as_str().unwrap().into(),
            netns: p["netns"].as_str().unwrap().into(),
            ip: p["ip"].as_str().unwrap().into(),
            node: p["node"].as_str().unwrap().into(),
            echo_pid: p["echo"]["pid"].as_i64().unwrap(),
        })
        .collect()
}

/// A node's underlay address, from the state file.
fn node_address(lab: &TestLab, node: &str) -> String {
    let state = lab.state().expect("a state file");
    let n = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .expect("the node");
    n["address"].as_str().unwrap().to_string()
}

/// GET `http://to:port/` from inside namespace `ns`: the body, or why not.
fn get_from(ns: &str, to: SocketAddr, timeout: Duration) -> Result<String, String> {
    let netns = NetNs::open(format!("/run/netns/{ns}")).map_err(|e| e.to_string())?;
    netns
        .run(|| -> Result<String, String> {
            let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: encap\r\nConnection: close\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut body = String::new();
            s.read_to_string(&mut body).map_err(|e| e.to_string())?;
            Ok(body)
        })
        .map_err(|e| e.to_string())?
}

/// `from` asks `to`'s echo server; it must answer as `to` and see `from`'s address.
fn reach(from: &Pod, to: &Pod, timeout: Duration) -> Result<(), String> {
    let addr = SocketAddr::new(to.ip.parse().unwrap(), 8080);
    let body = get_from(&from.netns, addr, timeout)?;
    let ok = body.contains(&format!("Hostname: {}\n", to.name))
        && body.contains(&format!("RemoteAddr: {}:", from.ip));
    ok.then_some(())
        .ok_or_else(|| format!("unexpected answer {body:?}"))
}

/// The pairs (of pods on different nodes) that do not reach each other.
fn unreachable_pairs(pods: &[Pod], timeout: Duration) -> Vec<String> {
    let mut failed = Vec::new();
    for from in pods {
        for to in pods.iter().filter(|p| p.node != from.node) {
            if let Err(e) = reach(from, to, timeout) {
                failed.push(format!("{} -> {}: {e}", from.name, to.name));
            }
        }
    }
    failed
}

/// Polls until every pair reaches every other; returns how long it took.
fn wait_all_pairs(pods: &[Pod], what: &str) -> Duration {
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < CONVERGE {
        last = unreachable_pairs(pods, Duration::from_millis(300));
        if last.is_empty() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what}: after {CONVERGE:?} these pairs still fail:\n{}",
        last.join("\n")
    );
}

/// Polls `check` every 50 ms until it holds, or fails with `what`.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < CONVERGE {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not after {CONVERGE:?}");
}

/// Packets through a node's vxlan.tabby so far (tx + rx; 0 when it does not exist).
fn vxlan_packets(lab: &TestLab, node: &str) -> u64 {
    let ns = format!("{}-{node}", lab.prefix);
    let out = Command::new("ip")
        .args(["-n", &ns, "-j", "-s", "link", "show", "dev", "vxlan.tabby"])
        .output()
        .unwrap();
    if !out.status.success() {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stats = &v[0]["stats64"];
    stats["tx"]["packets"].as_u64().unwrap() + stats["rx"]["packets"].as_u64().unwrap()
}

/// The items of `nft -j list WHAT...` in the namespace `ns`.
fn nft_list(ns: &str, what: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-j", "list"])
        .args(what)
        .output()
        .unwrap();
    assert!(out.status.success(), "nft: {}", text(&out));
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    match v["nftables"].take() {
        serde_json::Value::Array(items) => items,
        other => panic!("nft -j list {what:?}: no item list in {other}"),
    }
}

/// The underlay's UDP 4789 packet counts: (bridged within a subnet, routed between subnets).
fn underlay_vxlan(lab: &TestLab) -> (u64, u64) {
    let ns = format!("{}-underlay", lab.prefix);
    let count = |family: &str| {
        nft_list(&ns, &["chain", family, "tabby-lab", "encap"])
            .iter()
            .find_map(|i| i["rule"]["expr"][1]["counter"]["packets"].as_u64())
            .expect("a counter")
    };
    (count("bridge"), count("ip"))
}

/// The underlay counters' growth while `from` asks `to` five times.
fn vxlan_growth(lab: &TestLab, from: &Pod, to: &Pod) -> (u64, u64) {
    let (b0, r0) = underlay_vxlan(lab);
    for _ in 0..5 {
        reach(from, to, Duration::from_secs(2)).unwrap();
    }
    let (b1, r1) = underlay_vxlan(lab);
    (b1 - b0, r1 - r0)
}

/// What the underlay sees of pod traffic between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// No UDP 4789 at all.
    Native,
    /// UDP 4789 on the bridge, inside one subnet (the router's count is not judged).
    InSubnet,
    /// UDP 4789 through the router, between subnets.
    Routed,
}

/// Asserts what the underlay counters show while `from` asks `to` five times.
fn assert_wire(lab: &TestLab, from: &Pod, to: &Pod, want: Wire) {
    let (bridged, routed) = vxlan_growth(lab, from, to);
    let ok = match want {
        Wire::Native => (bridged, routed) == (0, 0),
        Wire::InSubnet => bridged > 0,
        Wire::Routed => bridged == 0 && routed > 0,
    };
    assert!(
        ok,
        "{} -> {}: want {want:?}, saw {bridged} UDP 4789 bridged, {routed} routed",
        from.node, to.node
    );
}

/// Waits until every pod pair of a three-node lab reaches every other;
/// returns the pods and the ones on node-1, node-2 and node-3.
fn three_nodes_reaching(lab: &TestLab, what: &str) -> (Vec<Pod>, [Pod; 3]) {
    let pods = pods(lab);
    wait_all_pairs(&pods, what);
    let trio = ["node-1", "node-2", "node-3"].map(|n| by_node(&pods, n).clone());
    (pods, trio)
}

/// The MTU of `dev` in namespace `ns`.
fn mtu(ns: &str, dev: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", dev])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["mtu"].as_u64().expect("an mtu")
}

/// Asserts every pod's eth0 MTU is its node uplink's less `overhead`.
fn assert_pod_mtu(lab: &TestLab, pods: &[Pod], overhead: u64) {
    for p in pods {
        let uplink = mtu(&format!("{}-{}", lab.prefix, p.node), "eth0");
        assert_eq!(
            mtu(&p.netns, "eth0"),
            uplink - overhead,
            "{}'s eth0 on {} (uplink {uplink})",
            p.name,
            p.node
        );
    }
}

fn set_vxlan_mode(lab: &TestLab, mode: &str) {
    let out = lab.run(&["tabbyctl", "pool", "update", POOL, "--vxlan-mode", mode]);
    assert!(out.contains("Successfully updated"), "{out}");
}

fn by_node<'a>(pods: &'a [Pod], node: &str) -> &'a Pod {
    pods.iter()
        .find(|p| p.node == node)
        .expect("a pod on the node")
}

#[test]
fn vxlan_always_on_two_subnets_carries_every_pod_pair_through_vxlan_tabby() {
    if !require_root("vxlan_always_on_two_subnets_carries_every_pod_pair_through_vxlan_tabby") {
        return;
    }
    let lab = TestLab::new("va");
    let out = lab.run(&[
        "up",
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--subnets",
        "2",
        "--encap",
        "vxlan",
    ]);
    assert!(out.contains("br1 10.98.1.254/24"), "{out}");
    assert_eq!(node_address(&lab, "node-2"), "10.98.1.2");
    assert_eq!(node_address(&lab, "node-3"), "10.98.0.3");
    let (pods, [p1, p2, p3]) = three_nodes_reaching(&lab, "vxlan Always on two subnets");
    assert_pod_mtu(&lab, &pods, 50);
    let before: Vec<u64> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| vxlan_packets(&lab, n))
        .collect();
    // Same subnet (node-1, node-3): VXLAN on the bridge; across: routed VXLAN.
    assert_wire(&lab, &p1, &p3, Wire::InSubnet);
    assert_wire(&lab, &p2, &p1, Wire::Routed);
    for (i, node) in ["node-1", "node-2", "node-3"].iter().enumerate() {
        let now = vxlan_packets(&lab, node);
        assert!(now > before[i], "{node}: vxlan.tabby counters did not grow");
    }

    let status = lab.run(&["status"]);
    assert!(status.contains("--encap vxlan)"), "{status}");
    assert!(
        status.contains("vxlan.tabby ") && status.contains("Always"),
        "{status}"
    );
    lab.run(&["down"]);
    lab.assert_gone();
}

#[test]
fn crosssubnet_encapsulates_only_between_subnets_and_mode_switches_reroute_running_pods() {
    if !require_root(
        "crosssubnet_encapsulates_only_between_subnets_and_mode_switches_reroute_running_pods",
    ) {
        return;
    }
    let lab = TestLab::new("vc");
    lab.run(&[
        "up",
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--subnets",
        "2",
        "--encap",
        "vxlan-crosssubnet",
    ]);
    let (pods, [p1, p2, p3]) = three_nodes_reaching(&lab, "vxlan CrossSubnet on two subnets");
    // Inside a subnet: native, no UDP 4789 anywhere; across: VXLAN, routed.
    assert_wire(&lab, &p1, &p3, Wire::Native);
    assert_wire(&lab, &p3, &p1, Wire::Native);
    assert_wire(&lab, &p1, &p2, Wire::Routed);

    // CrossSubnet -> Always while the pods run: same-subnet traffic takes VXLAN too.
    set_vxlan_mode(&lab, "Always");
    let took = wait_all_pairs(&pods, "after CrossSubnet -> Always");
    eprintln!("every pair reached again {took:?} after the switch to Always");
    wait_until("node-1 -> node-3 through VXLAN after the switch", || {
        vxlan_growth(&lab, &p1, &p3).0 > 0
    });
    // Always -> CrossSubnet: native inside the subnet again.
    set_vxlan_mode(&lab, "CrossSubnet");
    wait_until("node-1 <-> node-3 native after the switch back", || {
        vxlan_growth(&lab, &p1, &p3) == (0, 0) && vxlan_growth(&lab, &p3, &p1) == (0, 0)
    });
    wait_all_pairs(&pods, "after Always -> CrossSubnet");

    // The same pods, never restarted.
    assert_eq!(self::pods(&lab), pods);
    for p in &pods {
        assert!(
            std::path::Path::new(&format!("/proc/{}", p.echo_pid)).exists(),
            "{}'s echo server is gone",
            p.name
        );
    }
}

#[test]
fn nat_outgoing_shows_the_internet_the_node_address_and_when_off_the_pod_address() {
    if !require_root(
        "nat_outgoing_shows_the_internet_the_node_address_and_when_off_the_pod_address",
    ) {
        return;
    }
    let lab = TestLab::new("no");
    let out = lab.run(&["up", "--nodes", "2", "--pods-per-node", "1"]);
    assert!(out.contains("natOutgoing true"), "{out}");
    let pods = pods(&lab);
    // No encapsulation: the pods get their uplink's whole MTU.
    assert_pod_mtu(&lab, &pods, 0);
    let pod = by_node(&pods, "node-2");
    let node = node_address(&lab, "node-2");
    let server: SocketAddr = "203.0.113.10:80".parse().unwrap();

    // On (the default): the server sees node-2's address, never the pod's.
    let mut body = String::new();
    wait_until("the internet server answering through the NAT", || {
        get_from(&pod.netns, server, Duration::from_millis(500))
            .map(|b| body = b)
            .is_ok()
    });
    assert!(body.contains(&format!("RemoteAddr: {node}:")), "{body}");
    assert!(
        !syn_sources(&lab).contains(&pod.ip),
        "{:?}",
        syn_sources(&lab)
    );

    // Off: the SYN arrives from the pod's own address (and its answer has
    // no way back: the internet knows no route to the pods).
    let off = lab.run(&[
        "tabbyctl",
        "pool",
        "update",
        POOL,
        "--nat-outgoing",
        "false",
    ]);
    assert!(off.contains("natOutgoing false"), "{off}");
    wait_until("a SYN from the pod's own address", || {
        let _ = get_from(&pod.netns, server, Duration::from_millis(300));
        syn_sources(&lab).contains(&pod.ip)
    });
    assert!(
        get_from(&pod.netns, server, Duration::from_millis(500)).is_err(),
        "the internet answered a pod address it has no route to"
    );
    let status = lab.run(&["status"]);
    assert!(
        status.contains("TCP SYNs seen from [") && status.contains(&pod.ip),
        "{status}"
    );
}

/// The source addresses of the SYNs the internet namespace received.
fn syn_sources(lab: &TestLab) -> Vec<String> {
    let ns = format!("{}-internet", lab.prefix);
    nft_list(&ns, &["set", "ip", "tabby-lab", "syn_sources"])
        .iter()
        .filter_map(|i| i["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| e.as_str().map(String::from))
        .collect()
}

#[test]
fn encap_ipip_on_a_kernel_without_ipip_is_refused_before_anything_is_made() {
    if !require_root("encap_ipip_on_a_kernel_without_ipip_is_refused_before_anything_is_made") {
        return;
    }
    let lab = TestLab::new("ii");
    let has_ipip = Command::new("unshare")
        .args(["--net", "ip", "link", "add", "p0", "type", "ipip"])
        .output()
        .unwrap()
        .status
        .success();
    let out = lab
        .cmd(&["up", "--nodes", "2", "--encap", "ipip-crosssubnet"])
        .output()
        .unwrap();
    if has_ipip {
        // A kernel with ipip gets past the check (the IPIP test proper runs in qemu guests).
        assert!(out.status.success(), "{}", text(&out));
        return;
    }
    assert!(!out.status.success(), "{}", text(&out));
    let err = text(&out);
    assert!(err.contains("--encap ipip-crosssubnet needs IPIP"), "{err}");
    assert!(err.contains("--encap vxlan"), "{err}");
    assert_eq!(lab.namespaces(), Vec::<String>::new());
    assert!(lab.state().is_none(), "a state file was written");
}
