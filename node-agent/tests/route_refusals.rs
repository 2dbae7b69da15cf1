//! The route thread against a real kernel that refuses a route: the refusal
//! is counted (and logged) once, and the route is tried again only when it
//! changes — not on every pass of the agent (root only).

use std::fs::File;
use std::time::Duration;

use ipnetwork::IpNetwork;
use nix::sched::{setns, CloneFlags};
use tabby_dataplane::Route;
use tabby_node::desired::RTPROT_TABBY;
use tabby_node::routes::{RouteProgrammer, RouteStats};
use tabby_testkit::netns::Netns;
use tabby_testkit::{require_root, wait_until};

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

/// A route via a gateway no interface reaches: the kernel answers ENETUNREACH.
fn unreachable(gateway: &str) -> Route {
    Route::new(net("10.77.0.0/24"))
        .via(gateway.parse().unwrap())
        .with_protocol(RTPROT_TABBY)
}

fn blackhole(i: u8) -> Route {
    Route::blackhole(net(&format!("10.88.{i}.0/24"))).with_protocol(RTPROT_TABBY)
}

/// Hands `routes` over and waits until the thread has replaced `replaced` routes.
fn pass(p: &RouteProgrammer, routes: Vec<Route>, replaced: u64) -> RouteStats {
    p.set(routes);
    wait_until("the route pass", Duration::from_secs(10), || {
        p.stats().replaced >= replaced
    });
    p.stats()
}

#[test]
fn a_refused_route_is_tried_once_and_again_only_when_it_changes() {
    if !require_root("route refusals") {
        return;
    }
    let ns = Netns::new("trr");
    let file = File::open(ns.path()).unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| in_netns(&ns, &file));
    });
    assert!(ns
        .ip(&["route", "show", "10.77.0.0/24"])
        .contains("via 10.55.0.3"));
}

fn in_netns(ns: &Netns, file: &File) {
    {
        setns(file, CloneFlags::CLONE_NEWNET).unwrap();
        // The route thread starts here and so lives in the namespace.
        let p = RouteProgrammer::start(Duration::ZERO).unwrap();
        // Every pass changes one blackhole, so each one is seen to be done.
        let mut stats = RouteStats::default();
        for i in 0..10u8 {
            stats = pass(
                &p,
                vec![unreachable("10.55.0.1"), blackhole(i)],
                u64::from(i) + 1,
            );
        }
        assert_eq!(
            stats.errors, 1,
            "the same refused route is not retried: {stats:?}"
        );
        // A changed route is tried (and refused) once more.
        for i in 10..15u8 {
            stats = pass(
                &p,
                vec![unreachable("10.55.0.2"), blackhole(i)],
                u64::from(i) + 1,
            );
        }
        assert_eq!(stats.errors, 2, "{stats:?}");
        // Once the kernel can take it, the changed route goes in.
        ns.ip(&[
            "link", "add", "rr-a", "type", "veth", "peer", "name", "rr-b",
        ]);
        ns.ip(&["addr", "add", "10.55.0.100/24", "dev", "rr-a"]);
        ns.ip(&["link", "set", "rr-a", "up"]);
        ns.ip(&["link", "set", "rr-b", "up"]);
        pass(&p, vec![unreachable("10.55.0.3"), blackhole(20)], 17);
        let stats = p.stats();
        assert_eq!((stats.errors, stats.installed), (2, 2), "{stats:?}");
    }
}
