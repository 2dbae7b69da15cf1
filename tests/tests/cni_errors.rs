//! Every error path of ADD gives a CNI error object and leaves the node as
//! it found it: no veth, no route, no allocation.

use serde_json::{json, Value};
use tabby_tests::{require_root, Call, Netns, Node};

/// What a failed ADD must not leave behind.
fn assert_untouched(node: &Node, pod: Option<&Netns>) {
    node.assert_no_leftovers();
    assert!(
        node.allocations().is_empty(),
        "allocations were left: {:?}",
        node.allocations()
    );
    if let Some(p) = pod {
        assert_eq!(
            p.links(),
            vec!["lo".to_string()],
            "a link was left in the pod"
        );
    }
}

fn add(node: &Node, pod: &Netns, conf: &[u8]) -> tabby_tests::PluginRun {
    let path = pod.path().display().to_string();
    Call::tabby("ADD", pod.name(), &path).run(&node.ns, conf)
}

#[test]
fn malformed_json_is_code_6_and_changes_nothing() {
    if !require_root("malformed_json_is_code_6_and_changes_nothing") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new("tbp");
    let run = add(&node, &pod, b"{\"cniVersion\": \"1.1.0\", \"name\": ");
    assert!(!run.ok);
    assert_eq!(run.code(), Some(6), "{}", run.stdout);
    assert_untouched(&node, Some(&pod));
}

#[test]
fn missing_fields_and_broken_ipam_sections_are_code_7() {
    if !require_root("missing_fields_and_broken_ipam_sections_are_code_7") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new("tbp");
    let no_name = json!({"cniVersion": "1.1.0", "type": "tabby"});
    let run = add(&node, &pod, no_name.to_string().as_bytes());
    assert_eq!(run.code(), Some(7), "{}", run.stdout);
    let mut no_ipam = node.conf("1.1.0", "10.244.0.0/16", 26);
    no_ipam.as_object_mut().unwrap().remove("ipam");
    let run = add(&node, &pod, no_ipam.to_string().as_bytes());
    assert_eq!(run.code(), Some(7), "{}", run.stdout);
    let mut bad_pool = node.conf("1.1.0", "10.244.0.0/16", 26);
    bad_pool["ipam"]["pool"]["cidr"] = Value::from("10.244.0.0/33");
    let run = add(&node, &pod, bad_pool.to_string().as_bytes());
    assert_eq!(run.code(), Some(7), "{}", run.stdout);
    assert_untouched(&node, Some(&pod));
}

#[test]
fn an_unknown_cni_version_is_code_1() {
    if !require_root("an_unknown_cni_version_is_code_1") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new("tbp");
    let run = add(
        &node,
        &pod,
        node.conf("0.2.0", "10.244.0.0/16", 26)
            .to_string()
            .as_bytes(),
    );
    assert_eq!(run.code(), Some(1), "{}", run.stdout);
    assert!(
        run.msg().contains("1.1.0"),
        "the message should name the supported versions: {}",
        run.msg()
    );
    assert_untouched(&node, Some(&pod));
}

#[test]
fn a_bad_netns_path_is_code_3() {
    if !require_root("a_bad_netns_path_is_code_3") {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let run = Call::tabby("ADD", "c1", "/run/netns/does-not-exist-tabby")
        .run(&node.ns, conf.to_string().as_bytes());
    assert_eq!(run.code(), Some(3), "{}", run.stdout);
    assert_untouched(&node, None);
}

#[test]
fn an_interface_name_over_15_characters_is_code_4() {
    if !require_root("an_interface_name_over_15_characters_is_code_4") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new("tbp");
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let path = pod.path().display().to_string();
    let mut call = Call::tabby("ADD", "c1", &path);
    call.ifname = "eth0-far-too-long";
    let run = call.run(&node.ns, conf.to_string().as_bytes());
    assert_eq!(run.code(), Some(4), "{}", run.stdout);
    assert_untouched(&node, Some(&pod));
}

#[test]
fn an_exhausted_pool_is_code_100_and_the_failed_pod_leaves_nothing() {
    if !require_root("an_exhausted_pool_is_code_100_and_the_failed_pod_leaves_nothing") {
        return;
    }
    let node = Node::new();
    // Two addresses: a pool smaller than a block keeps its network and broadcast addresses.
    let conf = node.conf("1.1.0", "10.251.0.0/30", 30);
    let pods: Vec<_> = (0..2).map(|_| node.add_pod(&conf)).collect();
    let links_before = node.ns.links();
    let routes_before = node.ns.routes();
    let extra = Netns::new("tbp");
    let run = add(&node, &extra, conf.to_string().as_bytes());
    assert!(!run.ok);
    assert_eq!(run.code(), Some(100), "{}", run.stdout);
    assert!(run.msg().contains("exhausted"), "{}", run.msg());
    assert_eq!(node.ns.links(), links_before);
    assert_eq!(node.ns.routes(), routes_before);
    assert_eq!(node.allocations().len(), pods.len());
    assert_eq!(extra.links(), vec!["lo".to_string()]);
}

#[test]
fn a_failure_after_the_veth_exists_rolls_back_the_veth_routes_and_allocation() {
    if !require_root("a_failure_after_the_veth_exists_rolls_back_the_veth_routes_and_allocation") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new("tbp");
    // The pod already routes 169.254.1.1 elsewhere, so adding the gateway
    // route fails after IPAM, the veth and the address are done.
    pod.ip(&["route", "add", "169.254.1.1/32", "dev", "lo"]);
    let run = add(
        &node,
        &pod,
        node.conf("1.1.0", "10.244.0.0/16", 26)
            .to_string()
            .as_bytes(),
    );
    assert!(!run.ok, "ADD should fail: {}", run.stdout);
    assert_eq!(run.code(), Some(5), "{}", run.stdout);
    assert_untouched(&node, Some(&pod));
}

#[test]
fn an_unusable_datastore_is_code_5_with_its_path_in_the_message() {
    if !require_root("an_unusable_datastore_is_code_5_with_its_path_in_the_message") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new("tbp");
    let file = node.dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let mut conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    conf["ipam"]["datastore"]["path"] = Value::from(file.display().to_string());
    let run = add(&node, &pod, conf.to_string().as_bytes());
    assert_eq!(run.code(), Some(5), "{}", run.stdout);
    assert!(run.msg().contains("not-a-dir"), "{}", run.msg());
    node.assert_no_leftovers();
    assert_eq!(pod.links(), vec!["lo".to_string()]);
}

#[test]
fn an_unsupported_datastore_type_is_code_2() {
    if !require_root("an_unsupported_datastore_type_is_code_2") {
        return;
    }
    let node = Node::new();
    let pod = Netns::new("tbp");
    let mut conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    conf["ipam"]["datastore"]["type"] = Value::from("consul");
    let run = add(&node, &pod, conf.to_string().as_bytes());
    assert_eq!(run.code(), Some(2), "{}", run.stdout);
    assert_untouched(&node, Some(&pod));
}

#[test]
fn add_twice_for_one_container_is_refused_without_touching_the_first() {
    if !require_root("add_twice_for_one_container_is_refused_without_touching_the_first") {
        return;
    }
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let pod = node.add_pod(&conf);
    let path = pod.ns.path().display().to_string();
    let again = Call::tabby("ADD", &pod.id, &path).run(&node.ns, conf.to_string().as_bytes());
    assert!(!again.ok);
    assert!(again.msg().contains("already exists"), "{}", again.stdout);
    assert_eq!(node.allocations().len(), 1);
    assert!(pod.ns.ping(&pod.ip));
}

#[test]
fn a_datastore_conflict_storm_ends_in_success_or_code_11_never_in_a_half_done_pod() {
    if !require_root(
        "a_datastore_conflict_storm_ends_in_success_or_code_11_never_in_a_half_done_pod",
    ) {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tabby_ipam::{Datastore, FileDatastore};

    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let first = node.add_pod(&conf);
    // Another writer bumps the revision of every block and handle as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let (store, flag) = (node.datastore(), Arc::clone(&stop));
    let hammer = std::thread::spawn(move || {
        let ds = FileDatastore::open(&store).unwrap();
        let mut bumps = 0u64;
        while !flag.load(Ordering::Relaxed) {
            for prefix in ["blocks/", "handles/"] {
                for e in ds.list(prefix).unwrap() {
                    if ds.update(&e.key, &e.value, &e.revision).is_ok() {
                        bumps += 1;
                    }
                }
            }
        }
        bumps
    });
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let pod = Netns::new("tbp");
        let run = add(&node, &pod, conf.to_string().as_bytes());
        outcomes.push((pod, run));
    }
    stop.store(true, Ordering::Relaxed);
    let bumps = hammer.join().unwrap();
    assert!(bumps > 0, "the hammer never won a write");

    let allocs = node.allocations();
    for (pod, run) in &outcomes {
        let handle = format!("k8s-pod-network.{}", pod.name());
        let held = allocs.iter().any(|(h, _)| *h == handle);
        if run.ok {
            assert!(held, "a successful ADD has no allocation");
            assert!(pod.links().contains(&"eth0".to_string()));
        } else {
            assert_eq!(
                run.code(),
                Some(11),
                "a failed ADD under conflicts must say 'try again later': {}",
                run.stdout
            );
            assert!(!held, "a failed ADD left its allocation");
            assert_eq!(pod.links(), vec!["lo".to_string()]);
        }
    }
    let succeeded = outcomes.iter().filter(|(_, r)| r.ok).count();
    assert_eq!(allocs.len(), succeeded + 1);
    let veths = node
        .ns
        .links()
        .iter()
        .filter(|l| l.starts_with("tabby"))
        .count();
    assert_eq!(veths, succeeded + 1);
    assert!(first.ns.ping(&first.ip));
}
