//! GC after killed plugins: what a SIGKILLed ADD left (interfaces, orphan
//! handles) is removed, and its address is never held by two namespaces.

mod support;

use serde_json::Value;
use support::{kill_when, Ending, Invocation};
use tabby_tests::{Call, Netns, Node};

fn gc_all(node: &Node, conf: &Value) {
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = serde_json::json!([]);
    let run = Call::tabby("GC", "", "").run(&node.ns, gc.to_string().as_bytes());
    assert!(run.ok, "GC failed: {}", run.stdout);
}

fn del(node: &Node, pod: &Netns, conf: &Value) {
    let path = pod.path().display().to_string();
    let run = Call::tabby("DEL", pod.name(), &path).run(&node.ns, conf.to_string().as_bytes());
    assert!(run.ok, "DEL failed: {}", run.stdout);
}

/// ADDs pods until one is SIGKILLed once its eth0 holds its address but
/// before the host route exists (ADD's last step); DELs the misses.
fn add_killed_before_the_host_route(node: &Node, conf: &Value) -> Netns {
    let bytes = conf.to_string().into_bytes();
    for _ in 0..300 {
        let pod = Netns::new("tbp");
        let pod_nl = support::netlink(&pod.path()).expect("pod netlink");
        let path = pod.path().display().to_string();
        let child = Invocation::new("ADD", pod.name(), &path).spawn(&node.ns, &bytes);
        let ending = kill_when(child, || !support::addresses(&pod_nl).is_empty());
        let routed = node.ns.routes().iter().any(|r| r.contains(" dev tabby"));
        if ending == Ending::Killed && !routed && !support::addresses(&pod_nl).is_empty() {
            return pod;
        }
        del(node, &pod, conf);
    }
    panic!("no ADD was killed between its pod address and its host route in 300 tries");
}

#[test]
fn gc_removes_the_interfaces_of_an_add_killed_before_its_host_route_so_no_address_is_held_twice() {
    let node = Node::new();
    // One address: what GC frees is what the next pod gets.
    let conf = node.conf("1.1.0", "10.249.0.7/32", 32);
    let victim = add_killed_before_the_host_route(&node, &conf);
    let victim_nl = support::netlink(&victim.path()).expect("victim netlink");
    assert_eq!(
        node.allocations().len(),
        1,
        "the killed ADD holds its address"
    );

    gc_all(&node, &conf);
    let next = node.add_pod(&conf);
    let ip: std::net::IpAddr = next.ip.parse().unwrap();
    assert!(
        !support::addresses(&victim_nl).contains(&ip),
        "two namespaces hold {ip}: the killed pod {} and the new pod {}",
        victim.name(),
        next.id
    );
    assert_eq!(
        victim.links(),
        vec!["lo".to_string()],
        "GC left the killed pod's interface"
    );
    let host = support::netlink(&node.ns.path()).expect("node netlink");
    let veth = next.result["interfaces"][0]["name"].as_str().unwrap();
    assert_eq!(
        support::host_veths(&host),
        vec![veth.to_string()],
        "GC left the killed pod's host veth"
    );
}

/// ADDs pods until one is SIGKILLed after its handle document is written
/// and before its block records the address; DELs the misses.
fn add_killed_between_handle_and_block(node: &Node, conf: &Value) -> String {
    let bytes = conf.to_string().into_bytes();
    for _ in 0..300 {
        let pod = Netns::new("tbp");
        let handle = format!("k8s-pod-network.{}", pod.name());
        let file = node
            .datastore()
            .join("handles")
            .join(format!("{handle}.json"));
        let path = pod.path().display().to_string();
        let child = Invocation::new("ADD", pod.name(), &path).spawn(&node.ns, &bytes);
        let ending = kill_when(child, || file.exists());
        let in_block = node.allocations().iter().any(|(h, _)| *h == handle);
        if ending == Ending::Killed && file.exists() && !in_block {
            return handle;
        }
        del(node, &pod, conf);
    }
    panic!("no ADD was killed between its handle and block writes in 300 tries");
}

#[test]
fn gc_removes_the_orphan_handle_of_an_add_killed_between_the_handle_and_the_block() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let orphan = add_killed_between_handle_and_block(&node, &conf);
    let (problems, report) = support::ipam_check(&node);
    assert!(
        problems >= 1 && report.contains(&format!("handle {orphan} records 1 addresses")),
        "{report}"
    );

    gc_all(&node, &conf);
    let handles = support::handles(&node.datastore());
    assert!(handles.is_empty(), "GC left handles: {handles:?}");
    let (problems, report) = support::ipam_check(&node);
    assert_eq!(problems, 0, "{report}");
}

#[test]
fn ipam_check_fix_repairs_the_orphan_handle_of_a_killed_add() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let kept = node.add_pod(&conf);
    let orphan = add_killed_between_handle_and_block(&node, &conf);

    let (ok, text) = support::tabbyctl(&node, &["ipam", "check", "--node", &node.name, "--fix"]);
    assert!(ok, "ipam check --fix failed: {text}");
    assert!(
        text.contains(&orphan),
        "the fix does not name the handle: {text}"
    );
    let handles = support::handles(&node.datastore());
    assert_eq!(
        handles.keys().collect::<Vec<_>>(),
        [&format!("handles/k8s-pod-network.{}", kept.id)],
        "only the live pod's handle may remain"
    );
    let (problems, report) = support::ipam_check(&node);
    assert_eq!(problems, 0, "{report}");
    assert!(kept.ns.ping(&kept.ip));
}
