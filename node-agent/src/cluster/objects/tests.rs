use std::collections::BTreeSet;
use std::sync::Mutex;

use serde_json::json;
use tabby_ipam::datastore::{Datastore, Entry, Result as DsResult, Revision};
use tabby_ipam::kubernetes::crd::kind_of;
use tabby_ipam::store::{HANDLES, NODES};
use tabby_ipam::NodeLock;

use super::*;
use crate::desired::desired_peers;

fn node(name: &str, annotations: serde_json::Value, addresses: serde_json::Value) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "resourceVersion": "7", "annotations": annotations,
                     "labels": {"tabby.dev/scope": "s1", "zone": "a"}},
        "status": {"addresses": addresses},
    }))
    .unwrap()
}

fn registered(address: Option<&str>) -> serde_json::Value {
    match address {
        Some(a) => json!({"tabby.dev/registered": "true", "tabby.dev/bgp-address": a}),
        None => json!({"tabby.dev/registered": "true"}),
    }
}

fn internal(ips: &[&str]) -> serde_json::Value {
    let mut out = vec![json!({"type": "Hostname", "address": "host"})];
    out.extend(
        ips.iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip})),
    );
    json!(out)
}

#[test]
fn a_node_without_the_bgp_annotation_peers_at_its_internal_ip() {
    let nodes = [
        node(
            "s1.a",
            registered(Some("10.1.0.1")),
            internal(&["10.9.0.1"]),
        ),
        node("s1.b", registered(None), internal(&["fd00::2", "10.1.0.2"])),
        node("s1.c", registered(None), internal(&["fd00::3"])),
        node("s1.d", registered(None), json!([])),
        node("s1.e", json!({}), internal(&["10.1.0.5"])),
        node("s2.f", registered(Some("10.1.0.6")), json!([])),
    ];
    let view = view_of(&nodes, [], Some("s1")).unwrap();
    let by_name: Vec<(String, Option<IpAddr>)> = view
        .snapshot
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.address))
        .collect();
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    assert_eq!(
        by_name,
        vec![
            ("a".into(), ip("10.1.0.1")),
            ("b".into(), ip("10.1.0.2")),
            ("c".into(), ip("fd00::3")),
            ("d".into(), None),
        ],
        "the annotation wins, then the first IPv4 InternalIP, then any; \
         unregistered Nodes and other scopes are not Tabby nodes"
    );
    assert_eq!(
        view.snapshot.nodes[0]
            .labels
            .get("zone")
            .map(String::as_str),
        Some("a")
    );
    let peers: Vec<IpAddr> = desired_peers(&view, "a", "10.1.0.1".parse().unwrap())
        .iter()
        .map(|p| p.addr)
        .collect();
    assert_eq!(peers, vec![ip("10.1.0.2").unwrap(), ip("fd00::3").unwrap()]);
}

fn object(key: &str, name: &str, spec: serde_json::Value) -> (&'static Kind, DynamicObject) {
    let kind = kind_of(key).unwrap().0;
    let mut object = DynamicObject::new(name, &(kind.resource)()).data(json!({ "spec": spec }));
    object.metadata.resource_version = Some("3".into());
    if !key.starts_with("config/") {
        object.metadata.annotations = Some([("tabby.dev/key".into(), key.into())].into());
    }
    (kind, object)
}

#[test]
fn custom_resources_become_the_view_the_datastore_would_read() {
    let objects = [
        object(
            "pools/p1",
            "p1",
            json!({"name": "p1", "cidr": "10.244.0.0/16", "blockSize": 26}),
        ),
        object(
            "bgppeers/r1",
            "r1",
            json!({"name": "r1", "peerIp": "10.0.0.254", "asNumber": 65001}),
        ),
        object(
            "config/bgp",
            "default",
            json!({"asNumber": 65000, "nodeToNodeMesh": false}),
        ),
        object("config/bgp", "other", json!({"asNumber": 1})),
    ];
    let view = view_of([], objects.iter().map(|(k, o)| (*k, o)), None).unwrap();
    assert_eq!(view.snapshot.pools.len(), 1);
    assert_eq!(view.snapshot.pools[0].node_selector, "all()");
    assert_eq!(view.peers[0].peer_ip.to_string(), "10.0.0.254");
    assert_eq!(
        view.bgp.as_number, 65000,
        "only the BGPConfiguration named default"
    );
    assert!(!view.bgp.node_to_node_mesh);

    let (kind, bad) = object("pools/p2", "p2", json!({"name": "p2"}));
    let e = view_of([], [(kind, &bad)], None).unwrap_err();
    assert!(chain(&e).to_string().contains("pools/p2"), "{}", chain(&e));
}

/// A datastore that records every key and prefix read.
#[derive(Default)]
struct Recording {
    inner: MemDatastore,
    reads: Mutex<BTreeSet<String>>,
}

impl Datastore for Recording {
    fn get(&self, key: &str) -> DsResult<Option<Entry>> {
        self.reads.lock().unwrap().insert(key.into());
        self.inner.get(key)
    }
    fn list(&self, prefix: &str) -> DsResult<Vec<Entry>> {
        self.reads.lock().unwrap().insert(prefix.into());
        self.inner.list(prefix)
    }
    fn create(&self, key: &str, value: &[u8]) -> DsResult<Revision> {
        self.inner.create(key, value)
    }
    fn update(&self, key: &str, value: &[u8], expected: &Revision) -> DsResult<Revision> {
        self.inner.update(key, value, expected)
    }
    fn delete(&self, key: &str, expected: &Revision) -> DsResult<()> {
        self.inner.delete(key, expected)
    }
    fn ping(&self) -> DsResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "recording".into()
    }
    fn node_lock(&self, node: &str) -> DsResult<NodeLock> {
        self.inner.node_lock(node)
    }
}

#[test]
fn every_document_the_polling_agent_reads_is_watched() {
    let ds = Recording::default();
    load_view(&ds).unwrap();
    let watched: BTreeSet<&str> = WATCHED.iter().copied().chain([NODES]).collect();
    for read in ds.reads.lock().unwrap().iter() {
        assert!(
            watched.contains(read.as_str()) || read == HANDLES,
            "load_view reads {read}, which no watch covers: add its kind to WATCHED"
        );
    }
    assert_eq!(
        watched_kinds().len(),
        WATCHED.len(),
        "every watched key has a CRD"
    );
}
