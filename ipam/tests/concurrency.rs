//! Many threads and many processes claiming from one small pool at once,
//! and several writers storming one block, on the file backend and on the
//! Kubernetes backend (each child process opens the store from its config,
//! as a CNI plugin does).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::backends::{backend_tests, Backend, TestStore};
use common::{assert_affinities_consistent, pool, v4};
use tabby_ipam::{Datastore, DatastoreConfig, Ipam};

const NODES: usize = 4;
/// The child's datastore config (JSON).
const CHILD_DATASTORE: &str = "TABBY_IPAM_TEST_DATASTORE";
/// The child's work: `node,tag,count`.
const CHILD_WORK: &str = "TABBY_IPAM_TEST_CHILD";

backend_tests!(
    [file, kubernetes];
    four_nodes_with_many_threads_never_share_an_address_or_a_block,
    concurrent_processes_of_four_nodes_never_share_an_address_or_a_block,
    sixty_four_concurrent_processes_on_one_node_share_its_blocks_without_conflict_storms,
    processes_killed_midway_leave_valid_documents_and_a_usable_store,
    writers_storming_one_block_end_with_a_consistent_block_and_no_lost_allocation,
);

/// Assigns `count` addresses as `node`, each with its own handle, through
/// its own store handle (as a separate CNI process would).
fn assign_many(ds: Arc<dyn Datastore>, node: &str, tag: &str, count: usize) -> Vec<IpAddr> {
    let ipam = Ipam::new(ds);
    (0..count)
        .map(|i| {
            let args = v4(&format!("net.{node}-{tag}-{i}"), node);
            ipam.assign(&args)
                .unwrap_or_else(|e| panic!("{node} {tag} {i}: {e}"))[0]
                .ip()
        })
        .collect()
}

fn assert_distinct(ips: &[IpAddr]) {
    let unique: HashSet<&IpAddr> = ips.iter().collect();
    assert_eq!(unique.len(), ips.len(), "an address was handed out twice");
}

fn four_nodes_with_many_threads_never_share_an_address_or_a_block(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    // 16 blocks of 16 addresses; 4 nodes x 6 threads x 8 = 192 addresses.
    ipam.create_pool(&pool("small", "10.250.0.0/24", 28))
        .expect("pool");
    let threads: Vec<_> = (0..NODES * 6)
        .map(|t| {
            let ds = store.open_another();
            std::thread::spawn(move || {
                assign_many(ds, &format!("node-{}", t % NODES), &t.to_string(), 8)
            })
        })
        .collect();
    let ips: Vec<IpAddr> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(ips.len(), NODES * 6 * 8);
    assert_distinct(&ips);
    assert_affinities_consistent(ipam.datastore());
    store.assert_documents_valid();
    // And everything can be given back.
    let valid = HashSet::new();
    assert_eq!(ipam.gc("net.", &valid).expect("gc").len(), ips.len());
    assert_affinities_consistent(ipam.datastore());
}

/// Entry point of the child processes of the test below; does nothing when
/// run as an ordinary test.
#[test]
fn child_process_entry() {
    let (Ok(config), Ok(spec)) = (std::env::var(CHILD_DATASTORE), std::env::var(CHILD_WORK)) else {
        return;
    };
    let config: DatastoreConfig = serde_json::from_str(&config).expect("datastore config");
    let mut parts = spec.splitn(3, ',');
    let (Some(node), Some(tag), Some(count)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {CHILD_WORK} {spec}");
    };
    let count = count.parse().expect("count");
    let ds = Arc::from(config.open().expect("open the datastore"));
    for ip in assign_many(ds, node, tag, count) {
        println!("ASSIGNED {ip}");
    }
}

/// Runs `processes` children, child `p` assigning `per_child` addresses as
/// node `node_of(p)`; returns every address they got.
fn run_children(
    store: &TestStore,
    processes: usize,
    per_child: usize,
    node_of: impl Fn(usize) -> String,
) -> Vec<IpAddr> {
    let exe = std::env::current_exe().expect("current_exe");
    let config = serde_json::to_string(store.config()).expect("config");
    let children: Vec<_> = (0..processes)
        .map(|p| {
            let spec = format!("{},p{p},{per_child}", node_of(p));
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_process_entry",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_WORK, spec)
                .env(CHILD_DATASTORE, &config)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let mut ips = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("child");
        assert!(
            out.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        // libtest's own "test ... " text may share a line with ours.
        let found = text
            .lines()
            .filter_map(|l| l.split_once("ASSIGNED ").map(|(_, ip)| ip.trim()));
        ips.extend(found.map(|ip| ip.parse::<IpAddr>().expect("ip")));
    }
    ips
}

fn concurrent_processes_of_four_nodes_never_share_an_address_or_a_block(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("small", "10.251.0.0/24", 28))
        .expect("pool");
    let ips = run_children(&store, 16, 10, |p| format!("node-{}", p % NODES));
    assert_eq!(ips.len(), 160);
    assert_distinct(&ips);
    assert_affinities_consistent(ipam.datastore());
    store.assert_documents_valid();
}

fn sixty_four_concurrent_processes_on_one_node_share_its_blocks_without_conflict_storms(
    backend: Backend,
) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("default", "10.252.0.0/16", 26))
        .expect("pool");
    let ips = run_children(&store, 64, 2, |_| "node-a".to_string());
    assert_eq!(ips.len(), 128);
    assert_distinct(&ips);
    assert_affinities_consistent(ipam.datastore());
    store.assert_documents_valid();
}

fn processes_killed_midway_leave_valid_documents_and_a_usable_store(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("small", "10.253.0.0/24", 28))
        .expect("pool");
    let exe = std::env::current_exe().expect("current_exe");
    let config = serde_json::to_string(store.config()).expect("config");
    let mut children: Vec<_> = (0..8)
        .map(|p| {
            Command::new(&exe)
                .args(["--exact", "child_process_entry", "--test-threads=1"])
                .env(CHILD_WORK, format!("node-{},k{p},30", p % NODES))
                .env(CHILD_DATASTORE, &config)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    // Kill them once they are busy: some addresses are handed out already.
    tabby_testkit::wait_until("the children to assign", Duration::from_secs(60), || {
        tabby_ipam::report::Snapshot::load(ipam.datastore())
            .is_ok_and(|s| s.blocks.iter().map(|b| b.in_use()).sum::<usize>() >= 4)
    });
    for child in &mut children {
        // SIGKILL: no chance to finish a write or clean up.
        let _ = child.kill();
        let _ = child.wait();
    }
    store.assert_documents_valid();
    // Every node can still assign (pending claims of the dead are resolved),
    // and nothing handed out collides with what the dead processes got.
    let snapshot = tabby_ipam::report::Snapshot::load(ipam.datastore()).expect("snapshot");
    let taken: HashSet<IpAddr> = snapshot
        .blocks
        .iter()
        .flat_map(|b| b.allocated().map(|(ip, _)| ip))
        .collect();
    for node in 0..NODES {
        let ip = ipam
            .assign(&v4(&format!("after-{node}"), &format!("node-{node}")))
            .expect("assign")[0]
            .ip();
        assert!(!taken.contains(&ip));
    }
    store.assert_documents_valid();
}

/// Writers per block in the storm, and rounds per writer.
const STORM_WRITERS: usize = 6;
const STORM_ROUNDS: usize = 12;

/// One storm writer: assigns in every round and gives back its oldest
/// handle every third round; returns what it still holds.
fn storm_writer(ds: Arc<dyn Datastore>, w: usize) -> BTreeMap<String, IpAddr> {
    let ipam = Ipam::new(ds);
    let mut held = BTreeMap::new();
    for round in 0..STORM_ROUNDS {
        let handle = format!("net.w{w}-{round}");
        let ip = ipam
            .assign(&v4(&handle, "node-a"))
            .unwrap_or_else(|e| panic!("writer {w} round {round}: {e}"))[0]
            .ip();
        held.insert(handle, ip);
        if round % 3 == 2 {
            let oldest = held.keys().next().cloned().expect("held");
            let released = ipam.release_by_handle(&oldest).expect("release");
            assert_eq!(released.len(), 1, "{oldest} held one address");
            assert_eq!(released[0].ip, held.remove(&oldest).expect("held"));
        }
    }
    held
}

fn writers_storming_one_block_end_with_a_consistent_block_and_no_lost_allocation(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    // One block of 64: every write of every writer races on one document.
    ipam.create_pool(&pool("storm", "10.254.0.0/26", 26))
        .expect("pool");
    ipam.assign(&v4("net.seed", "node-a"))
        .expect("claim the block");
    let writers: Vec<_> = (0..STORM_WRITERS)
        .map(|w| {
            let ds = store.open_another();
            std::thread::spawn(move || storm_writer(ds, w))
        })
        .collect();
    let mut held: BTreeMap<String, IpAddr> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    held.insert(
        "net.seed".into(),
        ipam.addresses_of("net.seed").expect("seed")[0],
    );

    let snap = tabby_ipam::report::Snapshot::load(ipam.datastore()).expect("snapshot");
    assert_eq!(snap.blocks.len(), 1, "the storm stayed in one block");
    let block = &snap.blocks[0];
    block.validate().expect("the block's table is consistent");
    let in_block: BTreeMap<String, IpAddr> = block
        .allocated()
        .map(|(ip, a)| (a.handle_id.clone(), ip))
        .collect();
    assert_eq!(
        in_block, held,
        "every held address is allocated to its holder, and nothing else"
    );
    assert_eq!(
        block.in_use(),
        STORM_WRITERS * (STORM_ROUNDS - STORM_ROUNDS / 3) + 1
    );
    assert_affinities_consistent(ipam.datastore());
}
