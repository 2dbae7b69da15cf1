//! Many threads and many processes claiming from one small pool at once,
//! and several writers storming one block, on the file backend and on the
//! Kubernetes backend (each child process opens the store from its config,
//! as a CNI plugin does).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// Entry point of the child processes of the tests below (ignored in a
/// normal run; the parents run it with `--ignored`): opens the store from
/// `TABBY_IPAM_TEST_DATASTORE`, assigns what `TABBY_IPAM_TEST_CHILD` says
/// and prints each address as `ASSIGNED <ip>` once the store has committed
/// it.
#[test]
#[ignore = "a child process of the multi-process tests, run by them"]
fn child_process_entry() {
    let (Ok(config), Ok(spec)) = (std::env::var(CHILD_DATASTORE), std::env::var(CHILD_WORK)) else {
        panic!(
            "run only as a child of this file's tests ({CHILD_DATASTORE} or {CHILD_WORK} unset)"
        );
    };
    let config: DatastoreConfig = serde_json::from_str(&config).expect("datastore config");
    let mut parts = spec.splitn(3, ',');
    let (Some(node), Some(tag), Some(count)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {CHILD_WORK} {spec}");
    };
    let count = count.parse().expect("count");
    let ipam = Ipam::new(config.open().expect("open the datastore"));
    for i in 0..count {
        let args = v4(&format!("net.{node}-{tag}-{i}"), node);
        let ip = ipam
            .assign(&args)
            .unwrap_or_else(|e| panic!("{node} {tag} {i}: {e}"))[0]
            .ip();
        println!("ASSIGNED {ip}");
    }
}

/// A child process assigning `count` addresses as `node` in `store`;
/// stdout piped, stderr into `stderr`.
fn spawn_child(store: &TestStore, node: &str, tag: &str, count: usize, stderr: Stdio) -> Child {
    let config = serde_json::to_string(store.config()).expect("config");
    Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--exact",
            "child_process_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_WORK, format!("{node},{tag},{count}"))
        .env(CHILD_DATASTORE, config)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn child")
}

/// The addresses a child printed (libtest's own "test ... " text may share
/// a line with them).
fn assigned(stdout: &str) -> Vec<IpAddr> {
    stdout
        .lines()
        .filter_map(|l| l.split_once("ASSIGNED ").map(|(_, ip)| ip.trim()))
        .map(|ip| ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")))
        .collect()
}

/// Runs `processes` children, child `p` assigning `per_child` addresses as
/// node `node_of(p)`; each must succeed and report all of them. Returns
/// every address they got.
fn run_children(
    store: &TestStore,
    processes: usize,
    per_child: usize,
    node_of: impl Fn(usize) -> String,
) -> Vec<IpAddr> {
    let children: Vec<_> = (0..processes)
        .map(|p| {
            spawn_child(
                store,
                &node_of(p),
                &format!("p{p}"),
                per_child,
                Stdio::piped(),
            )
        })
        .collect();
    let mut ips = Vec::new();
    for (p, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("child");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "child {p} exited with {}:\n{stderr}\n{stdout}",
            out.status
        );
        let got = assigned(&stdout);
        assert_eq!(
            got.len(),
            per_child,
            "child {p} reported {got:?}:\n{stderr}"
        );
        ips.extend(got);
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

/// A child whose stdout is read line by line while it runs.
struct Watched {
    child: Child,
    lines: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
    stderr: PathBuf,
}

impl Watched {
    fn start(store: &TestStore, logs: &Path, node: &str, tag: &str, count: usize) -> Watched {
        let stderr = logs.join(format!("{tag}.stderr"));
        let file = std::fs::File::create(&stderr).expect("stderr file");
        let mut child = spawn_child(store, node, tag, count, file.into());
        let out = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Watched {
            child,
            lines,
            reader,
            stderr,
        }
    }

    fn assigned(&self) -> Vec<IpAddr> {
        assigned(&self.lines.lock().unwrap())
    }

    /// Waits for the child; its reported addresses and whether it was cut
    /// short by SIGKILL. Fails the test, with the child's stderr, when it
    /// neither finished its `count` nor was killed.
    fn finish(self, count: usize) -> (Vec<IpAddr>, bool) {
        let Watched {
            mut child,
            lines,
            reader,
            stderr,
        } = self;
        let status = child.wait().expect("wait for child");
        reader.join().expect("stdout reader");
        let got = assigned(&lines.lock().unwrap());
        let finished = status.success() && got.len() == count;
        let killed = status.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32);
        assert!(
            finished || killed,
            "a child neither finished nor was killed ({status}):\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        let cut_short = killed && got.len() < count;
        (got, cut_short)
    }
}

fn processes_killed_midway_leave_valid_documents_and_a_usable_store(backend: Backend) {
    const PER_CHILD: usize = 30;
    let store = TestStore::new(backend);
    let logs = tempfile::tempdir().expect("tempdir");
    let ipam = store.ipam();
    ipam.create_pool(&pool("small", "10.253.0.0/24", 28))
        .expect("pool");
    let mut children: Vec<Watched> = (0..8)
        .map(|p| {
            let node = format!("node-{}", p % NODES);
            Watched::start(&store, logs.path(), &node, &format!("k{p}"), PER_CHILD)
        })
        .collect();
    // Kill once every child is under way: each has committed an address.
    tabby_testkit::wait_until(
        "every child's first address",
        Duration::from_secs(60),
        || children.iter().all(|c| !c.assigned().is_empty()),
    );
    for c in &mut children {
        // SIGKILL: no chance to finish a write or clean up.
        let _ = c.child.kill();
    }
    let mut reported = Vec::new();
    let mut cut_short = 0;
    for c in children {
        let (got, short) = c.finish(PER_CHILD);
        cut_short += usize::from(short);
        reported.extend(got);
    }
    assert!(
        cut_short > 0,
        "every child finished before the kill: nothing was cut short"
    );
    assert_distinct(&reported);
    store.assert_documents_valid();
    // What a child reported it got is committed, even though it was killed.
    let snapshot = tabby_ipam::report::Snapshot::load(ipam.datastore()).expect("snapshot");
    let taken: HashSet<IpAddr> = snapshot
        .blocks
        .iter()
        .flat_map(|b| b.allocated().map(|(ip, _)| ip))
        .collect();
    let lost: Vec<&IpAddr> = reported.iter().filter(|ip| !taken.contains(ip)).collect();
    assert!(lost.is_empty(), "reported but not in the store: {lost:?}");
    // Every node can still assign (pending claims of the dead are resolved),
    // and nothing handed out collides with what the dead processes got.
    for node in 0..NODES {
        let ip = ipam
            .assign(&v4(&format!("after-{node}"), &format!("node-{node}")))
            .expect("assign")[0]
            .ip();
        assert!(!taken.contains(&ip), "{ip} handed out twice");
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
