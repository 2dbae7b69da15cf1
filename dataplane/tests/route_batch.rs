//! Batches of route changes over one blocking socket (root only).

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use tabby_dataplane::{Family, Route, RouteBatch};
use tabby_testkit::{require_root, Netns};

const PROTO: u8 = 201;

#[test]
fn thousands_of_routes_go_in_and_out_in_batches_and_failures_name_their_route() {
    if !require_root("thousands_of_routes_go_in_and_out_in_batches_and_failures_name_their_route") {
        return;
    }
    let ns = Netns::new("tdp");
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ns.ip(&["addr", "add", "10.50.0.1/24", "dev", "v0"]);
    ns.ip(&["link", "set", "v0", "up"]);
    ns.ip(&["link", "set", "v1", "up"]);
    let nl = ns.netlink();
    let v0 = nl.link("v0").unwrap().unwrap().index;
    let mut batch = ns.open().run(RouteBatch::open).unwrap().unwrap();

    let gw = IpAddr::V4(Ipv4Addr::new(10, 50, 0, 2));
    let routes: Vec<Route> = (0..3000u32)
        .map(|i| {
            let dst = IpNetwork::new(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i)), 32).unwrap();
            Route::new(dst).via(gw).dev(v0).with_protocol(PROTO)
        })
        .collect();
    let unreachable = Route::new("100.80.0.0/24".parse().unwrap())
        .via("10.60.0.9".parse().unwrap())
        .dev(v0)
        .with_protocol(PROTO);
    let mut all = routes.clone();
    all.push(unreachable.clone());

    let failed = batch.apply(&[], &all);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, unreachable);
    assert!(
        failed[0].1.to_string().contains("100.80.0.0/24"),
        "{}",
        failed[0].1
    );
    let ours = |nl: &tabby_dataplane::Netlink| {
        nl.routes(Family::V4)
            .unwrap()
            .into_iter()
            .filter(|r| r.protocol == PROTO)
            .count()
    };
    assert_eq!(ours(&nl), 3000);

    // Replacing again is idempotent; deleting works, and an already-gone route is no failure.
    assert!(batch.apply(&[], &routes[..10]).is_empty());
    let failed = batch.apply(&all, &[]);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(ours(&nl), 0);
}
