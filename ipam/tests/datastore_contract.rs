//! The `Datastore` contract itself (compare-and-swap, compare-and-delete,
//! prefix listing, node documents) on every backend, and what only the
//! Kubernetes backend has: names, labels, Node annotations, the schema.

mod common;

use common::backends::{backend_tests, kubeconfig, Backend, TestStore};
use tabby_ipam::{Datastore, DatastoreError, KubeDatastore, KubeOptions};

backend_tests!(
    [mem, file, kubernetes];
    create_update_delete_follow_compare_and_swap,
    relaxed_update_and_delete_follow_compare_and_swap_too,
    deferred_writes_follow_compare_and_swap_and_are_seen_by_another_opening_before_their_sync,
    list_filters_by_prefix_and_sorts,
    node_documents_are_created_once_updated_by_revision_and_deleted,
);

const BLOCK: &str = "blocks/10.0.0.0-30";

fn block(n: usize) -> Vec<u8> {
    // A valid /30 block with `n` of its 4 addresses taken by handle h.
    let allocations: Vec<Option<usize>> = (0..4).map(|i| (i < n).then_some(0)).collect();
    let unallocated: Vec<usize> = (n..4).collect();
    serde_json::to_vec(&serde_json::json!({
        "cidr": "10.0.0.0/30",
        "affinity": "host:node-a",
        "allocations": allocations,
        "unallocated": unallocated,
        "attributes": [{"handleId": "h", "secondary": {}}],
    }))
    .unwrap()
}

/// `value` is the document `block(n)` (a backend may fill in the
/// schema's defaults, so the two are compared decoded).
fn assert_is_block(value: &[u8], n: usize) {
    assert_eq!(
        serde_json::from_slice::<tabby_ipam::Block>(value).unwrap(),
        serde_json::from_slice::<tabby_ipam::Block>(&block(n)).unwrap()
    );
}

fn affinity(node: &str, cidr: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"node": node, "cidr": cidr, "state": "confirmed"}))
        .unwrap()
}

fn create_update_delete_follow_compare_and_swap(backend: Backend) {
    let store = TestStore::new(backend);
    let ds = store.datastore();
    assert!(ds.get(BLOCK).unwrap().is_none());
    let rev = ds.create(BLOCK, &block(1)).expect("create");
    assert!(matches!(
        ds.create(BLOCK, &block(2)),
        Err(DatastoreError::Conflict { .. })
    ));
    let rev2 = ds.update(BLOCK, &block(2), &rev).expect("update");
    assert_ne!(rev2, rev);
    assert!(matches!(
        ds.update(BLOCK, &block(3), &rev),
        Err(DatastoreError::Conflict { .. })
    ));
    let got = ds.get(BLOCK).unwrap().expect("present");
    assert_is_block(&got.value, 2);
    assert_eq!(got.revision, rev2);
    assert_eq!(got.key, BLOCK);
    assert!(matches!(
        ds.delete(BLOCK, &rev),
        Err(DatastoreError::Conflict { .. })
    ));
    ds.delete(BLOCK, &rev2).expect("delete");
    assert!(ds.get(BLOCK).unwrap().is_none());
    assert!(matches!(
        ds.delete(BLOCK, &rev2),
        Err(DatastoreError::NotFound { .. })
    ));
    assert!(
        matches!(
            ds.update(BLOCK, &block(1), &rev2),
            Err(DatastoreError::Conflict { .. })
        ),
        "updating a deleted document is a lost race"
    );
    // Re-created documents never reuse a revision (no ABA).
    let rev3 = ds.create(BLOCK, &block(0)).expect("create again");
    assert!(rev3 != rev2 && rev3 != rev);
    ds.ping().expect("ping");
}

/// The relaxed writes of a release (which may skip the directory fsync)
/// are still atomic compare-and-swap: a stale revision never wins.
fn relaxed_update_and_delete_follow_compare_and_swap_too(backend: Backend) {
    let store = TestStore::new(backend);
    let ds = store.datastore();
    let rev = ds.create(BLOCK, &block(2)).expect("create");
    let rev2 = ds.update_relaxed(BLOCK, &block(1), &rev).expect("update");
    assert_ne!(rev2, rev);
    assert!(matches!(
        ds.update_relaxed(BLOCK, &block(0), &rev),
        Err(DatastoreError::Conflict { .. })
    ));
    let got = ds.get(BLOCK).unwrap().expect("present");
    assert_eq!(got.revision, rev2);
    assert_is_block(&got.value, 1);
    assert!(matches!(
        ds.delete_relaxed(BLOCK, &rev),
        Err(DatastoreError::Conflict { .. })
    ));
    ds.delete_relaxed(BLOCK, &rev2).expect("delete");
    assert!(ds.get(BLOCK).unwrap().is_none());
    assert!(matches!(
        ds.delete_relaxed(BLOCK, &rev2),
        Err(DatastoreError::NotFound { .. })
    ));
    assert!(matches!(
        ds.update_relaxed(BLOCK, &block(1), &rev2),
        Err(DatastoreError::Conflict { .. })
    ));
}

/// The deferred writes of an assign are atomic compare-and-swap like the
/// durable ones, and every other opening of the store (another plugin
/// process) sees them before their sync: only their way to the disk waits.
fn deferred_writes_follow_compare_and_swap_and_are_seen_by_another_opening_before_their_sync(
    backend: Backend,
) {
    let store = TestStore::new(backend);
    let ds = store.datastore();
    let other = store.open_another();
    let rev = ds.create_deferred(BLOCK, &block(1)).expect("create");
    assert!(matches!(
        other.create_deferred(BLOCK, &block(2)),
        Err(DatastoreError::Conflict { .. })
    ));
    assert_eq!(other.get(BLOCK).unwrap().expect("seen").revision, rev);
    let rev2 = ds.update_deferred(BLOCK, &block(2), &rev).expect("update");
    assert!(matches!(
        other.update_deferred(BLOCK, &block(3), &rev),
        Err(DatastoreError::Conflict { .. })
    ));
    let seen = other.get(BLOCK).unwrap().expect("seen");
    assert_eq!(seen.revision, rev2);
    assert_is_block(&seen.value, 2);
    ds.sync(&[BLOCK.to_string()]).expect("sync");
    assert_eq!(ds.get(BLOCK).unwrap().expect("present").revision, rev2);
}

fn list_filters_by_prefix_and_sorts(backend: Backend) {
    let store = TestStore::new(backend);
    let ds = store.datastore();
    for (node, cidr) in [
        ("node-a", "10.0.0.64/26"),
        ("node-a", "10.0.0.0/26"),
        ("node-ab", "10.0.1.0/26"),
    ] {
        let key = format!("affinities/{node}/{}", cidr.replace('/', "-"));
        ds.create(&key, &affinity(node, cidr)).expect("create");
    }
    ds.create(BLOCK, &block(0)).expect("create");
    let keys = |prefix: &str| -> Vec<String> {
        ds.list(prefix)
            .expect("list")
            .into_iter()
            .map(|e| e.key)
            .collect()
    };
    assert_eq!(
        keys("affinities/node-a/"),
        [
            "affinities/node-a/10.0.0.0-26",
            "affinities/node-a/10.0.0.64-26"
        ]
    );
    assert_eq!(
        keys("affinities/node-a"),
        [
            "affinities/node-a/10.0.0.0-26",
            "affinities/node-a/10.0.0.64-26",
            "affinities/node-ab/10.0.1.0-26"
        ],
        "a prefix, not a node, sorted by key"
    );
    assert_eq!(keys("affinities/").len(), 3);
    assert_eq!(keys("blocks/"), [BLOCK]);
    assert_eq!(keys("").len(), 4);
    assert!(keys("pools/").is_empty());
    assert!(keys("affinities/node-b/").is_empty());
}

fn node_documents_are_created_once_updated_by_revision_and_deleted(backend: Backend) {
    let store = TestStore::new(backend);
    let ds = store.datastore();
    let key = "nodes/node-x";
    let doc = |address: &str| {
        serde_json::to_vec(&serde_json::json!({
            "name": "node-x", "address": address, "asn": 64512, "labels": {"zone": "a"}
        }))
        .unwrap()
    };
    let rev = ds.create(key, &doc("10.0.0.1")).expect("create");
    assert!(matches!(
        ds.create(key, &doc("10.0.0.2")),
        Err(DatastoreError::Conflict { .. })
    ));
    let rev2 = ds.update(key, &doc("10.0.0.2"), &rev).expect("update");
    assert!(matches!(
        ds.update(key, &doc("10.0.0.3"), &rev),
        Err(DatastoreError::Conflict { .. })
    ));
    let got: serde_json::Value =
        serde_json::from_slice(&ds.get(key).unwrap().expect("present").value).unwrap();
    assert_eq!(got["address"], "10.0.0.2");
    assert_eq!(got["asn"], 64512);
    assert_eq!(got["labels"]["zone"], "a");
    assert_eq!(ds.list("nodes/").unwrap().len(), 1);
    ds.delete(key, &rev2).expect("delete");
    assert!(ds.get(key).unwrap().is_none());
    assert!(ds.list("nodes/").unwrap().is_empty());
}

fn kube_store() -> (TestStore, KubeDatastore) {
    let store = TestStore::new(Backend::Kube);
    let scope = match store.config() {
        tabby_ipam::DatastoreConfig::Kubernetes(o) => o.scope.clone(),
        _ => unreachable!(),
    };
    let ds = KubeDatastore::open(&KubeOptions {
        kubeconfig: Some(kubeconfig()),
        scope,
    })
    .unwrap();
    (store, ds)
}

#[test]
fn kubernetes_objects_have_readable_names_labels_and_their_key() {
    let (_store, ds) = kube_store();
    let scope = ds.scope().unwrap().to_string();
    ds.create(BLOCK, &block(1)).unwrap();
    ds.create(
        "affinities/node-a/10.0.0.0-30",
        &affinity("node-a", "10.0.0.0/30"),
    )
    .unwrap();
    ds.create(
        "handles/My_Net.abc",
        br#"{"handleId":"My_Net.abc","block":{"10.0.0.0/30":1}}"#,
    )
    .unwrap();
    let cp = tabby_testkit::kube::shared();
    let get = |args: &[&str]| cp.kubectl(args).unwrap_or_else(|e| panic!("{e}"));
    let block = get(&[
        "get",
        "ipamblocks",
        &format!("{scope}.10-0-0-0-30"),
        "-o",
        "json",
    ]);
    let block: serde_json::Value = serde_json::from_str(&block).unwrap();
    assert_eq!(block["metadata"]["annotations"]["tabby.dev/key"], BLOCK);
    assert_eq!(block["metadata"]["labels"]["tabby.dev/node"], "node-a");
    assert_eq!(block["spec"]["cidr"], "10.0.0.0/30");
    let affinities = get(&[
        "get",
        "blockaffinities",
        "-l",
        "tabby.dev/node=node-a",
        "-o",
        "name",
    ]);
    assert!(
        affinities.contains(&format!("{scope}.node-a.10-0-0-0-30")),
        "{affinities}"
    );
    let handles = get(&[
        "get",
        "ipamhandles",
        "-l",
        &format!("tabby.dev/scope={scope}"),
        "-o",
        "name",
    ]);
    assert!(
        handles.contains(&format!("{scope}.my-net-abc-")),
        "{handles}"
    );
    assert_eq!(
        ds.get("handles/My_Net.abc").unwrap().unwrap().key,
        "handles/My_Net.abc"
    );
}

#[test]
fn kubernetes_refuses_documents_the_schema_would_prune_and_keys_it_has_no_kind_for() {
    let (_store, ds) = kube_store();
    let extra = br#"{"name":"p","cidr":"10.0.0.0/24","blockSize":26,"colour":"red"}"#;
    let err = ds.create("pools/p", extra).unwrap_err();
    assert!(
        matches!(&err, DatastoreError::Corrupt { reason, .. } if reason.contains("colour")),
        "{err}"
    );
    assert!(matches!(
        ds.create("other/x", b"{}"),
        Err(DatastoreError::Corrupt { .. })
    ));
    assert!(matches!(
        ds.create("pools/p", b"{}"),
        Err(DatastoreError::Corrupt { .. })
    ));
}

#[test]
fn kubernetes_nodes_are_annotations_on_the_kubernetes_node() {
    let (_store, ds) = kube_store();
    let scope = ds.scope().unwrap().to_string();
    let cp = tabby_testkit::kube::shared();
    // A Node that exists without Tabby (the kubelet registered it).
    let node = format!("{scope}.worker");
    let manifest = format!(
        r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}","labels":{{"tabby.dev/scope":"{scope}","zone":"b"}}}}}}"#
    );
    let path = std::env::temp_dir().join(format!("{node}.json"));
    std::fs::write(&path, manifest).unwrap();
    cp.kubectl(&["create", "-f", path.to_str().unwrap()])
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        ds.get("nodes/worker").unwrap().is_none(),
        "not registered with Tabby yet"
    );
    let doc = br#"{"name":"worker","address":"10.98.0.7","asn":65001,"labels":{"ignored":"x"}}"#;
    let rev = ds
        .create("nodes/worker", doc)
        .expect("register on the existing Node");
    let annotations = cp
        .kubectl(&[
            "get",
            "node",
            &node,
            "-o",
            "jsonpath={.metadata.annotations}",
        ])
        .unwrap();
    assert!(
        annotations.contains(r#""tabby.dev/bgp-address":"10.98.0.7""#),
        "{annotations}"
    );
    assert!(
        annotations.contains(r#""tabby.dev/as-number":"65001""#),
        "{annotations}"
    );
    let got: serde_json::Value =
        serde_json::from_slice(&ds.get("nodes/worker").unwrap().unwrap().value).unwrap();
    assert_eq!(
        got["labels"],
        serde_json::json!({"zone": "b"}),
        "labels are the Node's own"
    );
    // Someone else (a kubelet) changes the Node: our revision is stale.
    cp.kubectl(&["label", "node", &node, "rack=r1"]).unwrap();
    let stale = ds.update("nodes/worker", doc, &rev).unwrap_err();
    assert!(matches!(stale, DatastoreError::Conflict { .. }), "{stale}");
    let missing = ds
        .update("nodes/gone", br#"{"name":"gone"}"#, &rev)
        .unwrap_err();
    assert!(
        matches!(missing, DatastoreError::NotFound { .. }),
        "{missing}"
    );
}

#[test]
fn kubernetes_unreachable_is_unavailable_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: x\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let ds = KubeDatastore::open(&KubeOptions {
        kubeconfig: Some(path),
        scope: None,
    })
    .expect("open sends nothing");
    let err = ds.get("pools/p").unwrap_err();
    let chain = tabby_testkit::error_chain(&err);
    assert!(matches!(err, DatastoreError::Unavailable { .. }), "{chain}");
    assert!(chain.to_lowercase().contains("connect"), "{chain}");
    assert!(ds.ping().is_err());
}
