//! The allocator's contract, run unchanged on every backend (memory, file,
//! and Kubernetes through the shared control plane).

mod common;

use std::collections::HashSet;
use std::net::IpAddr;

use common::backends::{backend_tests, Backend, TestStore};
use common::{assert_affinities_consistent, pool, v4};
use tabby_ipam::store;
use tabby_ipam::{AffinityState, BlockAffinity, Datastore, Ipam, IpamConfig, IpamError};

backend_tests!(
    [mem, file, kubernetes];
    assign_hands_out_addresses_from_the_nodes_own_block,
    release_by_handle_frees_the_address_and_the_handle,
    release_ip_frees_one_address_and_knows_foreign_ones,
    a_full_pool_is_borrowed_from_then_exhausted,
    strict_affinity_forbids_borrowing,
    max_blocks_per_host_limits_claims,
    no_pool_and_bad_requests_are_errors,
    dual_stack_assign_rolls_back_when_one_family_fails,
    gc_releases_handles_not_in_the_valid_list,
    pools_are_validated,
    ensure_default_pool_creates_exactly_one_pool_under_a_race,
    delete_pool_refuses_while_in_use_then_cleans_up,
    disabled_pools_hand_out_nothing,
    leftovers_of_a_crashed_claim_are_resolved,
    scoped_gc_releases_only_what_the_predicate_accepts,
    a_pool_restriction_of_one_family_leaves_the_other_family_free,
);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn assign_hands_out_addresses_from_the_nodes_own_block(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.ensure_default_pool(&pool("default-ipv4-ippool", "10.244.0.0/16", 26))
        .expect("pool");
    let a1 = ipam.assign(&v4("net.a1", "node-a")).expect("assign");
    let a2 = ipam.assign(&v4("net.a2", "node-a")).expect("assign");
    let b1 = ipam.assign(&v4("net.b1", "node-b")).expect("assign");
    assert_eq!(a1, vec!["10.244.0.0/26".parse().expect("net")]);
    assert_eq!(a2[0].ip(), ip("10.244.0.1"));
    assert_eq!(b1, vec!["10.244.0.64/26".parse().expect("net")]);
    assert!(ipam.datastore().get("nodes/node-a").expect("get").is_some());
    assert!(ipam
        .datastore()
        .get("handles/net.a1")
        .expect("get")
        .is_some());
    assert_affinities_consistent(ipam.datastore());
    assert!(store.assert_documents_valid() >= 7);
}

fn release_by_handle_frees_the_address_and_the_handle(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.0.0.0/24", 28))
        .expect("pool");
    let got = ipam.assign(&v4("net.c1", "n")).expect("assign");
    let released = ipam.release_by_handle("net.c1").expect("release");
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].ip, got[0].ip());
    assert_eq!(released[0].handle, "net.c1");
    assert!(ipam
        .datastore()
        .get("handles/net.c1")
        .expect("get")
        .is_none());
    assert!(ipam.release_by_handle("net.c1").expect("again").is_empty());
    assert!(ipam
        .release_by_handle("never-existed")
        .expect("missing")
        .is_empty());
    assert_affinities_consistent(ipam.datastore());
}

fn release_ip_frees_one_address_and_knows_foreign_ones(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.0.0.0/24", 28))
        .expect("pool");
    let mut args = v4("net.multi", "n");
    args.num_v4 = 2;
    let got = ipam.assign(&args).expect("assign");
    assert_eq!(got.len(), 2);
    let released = ipam
        .release_ip(got[0].ip())
        .expect("release")
        .expect("was allocated");
    assert_eq!(released.handle, "net.multi");
    assert!(ipam.release_ip(got[0].ip()).expect("release").is_none());
    assert!(matches!(
        ipam.release_ip(ip("192.168.1.1")),
        Err(IpamError::NotInPool { .. })
    ));
    assert_affinities_consistent(ipam.datastore());
    assert_eq!(ipam.release_by_handle("net.multi").expect("rest").len(), 1);
    assert_affinities_consistent(ipam.datastore());
}

fn a_full_pool_is_borrowed_from_then_exhausted(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    // Two blocks of 8 addresses; a pool smaller than a /26 keeps its
    // network and broadcast addresses (10.1.0.0, 10.1.0.15): 14 to hand out.
    ipam.create_pool(&pool("small", "10.1.0.0/28", 29))
        .expect("pool");
    let mut a = Vec::new();
    for i in 0..9 {
        a.push(
            ipam.assign(&v4(&format!("a{i}"), "node-a"))
                .expect("assign")[0]
                .ip(),
        );
    }
    // node-a holds both blocks; node-b must borrow the last 5 addresses.
    for i in 0..5 {
        let got = ipam
            .assign(&v4(&format!("b{i}"), "node-b"))
            .expect("borrow")[0]
            .ip();
        assert!(!a.contains(&got));
        a.push(got);
    }
    let err = ipam.assign(&v4("b-last", "node-b")).expect_err("exhausted");
    assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    assert!(err.to_string().contains("small"));
    assert_eq!(a.iter().collect::<HashSet<_>>().len(), 14);
    assert!(!a.contains(&ip("10.1.0.0")) && !a.contains(&ip("10.1.0.15")));
    assert_affinities_consistent(ipam.datastore());
}

fn strict_affinity_forbids_borrowing(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("small", "10.1.0.0/29", 29))
        .expect("pool");
    ipam.set_config(&IpamConfig {
        strict_affinity: true,
        max_blocks_per_host: 0,
    })
    .expect("config");
    assert!(ipam.config().expect("config").strict_affinity);
    ipam.assign(&v4("a", "node-a")).expect("assign");
    let err = ipam.assign(&v4("b", "node-b")).expect_err("no borrowing");
    assert!(matches!(err, IpamError::Exhausted { .. }));
}

fn max_blocks_per_host_limits_claims(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.1.0.0/24", 30))
        .expect("pool");
    ipam.set_config(&IpamConfig {
        strict_affinity: true,
        max_blocks_per_host: 1,
    })
    .expect("config");
    for i in 0..4 {
        ipam.assign(&v4(&format!("a{i}"), "node-a"))
            .expect("assign");
    }
    assert!(matches!(
        ipam.assign(&v4("a5", "node-a")),
        Err(IpamError::Exhausted { .. })
    ));
}

fn no_pool_and_bad_requests_are_errors(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    assert!(matches!(
        ipam.assign(&v4("h", "n")),
        Err(IpamError::NoPool { family: 4 })
    ));
    ipam.create_pool(&pool("p", "10.1.0.0/24", 26))
        .expect("pool");
    let mut v6 = v4("h", "n");
    v6.num_v4 = 0;
    v6.num_v6 = 1;
    assert!(matches!(
        ipam.assign(&v6),
        Err(IpamError::NoPool { family: 6 })
    ));
    assert!(matches!(
        ipam.assign(&v4("", "n")),
        Err(IpamError::InvalidRequest { .. })
    ));
    assert!(matches!(
        ipam.assign(&v4("h", "")),
        Err(IpamError::InvalidRequest { .. })
    ));
}

fn dual_stack_assign_rolls_back_when_one_family_fails(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("v4", "10.1.0.0/24", 26))
        .expect("pool");
    ipam.create_pool(&pool("v6", "fd00:10::/120", 122))
        .expect("pool");
    let mut args = v4("dual", "n");
    args.num_v6 = 1;
    let got = ipam.assign(&args).expect("assign");
    assert_eq!(got.len(), 2);
    assert_eq!(got[1], "fd00:10::/122".parse().expect("net"));
    // Exhaust the v6 pool (4 blocks of 64) and check the v4 address is given back.
    let mut only_v6 = v4("v6-filler", "n");
    only_v6.num_v4 = 0;
    only_v6.num_v6 = 255;
    ipam.assign(&only_v6).expect("fill v6");
    let mut args = v4("dual-2", "n");
    args.num_v6 = 1;
    assert!(matches!(
        ipam.assign(&args),
        Err(IpamError::Exhausted { .. })
    ));
    assert!(ipam
        .datastore()
        .get("handles/dual-2")
        .expect("get")
        .is_none());
    assert_affinities_consistent(ipam.datastore());
}

fn gc_releases_handles_not_in_the_valid_list(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.1.0.0/24", 26))
        .expect("pool");
    for h in ["net.keep", "net.drop1", "net.drop2", "other.drop"] {
        ipam.assign(&v4(h, "n")).expect("assign");
    }
    let valid: HashSet<String> = ["net.keep".to_string()].into();
    let mut released: Vec<String> = ipam
        .gc("net.", &valid)
        .expect("gc")
        .into_iter()
        .map(|r| r.handle)
        .collect();
    released.sort();
    assert_eq!(released, ["net.drop1", "net.drop2"]);
    assert!(ipam
        .datastore()
        .get("handles/net.keep")
        .expect("get")
        .is_some());
    assert!(ipam
        .datastore()
        .get("handles/other.drop")
        .expect("get")
        .is_some());
    assert_affinities_consistent(ipam.datastore());
}

fn pools_are_validated(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    let bad = [
        pool("too-small-block", "10.0.0.0/24", 16),
        pool("past-32", "10.0.0.0/24", 33),
        pool("huge-block", "10.0.0.0/8", 16),
        pool("v6-huge", "fd00::/64", 100),
        pool("Bad/Name", "10.0.0.0/24", 26),
        pool("", "10.0.0.0/24", 26),
    ];
    for p in bad {
        assert!(
            matches!(ipam.create_pool(&p), Err(IpamError::InvalidPool { .. })),
            "{}",
            p.name
        );
    }
    ipam.create_pool(&pool("a", "10.0.0.5/24", 26))
        .expect("host bits are cleared");
    assert_eq!(
        ipam.pools().expect("pools")[0].cidr,
        "10.0.0.0/24".parse().expect("net")
    );
    assert!(matches!(
        ipam.create_pool(&pool("b", "10.0.0.128/25", 26)),
        Err(IpamError::PoolExists { .. })
    ));
    assert!(matches!(
        ipam.create_pool(&pool("c", "10.0.0.0/16", 26)),
        Err(IpamError::PoolExists { .. })
    ));
    assert!(matches!(
        ipam.create_pool(&pool("a", "10.9.0.0/24", 26)),
        Err(IpamError::PoolExists { .. })
    ));
    ipam.create_pool(&pool("d", "10.0.1.0/24", 26))
        .expect("adjacent pool");
    ipam.create_pool(&pool("v6", "fd00::/64", 122))
        .expect("v6 pool");
}

fn ensure_default_pool_creates_exactly_one_pool_under_a_race(backend: Backend) {
    let store = TestStore::new(backend);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let ds = store.open_another();
            std::thread::spawn(move || {
                let ipam = Ipam::new(ds);
                ipam.ensure_default_pool(&pool("default-ipv4-ippool", "10.244.0.0/16", 26))
                    .expect("ensure");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let ipam = Ipam::new(store.open_another());
    assert_eq!(ipam.pools().expect("pools").len(), 1);
    ipam.ensure_default_pool(&pool("other", "10.9.0.0/16", 26))
        .expect("no-op");
    assert_eq!(ipam.pools().expect("pools").len(), 1);
}

fn delete_pool_refuses_while_in_use_then_cleans_up(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.1.0.0/24", 26))
        .expect("pool");
    ipam.assign(&v4("h", "n")).expect("assign");
    assert!(matches!(
        ipam.delete_pool("p"),
        Err(IpamError::PoolInUse { in_use: 1, .. })
    ));
    assert!(
        !ipam.pools().expect("pools")[0].disabled,
        "a refused delete changes nothing"
    );
    ipam.release_by_handle("h").expect("release");
    ipam.delete_pool("p").expect("delete");
    assert!(ipam.pools().expect("pools").is_empty());
    assert!(ipam.datastore().list("blocks/").expect("list").is_empty());
    assert!(ipam
        .datastore()
        .list("affinities/")
        .expect("list")
        .is_empty());
    assert!(matches!(
        ipam.delete_pool("p"),
        Err(IpamError::PoolNotFound { .. })
    ));
}

fn disabled_pools_hand_out_nothing(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    let mut p = pool("p", "10.1.0.0/24", 26);
    p.disabled = true;
    ipam.create_pool(&p).expect("pool");
    assert!(matches!(
        ipam.assign(&v4("h", "n")),
        Err(IpamError::NoPool { .. })
    ));
}

fn leftovers_of_a_crashed_claim_are_resolved(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.1.0.0/24", 26))
        .expect("pool");
    let ds = ipam.datastore().clone();
    let pending = |node: &str, cidr: &str| BlockAffinity {
        node: node.to_string(),
        cidr: cidr.parse().expect("cidr"),
        state: AffinityState::Pending,
    };
    // node-a died after phase 1 on the first block.
    store::create(
        &ds,
        &common::affinity_key("node-a", "10.1.0.0/26"),
        &pending("node-a", "10.1.0.0/26"),
    )
    .expect("pending");
    // node-b died after phase 1 on the second block, which node-a then takes.
    store::create(
        &ds,
        &common::affinity_key("node-b", "10.1.0.64/26"),
        &pending("node-b", "10.1.0.64/26"),
    )
    .expect("pending");
    let a = ipam.assign(&v4("a", "node-a")).expect("assign");
    assert_eq!(a[0].ip(), ip("10.1.0.0"));
    let mut args = v4("a-many", "node-a");
    args.num_v4 = 64; // overflows into a second block
    ipam.assign(&args).expect("assign");
    let b = ipam.assign(&v4("b", "node-b")).expect("assign");
    assert_eq!(b[0].ip(), ip("10.1.0.128"));
    assert_affinities_consistent(&ds);
}

fn scoped_gc_releases_only_what_the_predicate_accepts(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("p", "10.1.0.0/24", 26))
        .expect("pool");
    let with_net = |h: &str, node: &str| {
        let mut a = v4(h, node);
        a.attrs.insert("network".into(), "k8s".into());
        a
    };
    ipam.assign(&with_net("k8s.mine", "a")).expect("assign");
    ipam.assign(&with_net("k8s.theirs", "b")).expect("assign");
    ipam.assign(&v4("k8s.pod.other-network", "a"))
        .expect("assign");
    let released = ipam
        .gc_where(|attr| {
            attr.secondary.get("node").map(String::as_str) == Some("a")
                && attr.secondary.get("network").map(String::as_str) == Some("k8s")
        })
        .expect("gc");
    let handles: Vec<&str> = released.iter().map(|r| r.handle.as_str()).collect();
    assert_eq!(
        handles,
        ["k8s.mine"],
        "another node's and another network's addresses must survive"
    );
}

fn a_pool_restriction_of_one_family_leaves_the_other_family_free(backend: Backend) {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("v4", "10.1.0.0/24", 26))
        .expect("pool");
    ipam.create_pool(&pool("v6", "fd00::/120", 122))
        .expect("pool");
    let mut args = v4("net.dual", "n");
    args.num_v6 = 1;
    args.pools = vec!["10.1.0.0/24".parse().unwrap()];
    let got = ipam
        .assign(&args)
        .expect("dual-stack assign with an IPv4 pool restriction");
    assert_eq!(got.len(), 2);
    assert!(got.iter().any(|n| n.is_ipv6()));
}
