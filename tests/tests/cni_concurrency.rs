//! Concurrent ADDs as separate processes, on one node and across nodes
//! sharing one datastore: no address twice, no block owned twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tabby_ipam::{AffinityState, Block, BlockAffinity, Datastore, FileDatastore};
use tabby_tests::{all_json, require_root, Call, Node};

fn parallel<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f(i))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker panicked"))
        .collect()
}

#[test]
fn sixty_four_concurrent_adds_on_one_node_get_distinct_addresses_and_del_cleans_up() {
    if !require_root(
        "sixty_four_concurrent_adds_on_one_node_get_distinct_addresses_and_del_cleans_up",
    ) {
        return;
    }
    let node = Arc::new(Node::new());
    let conf = Arc::new(node.conf("1.1.0", "10.244.0.0/16", 26));
    let n2 = Arc::clone(&node);
    let c2 = Arc::clone(&conf);
    let pods = parallel(64, move |_| n2.add_pod(&c2));
    let ips: HashSet<&str> = pods.iter().map(|p| p.ip.as_str()).collect();
    assert_eq!(ips.len(), 64, "duplicate addresses were handed out");
    assert_eq!(node.allocations().len(), 64);
    assert_eq!(node.ns.links().len(), node.base_links.len() + 64);
    assert!(pods[0].ns.ping(&pods[63].ip));

    let pods = Arc::new(pods);
    let (n3, c3, p3) = (Arc::clone(&node), Arc::clone(&conf), Arc::clone(&pods));
    let dels = parallel(64, move |i| {
        let p = &p3[i];
        Call::tabby("DEL", &p.id, &p.ns.path().display().to_string())
            .run(&n3.ns, c3.to_string().as_bytes())
    });
    assert!(dels.iter().all(|d| d.ok), "a DEL failed");
    node.assert_no_leftovers();
    assert!(node.allocations().is_empty());
    all_json(&node.datastore()).expect("every datastore document is valid JSON");
}

#[test]
fn four_nodes_racing_for_blocks_of_a_small_pool_never_share_a_block() {
    if !require_root("four_nodes_racing_for_blocks_of_a_small_pool_never_share_a_block") {
        return;
    }
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("datastore");
    // /26 in /29 blocks: 8 blocks of 8 addresses; 4 nodes x 12 pods need 2 blocks each.
    let nodes: Vec<Arc<Node>> = (0..4).map(|_| Arc::new(Node::new())).collect();
    let confs: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let mut c = n.conf("1.1.0", "10.253.0.0/26", 29);
            c["ipam"]["datastore"]["path"] = serde_json::Value::from(store.display().to_string());
            c
        })
        .collect();
    let work: Arc<Vec<(Arc<Node>, serde_json::Value)>> =
        Arc::new(nodes.iter().cloned().zip(confs).collect());
    let w = Arc::clone(&work);
    let pods = parallel(48, move |i| {
        let (node, conf) = &w[i % 4];
        (node.name.clone(), node.add_pod(conf))
    });

    let ips: HashSet<&str> = pods.iter().map(|(_, p)| p.ip.as_str()).collect();
    assert_eq!(ips.len(), 48, "duplicate addresses across nodes");

    let ds = FileDatastore::open(&store).unwrap();
    let mut owner: HashMap<String, String> = HashMap::new();
    for e in ds.list("blocks/").unwrap() {
        let b: Block = serde_json::from_slice(&e.value).unwrap();
        let node = b
            .affinity
            .clone()
            .expect("every claimed block names a node");
        assert!(owner.insert(b.cidr.to_string(), node).is_none());
    }
    let mut confirmed: HashMap<String, Vec<String>> = HashMap::new();
    for e in ds.list("affinities/").unwrap() {
        let a: BlockAffinity = serde_json::from_slice(&e.value).unwrap();
        if a.state == AffinityState::Confirmed {
            confirmed
                .entry(a.cidr.to_string())
                .or_default()
                .push(a.node);
        }
    }
    for (cidr, nodes) in &confirmed {
        assert_eq!(nodes.len(), 1, "block {cidr} is confirmed for {nodes:?}");
        assert_eq!(
            owner.get(cidr).map(|o| o.trim_start_matches("host:")),
            Some(nodes[0].as_str())
        );
    }
    // Every pod's address is in a block its own node owns or borrowed from another.
    for (node, pod) in &pods {
        let ip: std::net::IpAddr = pod.ip.parse().unwrap();
        assert!(
            owner
                .keys()
                .any(|c| c.parse::<ipnetwork::IpNetwork>().unwrap().contains(ip)),
            "{node}: {ip} in no block"
        );
    }
    all_json(&store).expect("every datastore document is valid JSON");
}
