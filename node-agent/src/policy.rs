//! Which routes this node installs and announces, per peer: the peer's
//! BGPFilter rules first (in the order the BGPPeer names its filters, first
//! match wins), then Tabby's defaults. Pure; unit-tested without root.
//!
//! Import defaults, for a route no rule matches:
//! - from another Tabby node (a mesh peer, or any peer whose address is a
//!   registered node's, such as a route reflector node): only prefixes inside
//!   a Tabby pool (blocks and borrowed /32s);
//! - from an external peer: never the default route, nothing that overlaps a
//!   Tabby pool (other nodes' blocks would be hijacked), nothing inside the
//!   underlay (this node's uplink subnets and every node's address), so that
//!   a router cannot pull pod or node traffic away from the cluster.
//!
//! Export default: every local route (the speaker applies export rules).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tabby_bgp::policy::{self, Action, PrefixMatch, Rule};
use tabby_ipam::resources::{BgpFilter, BgpFilterRule, BgpPeer, FilterAction, MatchOperator};

use crate::desired::{explicit_peer, ClusterView, PeerType};

/// One direction of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `importV4`.
    Import,
    /// `exportV4`.
    Export,
}

/// The engine's form of a BGPFilter rule.
pub fn rule(r: &BgpFilterRule) -> Rule {
    let prefix = match (r.cidr, r.match_operator) {
        (Some(cidr), Some(op)) => Some(PrefixMatch {
            cidr,
            operator: match op {
                MatchOperator::Equal => policy::MatchOperator::Equal,
                MatchOperator::In => policy::MatchOperator::In,
                MatchOperator::NotIn => policy::MatchOperator::NotIn,
            },
            min_len: r.prefix_length.and_then(|l| l.min),
            max_len: r.prefix_length.and_then(|l| l.max),
        }),
        _ => None,
    };
    Rule {
        action: match r.action {
            FilterAction::Accept => Action::Accept,
            FilterAction::Reject => Action::Reject,
        },
        prefix,
    }
}

/// The rules of `peer`'s filters in one direction, in order; a filter that
/// does not exist (deleted behind the CLI's back) contributes none.
pub fn peer_rules(filters: &[BgpFilter], peer: &BgpPeer, direction: Direction) -> Vec<Rule> {
    peer.filters
        .iter()
        .filter_map(|name| filters.iter().find(|f| &f.name == name))
        .flat_map(|f| match direction {
            Direction::Import => &f.import_v4,
            Direction::Export => &f.export_v4,
        })
        .map(rule)
        .collect()
}

/// Whether `inner` lies inside `outer` (or is it).
fn inside(inner: &IpNetwork, outer: &IpNetwork) -> bool {
    inner.is_ipv4() == outer.is_ipv4()
        && inner.prefix() >= outer.prefix()
        && outer.contains(inner.network())
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    inside(a, b) || inside(b, a)
}

/// How one peer's routes are judged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PeerImport {
    /// Another Tabby node.
    internal: bool,
    /// Its import rules.
    rules: Vec<Rule>,
}

/// The import policy of this node for the current cluster view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportPolicy {
    pools: Vec<IpNetwork>,
    underlay: Vec<IpNetwork>,
    peers: BTreeMap<IpAddr, PeerImport>,
}

impl ImportPolicy {
    /// The policy of node `me` for `peers` (its current peers, by address);
    /// `uplink_nets` are the subnets of this node's uplink.
    pub fn new(
        view: &ClusterView,
        me: &str,
        peers: &BTreeMap<IpAddr, PeerType>,
        uplink_nets: &[IpNetwork],
    ) -> Self {
        let nodes: BTreeSet<IpAddr> = view
            .snapshot
            .nodes
            .iter()
            .filter_map(|n| n.address)
            .collect();
        let mut underlay: Vec<IpNetwork> = uplink_nets
            .iter()
            .filter_map(|n| IpNetwork::new(n.network(), n.prefix()).ok())
            .collect();
        underlay.extend(
            nodes
                .iter()
                .filter_map(|a| IpNetwork::new(*a, if a.is_ipv4() { 32 } else { 128 }).ok()),
        );
        let peers = peers
            .iter()
            .map(|(addr, peer_type)| {
                let rules = explicit_peer(view, me, *addr)
                    .map(|p| peer_rules(&view.filters, p, Direction::Import))
                    .unwrap_or_default();
                let internal = *peer_type == PeerType::NodeMesh || nodes.contains(addr);
                (*addr, PeerImport { internal, rules })
            })
            .collect();
        Self {
            pools: view.snapshot.pools.iter().map(|p| p.cidr).collect(),
            underlay,
            peers,
        }
    }

    /// Whether this node installs `prefix` learned from `peer`.
    pub fn accepts(&self, peer: IpAddr, prefix: &IpNetwork) -> bool {
        let Some(p) = self.peers.get(&peer) else {
            return false;
        };
        if let IpNetwork::V4(v4) = prefix {
            if let Some(action) = policy::decide(&p.rules, v4) {
                return action == Action::Accept;
            }
        }
        if prefix.prefix() == 0 {
            return false;
        }
        if p.internal {
            self.pools.iter().any(|pool| inside(prefix, pool))
        } else {
            !self.pools.iter().any(|pool| overlaps(prefix, pool))
                && !self.underlay.iter().any(|u| inside(prefix, u))
        }
    }
}

#[cfg(test)]
mod tests;
