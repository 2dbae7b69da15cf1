//! What one attachment is: network + container + interface (several
//! interfaces per pod, as Multus makes them), and never the node itself.

use serde_json::Value;
use tabby_tests::{Call, Netns, Node, PluginRun};

fn call(node: &Node, command: &str, pod: &Netns, ifname: &str, conf: &Value) -> PluginRun {
    let path = pod.path().display().to_string();
    let mut call = Call::tabby(command, pod.name(), &path);
    call.ifname = ifname;
    call.run(&node.ns, conf.to_string().as_bytes())
}

fn address_of(pod: &Netns, ifname: &str) -> String {
    pod.ip(&["-4", "-o", "addr", "show", "dev", ifname])
}

#[test]
fn two_interfaces_of_one_container_live_side_by_side_and_del_of_one_releases_only_it() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let pod = Netns::new("tbp");
    let eth0 = call(&node, "ADD", &pod, "eth0", &conf);
    assert!(eth0.ok, "ADD eth0 failed: {}", eth0.stdout);
    let eth1 = call(&node, "ADD", &pod, "eth1", &conf);
    assert!(eth1.ok, "ADD eth1 failed: {}", eth1.stdout);
    let (ip0, ip1) = (eth0.ip(), eth1.ip());
    assert_ne!(ip0, ip1);
    assert_ne!(
        eth0.json["interfaces"][0]["name"], eth1.json["interfaces"][0]["name"],
        "each interface needs its own host veth"
    );
    let links = pod.links();
    assert!(
        links.contains(&"eth0".to_string()) && links.contains(&"eth1".to_string()),
        "ADD eth1 destroyed eth0: {links:?}"
    );
    assert!(address_of(&pod, "eth0").contains(&format!("{ip0}/32")));
    assert!(address_of(&pod, "eth1").contains(&format!("{ip1}/32")));
    assert_eq!(node.allocations().len(), 2, "{:?}", node.allocations());
    assert!(node.ns.ping(&ip0) && node.ns.ping(&ip1));

    let mut check = conf.clone();
    check["prevResult"] = eth0.json.clone();
    let run = call(&node, "CHECK", &pod, "eth0", &check);
    assert!(run.ok, "CHECK eth0 failed: {}", run.stdout);
    check["prevResult"] = eth1.json.clone();
    let run = call(&node, "CHECK", &pod, "eth1", &check);
    assert!(run.ok, "CHECK eth1 failed: {}", run.stdout);
    assert!(
        pod.routes()
            .iter()
            .any(|r| r.starts_with("default via 169.254.1.1 dev eth0")),
        "the pod's default route left eth0: {:?}",
        pod.routes()
    );

    let del = call(&node, "DEL", &pod, "eth1", &conf);
    assert!(del.ok, "DEL eth1 failed: {}", del.stdout);
    let left = node.allocations();
    assert_eq!(left.len(), 1, "DEL eth1 released {left:?}");
    assert_eq!(left[0].1, ip0, "DEL eth1 released eth0's address");
    assert!(pod.links().contains(&"eth0".to_string()));
    assert!(!pod.links().contains(&"eth1".to_string()));
    assert!(node.ns.ping(&ip0), "eth0 stopped working after DEL eth1");

    let del = call(&node, "DEL", &pod, "eth0", &conf);
    assert!(del.ok, "DEL eth0 failed: {}", del.stdout);
    node.assert_no_leftovers();
    assert!(node.allocations().is_empty());
}

#[test]
fn gc_keeps_the_valid_interface_of_a_container_and_releases_its_other_one() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let pod = Netns::new("tbp");
    let eth0 = call(&node, "ADD", &pod, "eth0", &conf);
    let eth1 = call(&node, "ADD", &pod, "eth1", &conf);
    assert!(eth0.ok && eth1.ok, "{} {}", eth0.stdout, eth1.stdout);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": pod.name(), "ifname": "eth0"}]);
    let run = Call::tabby("GC", "", "").run(&node.ns, gc.to_string().as_bytes());
    assert!(run.ok, "GC failed: {}", run.stdout);
    let left = node.allocations();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].1, eth0.ip());
    assert_eq!(pod.links(), vec!["lo".to_string(), "eth0".to_string()]);
    assert!(node.ns.ping(&eth0.ip()));
}

fn ip_forward(node: &Node) -> String {
    let out = node.ns.exec("cat", &["/proc/sys/net/ipv4/ip_forward"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn add_into_the_nodes_own_namespace_is_refused_with_code_4_and_changes_nothing() {
    let node = Node::new();
    node.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let path = node.ns.path().display().to_string();
    let run = Call::tabby("ADD", "c1", &path).run(&node.ns, conf.to_string().as_bytes());
    assert!(
        !run.ok,
        "ADD into the node's namespace succeeded: {}",
        run.stdout
    );
    assert_eq!(run.code(), Some(4), "{}", run.stdout);
    assert!(
        run.msg().contains("CNI_NETNS") && run.msg().contains("own"),
        "{}",
        run.msg()
    );
    assert_eq!(ip_forward(&node), "1", "the node's ip_forward was changed");
    node.assert_no_leftovers();
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
}

#[test]
fn del_with_the_nodes_own_namespace_never_deletes_a_node_interface() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let path = node.ns.path().display().to_string();
    let mut del = Call::tabby("DEL", "c1", &path);
    del.ifname = "up0";
    let run = del.run(&node.ns, conf.to_string().as_bytes());
    assert!(run.ok, "DEL failed: {}", run.stdout);
    assert!(
        node.ns.links().contains(&"up0".to_string()),
        "DEL deleted the node's uplink"
    );
    node.assert_no_leftovers();
}
