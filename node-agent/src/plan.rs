//! What to change to get from what the agent has to what it wants: pure
//! functions over the desired state of [`crate::desired`], unit-tested.
//!
//! - [`plan_peers`]: the BGP sessions to end, start and restart;
//! - [`plan_prefixes`]: the prefixes to announce and withdraw;
//! - [`route_changes`]: the kernel routes of the prefixes that changed
//!   (their best path moved, or they became or stopped being a local block).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tabby_dataplane::Route;

use crate::desired::{PeerSpec, RTPROT_TABBY};
use tabby_dataplane::route_sync::RouteChange;

/// The session changes that turn the current peers into the wanted ones.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    /// Peers no longer wanted.
    pub remove: Vec<IpAddr>,
    /// New peers.
    pub add: Vec<PeerSpec>,
    /// Peers whose settings changed (AS, type, password): end, then start again.
    pub replace: Vec<PeerSpec>,
}

/// Compares the current peers with the wanted ones, by address.
pub fn plan_peers(
    current: &BTreeMap<IpAddr, PeerSpec>,
    want: &BTreeMap<IpAddr, PeerSpec>,
) -> PeerPlan {
    let mut plan = PeerPlan {
        remove: current
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect(),
        ..PeerPlan::default()
    };
    for (addr, spec) in want {
        match current.get(addr) {
            None => plan.add.push(spec.clone()),
            Some(have) if have != spec => plan.replace.push(spec.clone()),
            Some(_) => {}
        }
    }
    plan
}

/// The prefixes to announce (wanted, not yet originated) and to withdraw
/// (originated, no longer wanted).
pub fn plan_prefixes(
    originated: &BTreeSet<IpNetwork>,
    want: &BTreeSet<IpNetwork>,
) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
    (
        want.difference(originated).copied().collect(),
        originated.difference(want).copied().collect(),
    )
}

/// The kernel route this node wants for `prefix`: a blackhole for a local
/// block (traffic to its unused addresses is dropped here, not looped),
/// `via <next hop> dev <uplink>` for a learned prefix, nothing for a prefix
/// learned with ourselves as next hop or from the other family.
pub fn desired_route(
    prefix: IpNetwork,
    local_blocks: &BTreeSet<IpNetwork>,
    best: Option<IpAddr>,
    my_addr: IpAddr,
    uplink: u32,
) -> Option<Route> {
    if local_blocks.contains(&prefix) {
        return Some(Route::blackhole(prefix).with_protocol(RTPROT_TABBY));
    }
    let nh = best.filter(|nh| *nh != my_addr && nh.is_ipv4() == prefix.is_ipv4())?;
    Some(
        Route::new(prefix)
            .via(nh)
            .dev(uplink)
            .with_protocol(RTPROT_TABBY),
    )
}

/// The route changes of `prefixes` (sorted, each once), from their best
/// next hops now.
pub fn route_changes(
    prefixes: &[IpNetwork],
    local_blocks: &BTreeSet<IpNetwork>,
    best: impl Fn(&IpNetwork) -> Option<IpAddr>,
    my_addr: IpAddr,
    uplink: u32,
) -> Vec<RouteChange> {
    prefixes
        .iter()
        .map(
            |p| match desired_route(*p, local_blocks, best(p), my_addr, uplink) {
                Some(r) => RouteChange::Upsert(r),
                None => RouteChange::Delete(*p),
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::PeerType;
    use tabby_dataplane::RouteKind;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn spec(addr: &str, asn: u32) -> (IpAddr, PeerSpec) {
        let spec = PeerSpec {
            addr: ip(addr),
            asn,
            peer_type: PeerType::NodeMesh,
            password: None,
            export: Vec::new(),
            max_prefix: None,
        };
        (spec.addr, spec)
    }

    #[test]
    fn peers_are_removed_added_and_replaced_when_their_settings_change() {
        let current: BTreeMap<_, _> = [
            spec("10.98.0.2", 64512),
            spec("10.98.0.3", 64512),
            spec("10.98.0.4", 64512),
        ]
        .into();
        let want: BTreeMap<_, _> = [
            spec("10.98.0.2", 64512),
            spec("10.98.0.3", 65001),
            spec("10.98.0.5", 64512),
        ]
        .into();
        let plan = plan_peers(&current, &want);
        assert_eq!(plan.remove, vec![ip("10.98.0.4")]);
        assert_eq!(plan.add, vec![spec("10.98.0.5", 64512).1]);
        assert_eq!(plan.replace, vec![spec("10.98.0.3", 65001).1]);
        assert_eq!(plan_peers(&want, &want), PeerPlan::default());
    }

    #[test]
    fn prefixes_are_announced_and_withdrawn_by_difference() {
        let originated: BTreeSet<_> = [net("10.244.0.0/26"), net("10.244.0.64/32")].into();
        let want: BTreeSet<_> = [net("10.244.0.0/26"), net("10.244.1.0/26")].into();
        let (announce, withdraw) = plan_prefixes(&originated, &want);
        assert_eq!(announce, vec![net("10.244.1.0/26")]);
        assert_eq!(withdraw, vec![net("10.244.0.64/32")]);
        assert_eq!(plan_prefixes(&want, &want), (vec![], vec![]));
    }

    #[test]
    fn a_changed_prefix_becomes_a_blackhole_a_via_route_or_a_delete() {
        let local: BTreeSet<_> = [net("10.244.0.0/26")].into();
        let best = |p: &IpNetwork| match p.to_string().as_str() {
            "10.244.0.0/26" => Some(ip("10.98.0.3")),
            "10.244.0.64/26" => Some(ip("10.98.0.2")),
            "10.244.1.0/26" => Some(ip("10.98.0.1")),
            "10.244.2.0/26" => Some(ip("fd00::2")),
            _ => None,
        };
        let prefixes = [
            net("10.244.0.0/26"),
            net("10.244.0.64/26"),
            net("10.244.1.0/26"),
            net("10.244.2.0/26"),
            net("10.244.3.0/26"),
        ];
        let changes = route_changes(&prefixes, &local, best, ip("10.98.0.1"), 7);
        let RouteChange::Upsert(hole) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!(
            (hole.kind, hole.protocol),
            (RouteKind::Blackhole, RTPROT_TABBY),
            "a local block is a blackhole even when a peer announces it"
        );
        let RouteChange::Upsert(learned) = &changes[1] else {
            panic!("{changes:?}")
        };
        assert_eq!(
            (learned.gateway, learned.oif),
            (Some(ip("10.98.0.2")), Some(7))
        );
        assert_eq!(
            &changes[2..],
            &[
                RouteChange::Delete(net("10.244.1.0/26")),
                RouteChange::Delete(net("10.244.2.0/26")),
                RouteChange::Delete(net("10.244.3.0/26")),
            ],
            "ourselves as next hop, the other family, no path: no route"
        );
    }
}
