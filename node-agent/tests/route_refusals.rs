//! The route thread against a real kernel that refuses a route: the refusal
//! is counted (and logged) once, and the route is tried again only when it
//! changes — not on every resync of the thread (root only).

use std::fs::File;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::IpNetwork;
use nix::sched::{setns, CloneFlags};
use tabby_dataplane::Netlink;
use tabby_node::routes::{RouteProgrammer, RouteSource, RouteStats};
use tabby_testkit::netns::Netns;
use tabby_testkit::{require_root, wait_until};

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The learned prefix whose next hop the uplink may not reach.
const TARGET: &str = "10.77.0.0/24";
const PEER: &str = "10.55.0.9";

fn block(i: u8) -> IpNetwork {
    net(&format!("10.88.{i}.0/24"))
}

/// One pass: the peer's route to [`TARGET`] via `next_hop` and blackhole
/// `i` in place of `i - 1`, then a resync (`ready` runs one at once, after
/// the changes: the thread takes its messages in order); waits until the
/// thread has replaced `replaced` routes and has finished that resync, so
/// that no resync of this pass runs into the changes of the next one.
async fn pass(
    p: &RouteProgrammer,
    source: &Mutex<RouteSource>,
    next_hop: &str,
    i: u8,
    replaced: u64,
) -> RouteStats {
    let resyncs = p.stats().resyncs;
    let changes = {
        let mut s = source.lock().unwrap();
        let mut changed = s.rib.learn(ip(PEER), &[net(TARGET)], ip(next_hop));
        if i > 0 {
            s.blocks.remove(&block(i - 1));
            changed.push(block(i - 1));
        }
        s.blocks.insert(block(i));
        changed.push(block(i));
        s.changes(changed)
    };
    p.apply(changes).await;
    p.ready().await;
    wait_until("the route pass", Duration::from_secs(10), || {
        let s = p.stats();
        s.replaced >= replaced && s.resyncs > resyncs
    });
    p.stats()
}

#[test]
fn a_refused_route_is_tried_once_and_again_only_when_it_changes() {
    if !require_root("route refusals") {
        return;
    }
    let ns = Netns::new("trr");
    // The uplink: up, but without an address until the last pass.
    ns.ip(&[
        "link", "add", "rr-a", "type", "veth", "peer", "name", "rr-b",
    ]);
    ns.ip(&["link", "set", "rr-a", "up"]);
    ns.ip(&["link", "set", "rr-b", "up"]);
    let file = File::open(ns.path()).unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| in_netns(&ns, &file));
    });
    assert!(ns.ip(&["route", "show", TARGET]).contains("via 10.55.0.3"));
}

fn in_netns(ns: &Netns, file: &File) {
    setns(file, CloneFlags::CLONE_NEWNET).unwrap();
    // Netlink runs a runtime of its own: outside the test's.
    let uplink = Netlink::host().unwrap().link("rr-a").unwrap().unwrap();
    let source = Arc::new(Mutex::new(RouteSource::new(
        ip("10.55.0.100"),
        uplink.index,
    )));
    // The route thread starts here and so lives in the namespace.
    let p = RouteProgrammer::start(Duration::ZERO, Arc::clone(&source)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Every pass changes one blackhole, so each one is seen to be done.
        let mut stats = RouteStats::default();
        for i in 0..10u8 {
            stats = pass(&p, &source, "10.55.0.1", i, u64::from(i) + 1).await;
        }
        assert_eq!(
            stats.errors, 1,
            "the same refused route is not retried: {stats:?}"
        );
        // A changed route is tried (and refused) once more.
        for i in 10..15u8 {
            stats = pass(&p, &source, "10.55.0.2", i, u64::from(i) + 1).await;
        }
        assert_eq!(stats.errors, 2, "{stats:?}");
        // Once the kernel can take it, the changed route goes in.
        ns.ip(&["addr", "add", "10.55.0.100/24", "dev", "rr-a"]);
        let stats = pass(&p, &source, "10.55.0.3", 15, 17).await;
        assert_eq!((stats.errors, stats.installed), (2, 2), "{stats:?}");
    });
}
