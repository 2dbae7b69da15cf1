//! What killed writers and bad documents leave, and how the allocator copes:
//! orphan handles, dead claims, stale temporary files, a pool whose
//! blockSize is corrupt, pools that can never work and addresses never to
//! hand out. Everything a backend could change runs on every backend
//! (memory, file, Kubernetes through the shared control plane).

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use common::backends::{backend_tests, Backend, TestStore};
use common::{pool, problems, v4};
use tabby_ipam::pools::validate_pool;
use tabby_ipam::report::{self, Snapshot};
use tabby_ipam::{store, AffinityState, BlockAffinity, Datastore, FileDatastore, Ipam, IpamError};

backend_tests!(
    [mem, file, kubernetes];
    handles_are_repaired_to_what_the_blocks_hold_on_the_chosen_node_only,
    a_handle_document_lost_by_a_crash_is_recreated_so_release_by_handle_finds_the_address,
    a_gc_under_the_node_lock_leaves_no_orphan_handle_dead_claim_or_stale_address,
    an_assign_that_fails_after_committing_releases_what_it_committed,
    pools_that_can_never_work_are_refused_and_nothing_is_stored,
    a_pool_smaller_than_a_block_keeps_its_network_and_broadcast_addresses,
    the_pods_gateway_is_never_handed_out_even_from_a_pool_written_before_validation,
    the_node_lock_excludes_another_opening_of_the_store_for_the_same_node_only,
);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn handles_are_repaired_to_what_the_blocks_hold_on_the_chosen_node_only(backend: Backend) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    ipam.assign(&v4("net.live", "a")).expect("assign");
    let ds = ipam.datastore();
    // A kill between the handle write and the block write, on node a and on node b.
    for (handle, node) in [("net.orphan-a", "a"), ("net.orphan-b", "b")] {
        let doc =
            serde_json::json!({"handleId": handle, "block": {"10.1.0.0/26": 1}, "node": node});
        ds.create(&store::handle_key(handle), doc.to_string().as_bytes())
            .expect("orphan handle");
    }
    assert_eq!(problems(ds).len(), 2, "{:?}", problems(ds));

    let repaired = ipam
        .repair_handles(|_, node| node == Some("a"))
        .expect("repair");
    let names: Vec<&str> = repaired.iter().map(|r| r.handle.as_str()).collect();
    assert_eq!(names, ["net.orphan-a"]);
    assert!(ds.get("handles/net.orphan-a").expect("get").is_none());
    assert!(ds.get("handles/net.orphan-b").expect("get").is_some());
    assert!(ds.get("handles/net.live").expect("get").is_some());
    assert_eq!(problems(ds).len(), 1, "{:?}", problems(ds));
    // The live handle's address is still released by its handle.
    assert_eq!(
        ipam.release_by_handle("net.live").expect("release").len(),
        1
    );
}

fn a_handle_document_lost_by_a_crash_is_recreated_so_release_by_handle_finds_the_address(
    backend: Backend,
) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    ipam.assign(&v4("net.lost", "a")).expect("assign");
    let ds = ipam.datastore();
    let doc = ds.get("handles/net.lost").expect("get").expect("handle");
    ds.delete(&doc.key, &doc.revision).expect("delete");
    let repaired = ipam.repair_handles(|_, _| true).expect("repair");
    assert_eq!(repaired.len(), 1);
    assert!(problems(ds).is_empty(), "{:?}", problems(ds));
    assert_eq!(
        ipam.release_by_handle("net.lost").expect("release").len(),
        1
    );
}

#[test]
fn stale_temporary_files_of_killed_writers_are_removed_on_open_and_fresh_ones_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = FileDatastore::open(dir.path()).expect("open");
    ds.create("blocks/10.0.0.0-26", b"{}").expect("create");
    ds.create("affinities/node-a/10.0.0.0-26", b"{}")
        .expect("create");
    let stale = [
        dir.path().join("blocks/.10.0.0.0-26.json.18a-1-0.tmp"),
        dir.path()
            .join("affinities/node-a/.10.0.0.0-26.json.18a-2-0.tmp"),
    ];
    let fresh = dir.path().join("blocks/.10.0.0.0-26.json.18b-3-0.tmp");
    for path in stale.iter().chain([&fresh]) {
        std::fs::write(path, b"{\"revision\":").expect("temp file");
    }
    let old = SystemTime::now() - Duration::from_secs(120);
    // A minute passed since the last sweep, too (opens look once a minute).
    let marker = dir.path().join(".swept");
    for path in stale.iter().chain([&marker]) {
        let file = std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open");
        file.set_modified(old).expect("age the file");
    }

    let ds = FileDatastore::open(dir.path()).expect("reopen");
    for path in &stale {
        assert!(!path.exists(), "{} was left", path.display());
    }
    assert!(
        fresh.exists(),
        "a writer's fresh temporary file was removed"
    );
    assert!(dir.path().join(".lock").exists());
    // Within the minute, opens do not walk the store again.
    std::fs::write(&stale[0], b"").expect("temp file");
    std::fs::File::options()
        .write(true)
        .open(&stale[0])
        .and_then(|f| f.set_modified(old))
        .expect("age the file");
    FileDatastore::open(dir.path()).expect("reopen");
    assert!(stale[0].exists());
    assert!(ds.get("blocks/10.0.0.0-26").expect("get").is_some());
    assert_eq!(ds.list("").expect("list").len(), 2);
}

fn an_assign_that_fails_after_committing_releases_what_it_committed(backend: Backend) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    ipam.assign(&v4("net.first", "a")).expect("assign");
    // The pool document's blockSize is corrupted once its block exists.
    let ds = ipam.datastore();
    let entry = ds.get("pools/p").expect("get").expect("pool");
    let mut doc: serde_json::Value = serde_json::from_slice(&entry.value).expect("json");
    doc["blockSize"] = serde_json::Value::from(40);
    ds.update(&entry.key, doc.to_string().as_bytes(), &entry.revision)
        .expect("corrupt");

    let err = ipam
        .assign(&v4("net.second", "a"))
        .expect_err("corrupt pool");
    assert!(matches!(err, IpamError::InvalidPool { .. }), "{err}");
    assert!(ipam
        .addresses_of("net.second")
        .expect("addresses")
        .is_empty());
    assert!(ds.get("handles/net.second").expect("get").is_none());
    assert_eq!(ipam.addresses_of("net.first").expect("addresses").len(), 1);
    assert!(problems(ds).is_empty(), "{:?}", problems(ds));
}

#[test]
fn pools_that_can_never_work_are_refused_with_the_reason() {
    let cases = [
        ("0.0.0.0/0", 20, "default route"),
        ("0.0.0.0/8", 26, "this network"),
        ("127.0.0.0/24", 26, "loopback"),
        ("169.254.0.0/16", 26, "link-local"),
        ("169.254.1.0/30", 30, "link-local"),
        ("224.0.0.0/24", 26, "multicast"),
        ("239.1.0.0/24", 26, "multicast"),
        ("240.0.0.0/24", 26, "reserved"),
        ("255.255.255.0/24", 26, "reserved"),
        ("128.0.0.0/1", 20, "link-local"),
        ("::/0", 116, "default route"),
        ("::1/128", 128, "loopback"),
        ("fe80::/64", 122, "link-local"),
        ("ff00::/120", 122, "multicast"),
    ];
    for (cidr, block, why) in cases {
        let err = validate_pool(&pool("p", cidr, block)).expect_err(cidr);
        assert!(
            matches!(err, IpamError::InvalidPool { .. }),
            "{cidr}: {err}"
        );
        assert!(err.to_string().contains(why), "{cidr}: {err}");
    }
    for (cidr, block) in [
        ("10.244.0.0/16", 26),
        ("192.168.5.0/30", 30),
        ("fd00::/64", 122),
    ] {
        validate_pool(&pool("p", cidr, block)).expect(cidr);
    }
}

fn pools_that_can_never_work_are_refused_and_nothing_is_stored(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    for (i, cidr) in [
        "127.0.0.0/24",
        "169.254.1.0/30",
        "224.0.0.0/24",
        "0.0.0.0/0",
    ]
    .into_iter()
    .enumerate()
    {
        let block = if cidr.ends_with("/0") { 26 } else { 30 };
        let err = ipam
            .create_pool(&pool(&format!("p{i}"), cidr, block))
            .expect_err(cidr);
        assert!(
            matches!(err, IpamError::InvalidPool { .. }),
            "{cidr}: {err}"
        );
        let err = ipam
            .ensure_default_pool(&pool(&format!("d{i}"), cidr, block))
            .expect_err(cidr);
        assert!(
            matches!(err, IpamError::InvalidPool { .. }),
            "{cidr}: {err}"
        );
    }
    assert!(ipam.pools().expect("pools").is_empty());
    assert!(ipam.datastore().list("pools/").expect("list").is_empty());
}

fn drain(ipam: &Ipam<impl Datastore>) -> BTreeSet<IpAddr> {
    let mut got = BTreeSet::new();
    for i in 0.. {
        match ipam.assign(&v4(&format!("net.h{i}"), "a")) {
            Ok(nets) => assert!(got.insert(nets[0].ip()), "{} twice", nets[0].ip()),
            Err(IpamError::Exhausted { .. }) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(i < 300, "the pool never ran out");
    }
    got
}

fn a_pool_smaller_than_a_block_keeps_its_network_and_broadcast_addresses(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.1.0.0/29", 29))
        .expect("pool");
    let got = drain(&ipam);
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(!got.contains(&ip("10.1.0.0")) && !got.contains(&ip("10.1.0.7")));
    let usage = report::usage(&Snapshot::load(ipam.datastore()).expect("snapshot"));
    assert_eq!(usage[0].usage.free(), 0, "reserved addresses are not free");

    // A block-sized pool and larger ones hand out every address, as Calico does.
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.2.0.0/26", 26))
        .expect("pool");
    assert_eq!(drain(&ipam).len(), 64);
}

fn the_pods_gateway_is_never_handed_out_even_from_a_pool_written_before_validation(
    backend: Backend,
) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    // A pool stored by an older release, which did not validate ranges.
    let old = pool("old", "169.254.1.0/31", 31);
    store::create(ipam.datastore(), &store::pool_key("old"), &old).expect("pool");
    let got = drain(&ipam);
    assert_eq!(got, BTreeSet::from([ip("169.254.1.0")]));
}

/// What the plugin's GC does on its node, in its order, under its lock:
/// release the stale attachments, then repair the handles and drop the
/// claims that killed writers left.
fn a_gc_under_the_node_lock_leaves_no_orphan_handle_dead_claim_or_stale_address(backend: Backend) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    ipam.assign(&v4("net.live", "a")).expect("assign");
    let stale = ipam.assign(&v4("net.stale", "a")).expect("assign");
    ipam.assign(&v4("net.other-node", "b")).expect("assign");
    let ds = ipam.datastore();
    // Killed between the handle and the block write (the address never came).
    let orphan =
        serde_json::json!({"handleId": "net.orphan", "block": {"10.1.0.0/26": 1}, "node": "a"});
    ds.create(
        &store::handle_key("net.orphan"),
        orphan.to_string().as_bytes(),
    )
    .expect("orphan handle");
    // Killed between the two phases of a claim.
    let dead = BlockAffinity {
        node: "a".into(),
        cidr: "10.1.0.192/26".parse().expect("cidr"),
        state: AffinityState::Pending,
    };
    store::create(ds, &store::affinity_key("a", &dead.cidr), &dead).expect("claim");
    assert_eq!(problems(ds).len(), 2, "{:?}", problems(ds));

    let lock = ds.node_lock("a").expect("node lock");
    let released = ipam
        .release_handles(&BTreeSet::from(["net.stale".to_string()]))
        .expect("release");
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].ip, stale[0].ip());
    let repaired = ipam
        .repair_handles(|_, node| node == Some("a"))
        .expect("repair");
    assert_eq!(repaired.len(), 1, "{repaired:?}");
    assert_eq!(ipam.drop_dead_claims("a").expect("claims"), [dead.cidr]);
    drop(lock);

    assert!(problems(ds).is_empty(), "{:?}", problems(ds));
    let handles: Vec<String> = ds
        .list("handles/")
        .expect("list")
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(handles, ["handles/net.live", "handles/net.other-node"]);
    assert!(ds.list("affinities/a/").expect("list").len() == 1);
    assert!(ipam
        .addresses_of("net.stale")
        .expect("addresses")
        .is_empty());
    assert!(ipam
        .addresses_of("net.orphan")
        .expect("addresses")
        .is_empty());
    assert_eq!(ipam.addresses_of("net.live").expect("addresses").len(), 1);
}

/// Another opening of the store (another plugin process of the node) waits
/// for the node's lock; other nodes' locks are independent.
fn the_node_lock_excludes_another_opening_of_the_store_for_the_same_node_only(backend: Backend) {
    let store = TestStore::new(backend);
    let held = store.datastore().node_lock("node-a").expect("lock");
    let other = store.open_another();
    let _b = other.node_lock("node-b").expect("another node's lock");
    let (took, taken) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let lock = other.node_lock("node-a").expect("lock");
        took.send(()).expect("send");
        drop(lock);
    });
    assert!(
        taken.recv_timeout(Duration::from_millis(300)).is_err(),
        "a second holder took node-a's lock while it was held"
    );
    drop(held);
    taken
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiter took the lock once it was freed");
    waiter.join().expect("waiter");
}
