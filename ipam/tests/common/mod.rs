//! Helpers shared by the IPAM integration tests.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod backends;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tabby_ipam::report::{self, Snapshot};
use tabby_ipam::store;
use tabby_ipam::{AffinityState, AssignArgs, BlockAffinity, Datastore, IpPool};

/// A pool named `name` with default flags.
pub fn pool(name: &str, cidr: &str, block_size: u8) -> IpPool {
    IpPool {
        block_size,
        ..IpPool::new(name, cidr.parse().expect("cidr"))
    }
}

/// One IPv4 address for `handle` on `node`.
pub fn v4(handle: &str, node: &str) -> AssignArgs {
    AssignArgs {
        handle: handle.to_string(),
        node: node.to_string(),
        attrs: BTreeMap::from([("pod".to_string(), handle.to_string())]),
        num_v4: 1,
        num_v6: 0,
        pools: Vec::new(),
    }
}

/// Asserts the affinity invariants: every block has exactly one confirmed
/// affinity, naming the node the block names; no block is confirmed for two nodes.
pub fn assert_affinities_consistent(ds: &impl Datastore) {
    let snap = Snapshot::load(ds).expect("snapshot");
    let mut confirmed: HashMap<String, Vec<String>> = HashMap::new();
    for a in &snap.affinities {
        if a.state == AffinityState::Confirmed {
            confirmed
                .entry(a.cidr.to_string())
                .or_default()
                .push(a.node.clone());
        }
    }
    for block in &snap.blocks {
        let nodes = confirmed
            .remove(&block.cidr.to_string())
            .unwrap_or_default();
        let owner = block.node().expect("every claimed block names a node");
        assert_eq!(
            nodes,
            vec![owner.to_string()],
            "block {} confirmed for {nodes:?}",
            block.cidr
        );
    }
    assert!(
        confirmed.is_empty(),
        "confirmed affinities without blocks: {confirmed:?}"
    );
    let pending: Vec<&BlockAffinity> = snap
        .affinities
        .iter()
        .filter(|a| a.state != AffinityState::Confirmed)
        .collect();
    assert!(pending.is_empty(), "pending affinities left: {pending:?}");
    let handle_problems = snapshot_problems(&snap);
    assert!(handle_problems.is_empty(), "{handle_problems:#?}");
}

/// What `report::check` finds wrong in the store, every handle's holder
/// taken as live.
pub fn problems(ds: &impl Datastore) -> Vec<String> {
    snapshot_problems(&Snapshot::load(ds).expect("snapshot"))
}

fn snapshot_problems(snap: &Snapshot) -> Vec<String> {
    report::check(snap, |_| report::Liveness::Live)
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Asserts every document file under `dir` parses as JSON.
pub fn assert_all_json(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        if entry.file_type().expect("type").is_dir() {
            count += assert_all_json(&path);
        } else if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("read");
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            count += 1;
        }
    }
    count
}

/// The key of the affinity of `node` to `cidr`.
pub fn affinity_key(node: &str, cidr: &str) -> String {
    store::affinity_key(node, &cidr.parse().expect("cidr"))
}
