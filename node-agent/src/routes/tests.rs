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

fn blackhole(dst: &str) -> Route {
    Route::blackhole(net(dst)).with_protocol(RTPROT_TABBY)
}

fn kernel(routes: Vec<Route>) -> KernelRoutes {
    let mut read = |f: &mut dyn FnMut(Route)| -> Result<(), ()> {
        routes.iter().cloned().for_each(&mut *f);
        Ok(())
    };
    KernelRoutes::read(&mut read).unwrap()
}

/// A source with block 10.244.0.0/26 and the given learned (prefix, next hop).
fn source(learned: &[(&str, &str)]) -> RouteSource {
    let mut s = RouteSource::new(ip("10.98.0.1"), 2);
    s.blocks.insert(net("10.244.0.0/26"));
    for (p, nh) in learned {
        s.rib.apply(&crate::agent::BgpEvent::Learned {
            peer: ip(nh),
            prefixes: vec![net(p)],
            next_hop: ip(nh),
        });
    }
    s
}

fn sorted(mut routes: Vec<Route>) -> Vec<Route> {
    routes.sort_by_key(|r| r.dst);
    routes
}

#[test]
fn the_source_wants_blackholes_for_blocks_and_via_routes_for_learned_prefixes() {
    let s = source(&[
        ("10.244.1.0/26", "10.98.0.2"),
        ("10.244.0.0/26", "10.98.0.3"),
    ]);
    assert_eq!(
        sorted(s.routes().collect()),
        vec![
            blackhole("10.244.0.0/26"),
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
        ]
    );
}

#[test]
fn changes_become_kernel_operations_and_deletes_match_any_route_of_ours() {
    let mut t = RouteTable::default();
    t.start(kernel(vec![]));
    let ops = t.change(vec![
        RouteChange::Upsert(blackhole("10.244.0.0/26")),
        RouteChange::Delete(net("10.244.1.0/26")),
    ]);
    assert_eq!(ops.replace, vec![blackhole("10.244.0.0/26")]);
    let delete = &ops.delete[0];
    assert_eq!(
        (delete.dst, delete.kind, delete.gateway, delete.protocol),
        (
            net("10.244.1.0/26"),
            RouteKind::Other(0),
            None,
            RTPROT_TABBY
        ),
        "type 0 and no next hop: whatever route of ours the kernel has"
    );
}

#[test]
fn routes_of_other_protocols_are_never_replaced() {
    let mut pod = Route::new(net("10.244.0.5/32")).dev(9);
    pod.protocol = 3;
    let mut t = RouteTable::default();
    t.start(kernel(vec![pod.clone()]));
    let ops = t.change(vec![RouteChange::Upsert(via("10.244.0.5/32", "10.98.0.2"))]);
    assert!(ops.replace.is_empty(), "{ops:?}");
    let s = source(&[("10.244.0.5/32", "10.98.0.2")]);
    let repair = t.resync(false, kernel(vec![pod, blackhole("10.244.0.0/26")]), &s);
    assert_eq!(repair, KernelOps::default());
}

#[test]
fn a_resync_repairs_what_differs_adds_what_is_missing_and_deletes_what_nobody_wants() {
    let mut t = RouteTable::default();
    t.start(kernel(vec![]));
    let s = source(&[
        ("10.244.1.0/26", "10.98.0.2"),
        ("10.244.2.0/26", "10.98.0.3"),
    ]);
    let now = vec![
        via("10.244.1.0/26", "10.98.0.2"), // as wanted
        via("10.244.2.0/26", "10.98.0.9"), // changed behind our back
        via("10.244.7.0/26", "10.98.0.9"), // nobody wants it
    ];
    let ops = t.resync(false, kernel(now), &s);
    assert_eq!(
        sorted(ops.replace),
        vec![
            blackhole("10.244.0.0/26"),
            via("10.244.2.0/26", "10.98.0.3")
        ]
    );
    assert_eq!(ops.delete, vec![via("10.244.7.0/26", "10.98.0.9")]);
    let repaired = vec![
        via("10.244.1.0/26", "10.98.0.2"),
        via("10.244.2.0/26", "10.98.0.3"),
        blackhole("10.244.0.0/26"),
    ];
    assert_eq!(t.resync(false, kernel(repaired), &s), KernelOps::default());
}

#[test]
fn learned_routes_of_a_previous_run_wait_out_the_grace_unless_replaced() {
    let left = vec![
        via("10.244.1.0/26", "10.98.0.2"),
        via("10.244.2.0/26", "10.98.0.3"),
        blackhole("10.244.9.0/26"),
    ];
    let mut t = RouteTable::default();
    t.start(kernel(left.clone()));
    // This run learns one of them again, on another next hop.
    let ops = t.change(vec![RouteChange::Upsert(via("10.244.2.0/26", "10.98.0.4"))]);
    assert_eq!(ops.replace.len(), 1);
    let mut s = source(&[("10.244.2.0/26", "10.98.0.4")]);
    s.blocks.clear();
    let mut now = left.clone();
    now[1] = via("10.244.2.0/26", "10.98.0.4");
    let in_grace = t.resync(true, kernel(now.clone()), &s);
    assert_eq!(
        in_grace.delete,
        vec![blackhole("10.244.9.0/26")],
        "an old blackhole goes at once, learned routes stay"
    );
    assert!(
        t.change(vec![RouteChange::Delete(net("10.244.1.0/26"))])
            .delete
            .is_empty(),
        "nor does a delete take an inherited route during the grace"
    );
    let after = t.resync(false, kernel(now), &s);
    assert_eq!(
        sorted(after.delete),
        vec![
            via("10.244.1.0/26", "10.98.0.2"),
            blackhole("10.244.9.0/26")
        ]
    );
}

#[test]
fn a_refused_route_counts_as_not_installed_until_it_goes_in() {
    let mut t = RouteTable::default();
    t.start(kernel(vec![]));
    let ops = t.change(vec![RouteChange::Upsert(via("10.244.1.0/26", "10.98.0.2"))]);
    t.record(&ops, &[net("10.244.1.0/26")].into());
    assert_eq!(t.installed(1), 0);
    t.record(&ops, &BTreeSet::new());
    assert_eq!(t.installed(1), 1);
}
