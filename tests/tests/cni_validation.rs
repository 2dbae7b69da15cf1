//! Input the plugin must refuse with the right CNI code before it changes
//! anything: pools that can never work, names that are not names, a CHECK
//! with nothing to check, an oversized config; and a failed ADD that must
//! give back its address.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use tabby_ipam::{Datastore, FileDatastore};
use tabby_tests::{Call, Netns, Node, PluginRun};

fn add(node: &Node, pod: &Netns, conf: &Value) -> PluginRun {
    let path = pod.path().display().to_string();
    Call::tabby("ADD", pod.name(), &path).run(&node.ns, conf.to_string().as_bytes())
}

fn assert_refused(node: &Node, pod: &Netns, run: &PluginRun, code: u64) {
    assert!(!run.ok, "accepted: {}", run.stdout);
    assert_eq!(run.code(), Some(code), "{}", run.stdout);
    node.assert_no_leftovers();
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert_eq!(pod.links(), vec!["lo".to_string()]);
}

const UNUSABLE_POOLS: [(&str, &str); 7] = [
    ("0.0.0.0/0", "default route"),
    ("127.0.0.0/24", "loopback"),
    ("169.254.0.0/24", "link-local"),
    ("169.254.1.0/30", "link-local"),
    ("224.0.0.0/24", "multicast"),
    ("255.255.255.0/24", "reserved"),
    ("240.0.0.0/24", "reserved"),
];

#[test]
fn a_conflist_pool_that_can_never_work_is_code_7_and_creates_nothing() {
    let node = Node::new();
    let pod = Netns::new("tbp");
    for (cidr, why) in UNUSABLE_POOLS {
        let block = cidr
            .split('/')
            .nth(1)
            .unwrap()
            .parse::<u8>()
            .unwrap()
            .max(20);
        let run = add(&node, &pod, &node.conf("1.1.0", cidr, block));
        assert_refused(&node, &pod, &run, 7);
        assert!(run.msg().contains(why), "{cidr}: {}", run.msg());
    }
    let ds = FileDatastore::open(node.datastore()).unwrap();
    assert!(ds.list("pools/").unwrap().is_empty(), "a pool was created");
}

#[test]
fn tabbyctl_refuses_pools_that_can_never_work() {
    let node = Node::new();
    let v6 = [
        ("::/0", "default route"),
        ("::1/128", "loopback"),
        ("fe80::/64", "link-local"),
        ("ff02::/120", "multicast"),
    ];
    for (i, (cidr, why)) in UNUSABLE_POOLS.iter().chain(v6.iter()).enumerate() {
        let name = format!("bad-{i}");
        let (ok, text) =
            support::tabbyctl(&node, &["pool", "create", "--name", &name, "--cidr", cidr]);
        assert!(!ok, "{cidr} was accepted: {text}");
        assert!(text.contains(why), "{cidr}: {text}");
    }
    let (ok, text) = support::tabbyctl(&node, &["pool", "list"]);
    assert!(ok, "{text}");
    assert!(!text.contains("bad-"), "{text}");
}

#[test]
fn a_pool_smaller_than_a_block_never_hands_out_its_network_or_broadcast_address() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.248.0.0/30", 30);
    let mut got = BTreeSet::new();
    let mut pods = Vec::new();
    loop {
        let pod = Netns::new("tbp");
        let run = add(&node, &pod, &conf);
        if !run.ok {
            assert_eq!(run.code(), Some(100), "{}", run.stdout);
            break;
        }
        got.insert(run.ip());
        pods.push(pod);
        assert!(pods.len() <= 4, "more pods than addresses");
    }
    let want: BTreeSet<String> = ["10.248.0.1", "10.248.0.2"].map(String::from).into();
    assert_eq!(got, want);
}

#[test]
fn an_add_that_fails_on_a_corrupt_pool_gives_its_address_back() {
    let node = Node::new();
    let conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    let first = node.add_pod(&conf);
    // The pool document's blockSize is corrupted after its block exists.
    let ds = FileDatastore::open(node.datastore()).unwrap();
    let entry = ds.list("pools/").unwrap().remove(0);
    let mut pool: Value = serde_json::from_slice(&entry.value).unwrap();
    pool["blockSize"] = Value::from(40);
    ds.update(&entry.key, pool.to_string().as_bytes(), &entry.revision)
        .unwrap();

    let pod = Netns::new("tbp");
    let run = add(&node, &pod, &conf);
    assert!(!run.ok, "ADD succeeded on a corrupt pool: {}", run.stdout);
    assert_eq!(run.code(), Some(7), "{}", run.stdout);
    let left = node.allocations();
    assert_eq!(left.len(), 1, "the failed ADD kept its address: {left:?}");
    assert_eq!(left[0].1, first.ip);
    assert_eq!(pod.links(), vec!["lo".to_string()]);
}

#[test]
fn a_network_name_or_node_name_that_is_not_a_name_is_code_7() {
    let node = Node::new();
    let pod = Netns::new("tbp");
    let base = node.conf("1.1.0", "10.244.0.0/16", 26);
    let mut cases = Vec::new();
    for name in ["a/b", "-net", "net work", ""] {
        let mut c = base.clone();
        c["name"] = Value::from(name);
        cases.push((format!("network name {name:?}"), c));
    }
    for nodename in [
        "a".repeat(300),
        "Node_A".into(),
        "node/a".into(),
        "-a".into(),
    ] {
        let mut c = base.clone();
        c["nodename"] = Value::from(nodename.clone());
        cases.push((format!("nodename {nodename:?}"), c));
    }
    for (what, conf) in cases {
        let run = add(&node, &pod, &conf);
        assert!(!run.ok, "{what} was accepted");
        assert_eq!(run.code(), Some(7), "{what}: {}", run.stdout);
        assert_refused(&node, &pod, &run, 7);
    }
}

#[test]
fn check_with_no_addresses_in_its_prev_result_fails() {
    let node = Node::new();
    let conf = node.conf("1.0.0", "10.244.0.0/16", 26);
    let pod = node.add_pod(&conf);
    let path = pod.ns.path().display().to_string();
    let check = |prev: Value| {
        let mut c = conf.clone();
        c["prevResult"] = prev;
        Call::tabby("CHECK", &pod.id, &path).run(&node.ns, c.to_string().as_bytes())
    };
    assert!(check(pod.result.clone()).ok);
    let mut empty = pod.result.clone();
    empty["ips"] = serde_json::json!([]);
    let run = check(empty);
    assert!(!run.ok, "CHECK with \"ips\": [] passed");
    let mut none = pod.result.clone();
    none.as_object_mut().unwrap().remove("ips");
    let run2 = check(none);
    assert!(!run2.ok, "CHECK without ips passed");
    assert!(run.msg().contains("ips"), "{}", run.msg());
}

#[test]
fn a_config_over_the_size_limit_is_refused_without_reading_it_all() {
    let node = Node::new();
    let pod = Netns::new("tbp");
    let mut conf = node.conf("1.1.0", "10.244.0.0/16", 26);
    conf["padding"] = Value::from("x".repeat(5 << 20));
    let run = add(&node, &pod, &conf);
    assert_refused(&node, &pod, &run, 7);
    assert!(run.msg().contains("MiB"), "{}", run.msg());
}
