use std::collections::BTreeMap;

use super::*;

const PROTO: u8 = 201;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn via(dst: &str, gw: &str) -> Route {
    Route::new(net(dst))
        .via(gw.parse().unwrap())
        .dev(2)
        .with_protocol(PROTO)
}

fn blackhole(dst: &str) -> Route {
    Route::blackhole(net(dst)).with_protocol(PROTO)
}

fn kernel(routes: Vec<Route>) -> KernelRoutes {
    let mut read = |f: &mut dyn FnMut(Route)| -> Result<(), ()> {
        routes.iter().cloned().for_each(&mut *f);
        Ok(())
    };
    KernelRoutes::read(PROTO, &mut read).unwrap()
}

/// The wanted routes, by destination.
struct Want(BTreeMap<IpNetwork, Route>);

impl Want {
    fn of(routes: &[Route]) -> Self {
        Want(routes.iter().map(|r| (r.dst, r.clone())).collect())
    }
}

impl Desired for Want {
    fn route(&self, dst: IpNetwork) -> Option<Route> {
        self.0.get(&dst).cloned()
    }
    fn routes(&self) -> Box<dyn Iterator<Item = Route> + '_> {
        Box::new(self.0.values().cloned())
    }
}

fn sorted(mut routes: Vec<Route>) -> Vec<Route> {
    routes.sort_by_key(|r| r.dst);
    routes
}

#[test]
fn changes_become_kernel_operations_and_deletes_match_any_route_of_ours() {
    let mut t = OwnedRoutes::start(kernel(vec![]));
    let ops = t.change(vec![
        RouteChange::Upsert(blackhole("10.244.0.0/26")),
        RouteChange::Delete(net("10.244.1.0/26")),
    ]);
    assert_eq!(ops.replace, vec![blackhole("10.244.0.0/26")]);
    let delete = &ops.delete[0];
    assert_eq!(
        (delete.dst, delete.kind, delete.gateway, delete.protocol),
        (net("10.244.1.0/26"), RouteKind::Other(0), None, PROTO),
        "type 0 and no next hop: whatever route of ours the kernel has"
    );
}

#[test]
fn routes_of_other_protocols_are_never_replaced() {
    let mut pod = Route::new(net("10.244.0.5/32")).dev(9);
    pod.protocol = 3;
    let mut t = OwnedRoutes::start(kernel(vec![pod.clone()]));
    let ops = t.change(vec![RouteChange::Upsert(via("10.244.0.5/32", "10.98.0.2"))]);
    assert!(ops.replace.is_empty(), "{ops:?}");
    let want = Want::of(&[via("10.244.0.5/32", "10.98.0.2")]);
    assert_eq!(
        t.resync(false, kernel(vec![pod]), &want),
        KernelOps::default()
    );
}

#[test]
fn a_resync_repairs_what_differs_adds_what_is_missing_and_deletes_what_nobody_wants() {
    let mut t = OwnedRoutes::start(kernel(vec![]));
    let want = Want::of(&[
        blackhole("10.244.0.0/26"),
        via("10.244.1.0/26", "10.98.0.2"),
        via("10.244.2.0/26", "10.98.0.3"),
    ]);
    let now = vec![
        via("10.244.1.0/26", "10.98.0.2"), // as wanted
        via("10.244.2.0/26", "10.98.0.9"), // changed behind our back
        via("10.244.7.0/26", "10.98.0.9"), // nobody wants it
    ];
    let ops = t.resync(false, kernel(now), &want);
    assert_eq!(
        sorted(ops.replace),
        vec![
            blackhole("10.244.0.0/26"),
            via("10.244.2.0/26", "10.98.0.3")
        ]
    );
    assert_eq!(ops.delete, vec![via("10.244.7.0/26", "10.98.0.9")]);
    let repaired: Vec<Route> = want.0.values().cloned().collect();
    assert_eq!(
        t.resync(false, kernel(repaired), &want),
        KernelOps::default()
    );
}

#[test]
fn learned_routes_of_a_previous_run_wait_out_the_grace_unless_replaced() {
    let left = vec![
        via("10.244.1.0/26", "10.98.0.2"),
        via("10.244.2.0/26", "10.98.0.3"),
        blackhole("10.244.9.0/26"),
    ];
    let mut t = OwnedRoutes::start(kernel(left.clone()));
    // This run learns one of them again, on another next hop.
    let again = via("10.244.2.0/26", "10.98.0.4");
    assert_eq!(
        t.change(vec![RouteChange::Upsert(again.clone())])
            .replace
            .len(),
        1
    );
    let want = Want::of(std::slice::from_ref(&again));
    let now = vec![left[0].clone(), again, left[2].clone()];
    let in_grace = t.resync(true, kernel(now.clone()), &want);
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
    let after = t.resync(false, kernel(now), &want);
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
    let mut t = OwnedRoutes::start(kernel(vec![]));
    let ops = t.change(vec![RouteChange::Upsert(via("10.244.1.0/26", "10.98.0.2"))]);
    t.record(&ops, &[net("10.244.1.0/26")].into());
    assert_eq!(t.installed(1), 0);
    t.record(&ops, &BTreeSet::new());
    assert_eq!(t.installed(1), 1);
}

#[test]
fn a_refused_route_is_not_sent_again_until_it_changes_or_goes() {
    let mut t = OwnedRoutes::start(kernel(vec![]));
    let bad = via("10.77.0.0/24", "10.55.0.1");
    let ops = t.change(vec![RouteChange::Upsert(bad.clone())]);
    assert_eq!(ops.replace, vec![bad.clone()]);
    t.record(&ops, &[bad.dst].into());
    let want = Want::of(std::slice::from_ref(&bad));
    assert!(
        t.resync(false, kernel(vec![]), &want).replace.is_empty(),
        "the resync does not retry it"
    );
    assert!(t
        .change(vec![RouteChange::Upsert(bad.clone())])
        .replace
        .is_empty());
    // Another route to the destination is tried.
    let changed = via("10.77.0.0/24", "10.55.0.2");
    assert_eq!(
        t.change(vec![RouteChange::Upsert(changed.clone())]).replace,
        vec![changed.clone()]
    );
    // Once it is not wanted as it was, the refusal is forgotten.
    t.record(
        &KernelOps {
            delete: vec![],
            replace: vec![bad.clone()],
        },
        &[bad.dst].into(),
    );
    let want = Want::of(std::slice::from_ref(&changed));
    assert_eq!(
        t.resync(false, kernel(vec![]), &want).replace,
        vec![changed]
    );
    let want = Want::of(std::slice::from_ref(&bad));
    assert_eq!(t.resync(false, kernel(vec![]), &want).replace, vec![bad]);
}
