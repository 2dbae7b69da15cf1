//! The `tabby` plugin in real namespaces: every test makes its own node and
//! pod namespaces and datastore, so the tests run in parallel.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use tabby_dataplane::NetNs;
use tabby_tests::{require_root, Call, Netns, Node};

const VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Accepts one connection in `server`'s netns and echoes a line back; connects from `client`.
fn tcp_works(server: &Netns, server_ip: &str, client: &Netns) -> bool {
    let listener = NetNs::open(server.path())
        .unwrap()
        .run(|| TcpListener::bind((server_ip, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    let conn = NetNs::open(client.path())
        .unwrap()
        .run(|| TcpStream::connect((server_ip, port)))
        .unwrap();
    let ok = match conn {
        Ok(mut c) => {
            c.write_all(b"hello").unwrap();
            let mut back = [0u8; 5];
            c.read_exact(&mut back).is_ok() && &back == b"hello"
        }
        Err(_) => false,
    };
    let _ = t.join();
    ok
}

#[test]
fn two_pods_on_one_node_reach_each_other_and_the_host() {
    if !require_root("two_pods_on_one_node_reach_each_other_and_the_host") {
        return;
    }
    let node = Node::new();
    node.ns.ip(&["addr", "add", "10.123.0.1/32", "dev", "lo"]);
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let a = node.add_pod(&conf);
    let b = node.add_pod(&conf);
    assert_ne!(a.ip, b.ip);
    assert!(a.ns.ping(&b.ip), "pod a cannot ping pod b");
    assert!(b.ns.ping(&a.ip), "pod b cannot ping pod a");
    assert!(
        tcp_works(&b.ns, &b.ip, &a.ns),
        "TCP from pod a to pod b failed"
    );
    assert!(node.ns.ping(&a.ip), "host cannot ping pod a");
    assert!(a.ns.ping("10.123.0.1"), "pod a cannot ping the host");
}

#[test]
fn add_builds_the_calico_data_path() {
    if !require_root("add_builds_the_calico_data_path") {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let pod = node.add_pod(&conf);
    let veth = pod.result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(veth.starts_with("tabby") && veth.len() == 15, "{veth}");
    assert_eq!(pod.result["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(pod.result["ips"][0]["address"], format!("{}/32", pod.ip));

    let host_link = node.ns.ip(&["link", "show", &veth]);
    assert!(
        host_link.contains("ee:ee:ee:ee:ee:ee") && host_link.contains("mtu 1450"),
        "{host_link}"
    );
    assert!(
        node.ns.ip(&["-4", "addr", "show", &veth]).trim().is_empty(),
        "the host veth must have no IPv4 address"
    );
    let proxy_arp = node.ns.exec(
        "cat",
        &[&format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp")],
    );
    assert_eq!(String::from_utf8_lossy(&proxy_arp.stdout).trim(), "1");
    let host_routes = node.ns.routes();
    assert!(
        host_routes
            .iter()
            .any(|r| r.starts_with(&format!("{} dev {veth} scope link", pod.ip))),
        "{host_routes:?}"
    );

    let addr = pod.ns.ip(&["-4", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("inet {}/32", pod.ip)), "{addr}");
    let pod_routes = pod.ns.routes();
    assert!(
        pod_routes
            .iter()
            .any(|r| r.starts_with("default via 169.254.1.1 dev eth0")),
        "{pod_routes:?}"
    );
    assert!(
        pod_routes
            .iter()
            .any(|r| r.starts_with("169.254.1.1 dev eth0 scope link")),
        "{pod_routes:?}"
    );
    // The pod resolves its gateway to the host veth's MAC by proxy ARP.
    assert!(pod.ns.ping(&pod.ip));
    node.ns.ip(&["addr", "add", "10.123.0.1/32", "dev", "lo"]);
    assert!(pod.ns.ping("10.123.0.1"));
    let neigh = pod.ns.ip(&["neigh", "show", "169.254.1.1"]);
    assert!(neigh.contains("ee:ee:ee:ee:ee:ee"), "{neigh}");
}

#[test]
fn every_cni_version_gets_a_result_in_its_own_format() {
    if !require_root("every_cni_version_gets_a_result_in_its_own_format") {
        return;
    }
    let node = Node::new();
    for v in VERSIONS {
        let pod = node.add_pod(&node.conf(v, "10.244.0.0/16", 26));
        assert_eq!(pod.result["cniVersion"], v);
        let has_version = pod.result["ips"][0].get("version").is_some();
        assert_eq!(
            has_version,
            v.starts_with('0'),
            "ips[].version in {v}: {}",
            pod.result
        );
    }
}

#[test]
fn check_passes_then_fails_when_the_default_route_or_host_route_is_deleted() {
    if !require_root("check_passes_then_fails_when_the_default_route_or_host_route_is_deleted") {
        return;
    }
    let node = Node::new();
    let mut conf = node.conf("1.0.0", "10.244.0.0/16", 26);
    let pod = node.add_pod(&conf);
    conf["prevResult"] = pod.result.clone();
    let netns = pod.ns.path().display().to_string();
    let check = |c: &serde_json::Value| {
        Call::tabby("CHECK", &pod.id, &netns).run(&node.ns, c.to_string().as_bytes())
    };
    let ok = check(&conf);
    assert!(ok.ok, "CHECK of a healthy pod failed: {}", ok.stdout);

    pod.ns.ip(&["route", "del", "default"]);
    let bad = check(&conf);
    assert!(
        !bad.ok && bad.msg().contains("default route"),
        "{}",
        bad.stdout
    );
    pod.ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    assert!(check(&conf).ok);

    let veth = pod.result["interfaces"][0]["name"].as_str().unwrap();
    node.ns
        .ip(&["route", "del", &format!("{}/32", pod.ip), "dev", veth]);
    let bad = check(&conf);
    assert!(
        !bad.ok && bad.msg().contains("host route"),
        "{}",
        bad.stdout
    );
}

#[test]
fn del_twice_succeeds_and_leaves_nothing() {
    if !require_root("del_twice_succeeds_and_leaves_nothing") {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let pod = node.add_pod(&conf);
    let netns = pod.ns.path().display().to_string();
    for _ in 0..2 {
        let del = Call::tabby("DEL", &pod.id, &netns).run(&node.ns, conf.to_string().as_bytes());
        assert!(del.ok, "DEL failed: {}", del.stdout);
    }
    node.assert_no_leftovers();
    assert!(!pod.ns.links().contains(&"eth0".to_string()));
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
}

#[test]
fn del_succeeds_when_the_netns_is_already_gone_and_removes_the_host_veth() {
    if !require_root("del_succeeds_when_the_netns_is_already_gone_and_removes_the_host_veth") {
        return;
    }
    let node = Node::new();
    let mut conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let pod = node.add_pod(&conf);
    conf["prevResult"] = pod.result.clone();
    let netns = pod.ns.path().display().to_string();
    let id = pod.id.clone();
    // A pod netns that is gone takes its end of the veth, and with it the host end.
    drop(pod);
    let del = Call::tabby("DEL", &id, &netns).run(&node.ns, conf.to_string().as_bytes());
    assert!(del.ok, "DEL failed: {}", del.stdout);
    let del = Call::tabby("DEL", &id, "").run(&node.ns, conf.to_string().as_bytes());
    assert!(del.ok, "DEL without netns failed: {}", del.stdout);
    node.assert_no_leftovers();
    assert!(node.allocations().is_empty());
}

#[test]
fn version_lists_every_supported_version() {
    if !require_root("version_lists_every_supported_version") {
        return;
    }
    let node = Node::new();
    let run = Call::tabby("VERSION", "", "").run(&node.ns, b"{}");
    assert!(run.ok);
    let list: Vec<&str> = run.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for v in VERSIONS {
        assert!(list.contains(&v), "{list:?}");
    }
}

#[test]
fn gc_releases_allocations_not_in_the_valid_list_and_their_veths() {
    if !require_root("gc_releases_allocations_not_in_the_valid_list_and_their_veths") {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let keep = node.add_pod(&conf);
    let gone = node.add_pod(&conf);
    let gone_veth = gone.result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": keep.id, "ifname": "eth0"}]);
    let run = Call::tabby("GC", "", "").run(&node.ns, gc.to_string().as_bytes());
    assert!(run.ok, "GC failed: {}", run.stdout);
    let left = node.allocations();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].0.ends_with(&keep.id));
    assert!(
        !node.ns.links().contains(&gone_veth),
        "GC left the stale host veth"
    );
    assert!(keep.ns.ping(&keep.ip));
}

#[test]
fn status_reports_available_then_exhausted() {
    if !require_root("status_reports_available_then_exhausted") {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.250.0.0/30", 30);
    let status = || Call::tabby("STATUS", "", "").run(&node.ns, conf.to_string().as_bytes());
    assert!(status().ok, "{}", status().stdout);
    // Two addresses: a pool smaller than a block keeps its network and broadcast addresses.
    let _pods: Vec<_> = (0..2).map(|_| node.add_pod(&conf)).collect();
    let s = status();
    assert!(!s.ok);
    assert_eq!(s.code(), Some(50), "{}", s.stdout);
}

#[test]
fn gc_on_one_node_never_releases_another_nodes_pods_in_a_shared_datastore() {
    if !require_root("gc_on_one_node_never_releases_another_nodes_pods_in_a_shared_datastore") {
        return;
    }
    let a = Node::new();
    let b = Node::new();
    let shared = a.datastore().display().to_string();
    let conf_a = a.conf("1.1.0", "10.244.0.0/16", 26);
    let mut conf_b = b.conf("1.1.0", "10.244.0.0/16", 26);
    conf_b["ipam"]["datastore"]["path"] = serde_json::Value::from(shared);
    let pod_a = a.add_pod(&conf_a);
    let pod_b = b.add_pod(&conf_b);
    // Node b's runtime knows none of its pods any more: GC releases b's pod only.
    let mut gc = conf_b.clone();
    gc["cni.dev/valid-attachments"] = serde_json::json!([]);
    let run = Call::tabby("GC", "", "").run(&b.ns, gc.to_string().as_bytes());
    assert!(run.ok, "GC failed: {}", run.stdout);
    let left = a.allocations();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].1, pod_a.ip, "node a's pod lost its address");
    assert!(!left.iter().any(|(_, ip)| *ip == pod_b.ip));
    // Without the valid list GC refuses rather than release everything.
    let run = Call::tabby("GC", "", "").run(&b.ns, conf_b.to_string().as_bytes());
    assert!(
        !run.ok && run.msg().contains("valid-attachments"),
        "{}",
        run.stdout
    );
}

#[test]
fn without_mtu_in_the_config_the_pod_takes_the_agents_mtu_file() {
    if !require_root("without_mtu_in_the_config_the_pod_takes_the_agents_mtu_file") {
        return;
    }
    let node = Node::new();
    let file = node.dir.path().join("mtu");
    std::fs::write(&file, "1410\n").unwrap();
    let mut conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    conf.as_object_mut().unwrap().remove("mtu");
    conf["mtuFile"] = serde_json::json!(file);
    let pod = node.add_pod(&conf);
    let veth = pod.result["interfaces"][0]["name"].as_str().unwrap();
    assert!(node.ns.ip(&["link", "show", veth]).contains("mtu 1410"));
    // The config's mtu wins over the file.
    conf["mtu"] = serde_json::json!(1300);
    let pod = node.add_pod(&conf);
    let veth = pod.result["interfaces"][0]["name"].as_str().unwrap();
    assert!(node.ns.ip(&["link", "show", veth]).contains("mtu 1300"));
}
