//! Encapsulation and egress in the lab (root only; each test has a lab of
//! its own, torn down on drop): VXLAN Always and CrossSubnet across two
//! underlay subnets, a pool's mode switched while the pods keep running,
//! and `--encap ipip` on a kernel without ipip. (natOutgoing's test waits
//! for the agent's MASQUERADE: branch encap-lab has it.)
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

/// The underlay's UDP 4789 packet counts: (bridged within a subnet, routed between subnets).
fn underlay_vxlan(lab: &TestLab) -> (u64, u64) {
    let ns = format!("{}-underlay", lab.prefix);
    let count = |family: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-j", "list", "chain", family])
            .args(["tabby-lab", "encap"])
            .output()
            .unwrap();
        assert!(out.status.success(), "nft: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
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
    let pods = pods(&lab);
    wait_all_pairs(&pods, "vxlan Always on two subnets");

    let before: Vec<u64> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| vxlan_packets(&lab, n))
        .collect();
    let (p1, p2, p3) = (
        by_node(&pods, "node-1"),
        by_node(&pods, "node-2"),
        by_node(&pods, "node-3"),
    );
    // Same subnet (node-1, node-3): VXLAN on the bridge; across: routed VXLAN.
    let (bridged, _) = vxlan_growth(&lab, p1, p3);
    assert!(bridged > 0, "node-1 -> node-3 sent no VXLAN on the bridge");
    let (_, routed) = vxlan_growth(&lab, p2, p1);
    assert!(
        routed > 0,
        "node-2 -> node-1 sent no VXLAN through the router"
    );
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
    let pods = pods(&lab);
    wait_all_pairs(&pods, "vxlan CrossSubnet on two subnets");
    let (p1, p2, p3) = (
        by_node(&pods, "node-1"),
        by_node(&pods, "node-2"),
        by_node(&pods, "node-3"),
    );
    // Inside a subnet: native, no UDP 4789 anywhere; across: VXLAN, routed.
    assert_eq!(
        vxlan_growth(&lab, p1, p3),
        (0, 0),
        "node-1 <-> node-3 encapsulated"
    );
    assert_eq!(
        vxlan_growth(&lab, p3, p1),
        (0, 0),
        "node-3 <-> node-1 encapsulated"
    );
    let (bridged, routed) = vxlan_growth(&lab, p1, p2);
    assert!(
        bridged == 0 && routed > 0,
        "node-1 -> node-2: {bridged} bridged, {routed} routed"
    );

    // CrossSubnet -> Always while the pods run: same-subnet traffic takes VXLAN too.
    set_vxlan_mode(&lab, "Always");
    let took = wait_all_pairs(&pods, "after CrossSubnet -> Always");
    eprintln!("every pair reached again {took:?} after the switch to Always");
    wait_until("node-1 -> node-3 through VXLAN after the switch", || {
        vxlan_growth(&lab, p1, p3).0 > 0
    });
    // Always -> CrossSubnet: native inside the subnet again.
    set_vxlan_mode(&lab, "CrossSubnet");
    wait_until("node-1 <-> node-3 native after the switch back", || {
        vxlan_growth(&lab, p1, p3) == (0, 0) && vxlan_growth(&lab, p3, p1) == (0, 0)
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
