//! Many threads and many processes claiming from one small pool at once,
//! through the real file backend.

mod common;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use common::{assert_affinities_consistent, assert_all_json, pool, v4};
use tabby_ipam::{FileDatastore, Ipam};

const NODES: usize = 4;

/// Assigns `count` addresses as `node`, each with its own handle, through
/// its own store handle (as a separate CNI process would).
fn assign_many(dir: &Path, node: &str, tag: &str, count: usize) -> Vec<IpAddr> {
    let ipam = Ipam::new(FileDatastore::open(dir).expect("open"));
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

#[test]
fn four_nodes_with_many_threads_never_share_an_address_or_a_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ipam = Ipam::new(FileDatastore::open(dir.path()).expect("open"));
    // 16 blocks of 16 addresses; 4 nodes x 6 threads x 8 = 192 addresses.
    ipam.create_pool(&pool("small", "10.250.0.0/24", 28))
        .expect("pool");
    let threads: Vec<_> = (0..NODES * 6)
        .map(|t| {
            let path = dir.path().to_path_buf();
            std::thread::spawn(move || {
                assign_many(&path, &format!("node-{}", t % NODES), &t.to_string(), 8)
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
    assert_all_json(dir.path());
    // And everything can be given back.
    let valid = HashSet::new();
    assert_eq!(ipam.gc("net.", &valid).expect("gc").len(), ips.len());
    assert_affinities_consistent(ipam.datastore());
}

/// Entry point of the child processes of the test below; does nothing when
/// run as an ordinary test.
#[test]
fn child_process_entry() {
    let Ok(spec) = std::env::var("TABBY_IPAM_TEST_CHILD") else {
        return;
    };
    let mut parts = spec.splitn(4, ',');
    let (Some(dir), Some(node), Some(tag), Some(count)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("bad TABBY_IPAM_TEST_CHILD {spec}");
    };
    let count = count.parse().expect("count");
    for ip in assign_many(Path::new(dir), node, tag, count) {
        println!("ASSIGNED {ip}");
    }
}

/// Runs `processes` children, child `p` assigning `per_child` addresses as
/// node `node_of(p)`; returns every address they got.
fn run_children(
    dir: &Path,
    processes: usize,
    per_child: usize,
    node_of: impl Fn(usize) -> String,
) -> Vec<IpAddr> {
    let exe = std::env::current_exe().expect("current_exe");
    let children: Vec<_> = (0..processes)
        .map(|p| {
            let spec = format!("{},{},p{p},{per_child}", dir.display(), node_of(p));
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_process_entry",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("TABBY_IPAM_TEST_CHILD", spec)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let mut ips = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("child");
        assert!(out.status.success(), "child failed");
        let text = String::from_utf8_lossy(&out.stdout);
        // libtest's own "test ... " text may share a line with ours.
        let found = text
            .lines()
            .filter_map(|l| l.split_once("ASSIGNED ").map(|(_, ip)| ip.trim()));
        ips.extend(found.map(|ip| ip.parse::<IpAddr>().expect("ip")));
    }
    ips
}

#[test]
fn concurrent_processes_of_four_nodes_never_share_an_address_or_a_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ipam = Ipam::new(FileDatastore::open(dir.path()).expect("open"));
    ipam.create_pool(&pool("small", "10.251.0.0/24", 28))
        .expect("pool");
    let ips = run_children(dir.path(), 16, 10, |p| format!("node-{}", p % NODES));
    assert_eq!(ips.len(), 160);
    assert_distinct(&ips);
    assert_affinities_consistent(ipam.datastore());
    assert_all_json(dir.path());
}

#[test]
fn sixty_four_concurrent_processes_on_one_node_share_its_blocks_without_conflict_storms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ipam = Ipam::new(FileDatastore::open(dir.path()).expect("open"));
    ipam.create_pool(&pool("default", "10.252.0.0/16", 26))
        .expect("pool");
    let ips = run_children(dir.path(), 64, 2, |_| "node-a".to_string());
    assert_eq!(ips.len(), 128);
    assert_distinct(&ips);
    assert_affinities_consistent(ipam.datastore());
    assert_all_json(dir.path());
}

#[test]
fn processes_killed_midway_leave_valid_documents_and_a_usable_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ipam = Ipam::new(FileDatastore::open(dir.path()).expect("open"));
    ipam.create_pool(&pool("small", "10.253.0.0/24", 28))
        .expect("pool");
    let exe = std::env::current_exe().expect("current_exe");
    let mut children: Vec<_> = (0..8)
        .map(|p| {
            Command::new(&exe)
                .args(["--exact", "child_process_entry", "--test-threads=1"])
                .env(
                    "TABBY_IPAM_TEST_CHILD",
                    format!("{},node-{},k{p},30", dir.path().display(), p % NODES),
                )
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(150));
    for child in &mut children {
        // SIGKILL: no chance to finish a write or clean up.
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_all_json(dir.path());
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
    assert_all_json(dir.path());
}
