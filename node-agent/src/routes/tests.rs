use super::*;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn via(dst: &str, gw: &str) -> Route {
    Route::new(net(dst))
        .via(ip(gw))
        .dev(2)
        .with_protocol(RTPROT_TABBY)
}

#[test]
fn the_source_wants_blackholes_for_blocks_and_via_routes_for_learned_prefixes() {
    let mut s = RouteSource::new(ip("10.98.0.1"), 2);
    s.blocks.insert(net("10.244.0.0/26"));
    s.rib
        .learn(ip("10.98.0.2"), &[net("10.244.1.0/26")], ip("10.98.0.2"));
    s.rib
        .learn(ip("10.98.0.3"), &[net("10.244.0.0/26")], ip("10.98.0.3"));
    let mut routes: Vec<Route> = s.routes().collect();
    routes.sort_by_key(|r| r.dst);
    assert_eq!(
        routes,
        vec![
            Route::blackhole(net("10.244.0.0/26")).with_protocol(RTPROT_TABBY),
            via("10.244.1.0/26", "10.98.0.2")
        ],
        "a block of ours stays a blackhole when a peer announces it too"
    );
    let changes = s.changes(vec![
        net("10.244.9.0/26"),
        net("10.244.1.0/26"),
        net("10.244.1.0/26"),
    ]);
    assert_eq!(
        changes,
        vec![
            RouteChange::Upsert(via("10.244.1.0/26", "10.98.0.2")),
            RouteChange::Delete(net("10.244.9.0/26"))
        ],
        "each prefix once, in order"
    );
}
