//! What this node should do, computed from the cluster's documents: pure
//! functions, unit-tested without root.
//!
//! - which BGP peers it has ([`desired_peers`]): the node-to-node mesh,
//!   global peers and peers of this node;
//! - which prefixes it originates ([`local_prefixes`]): its confirmed
//!   blocks and the /32s it borrowed from other nodes' blocks;
//! - what the service proxy needs to know of it ([`node_facts`]).
//!
//! What to change to get there is planned in [`crate::plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network};
use tabby_bgp::policy::Rule;
use tabby_ipam::report::Snapshot;
use tabby_ipam::resources::{BgpConfiguration, BgpFilter, BgpPeer};
use tabby_ipam::AffinityState;
use tabby_proxy::model::NodeFacts;

pub use tabby_bgp::PeerType;

/// Protocol number of every route `tabby-node` installs (`ip route show proto 201`).
/// Pod routes added by the CNI plugin carry `proto boot` and are never touched.
pub const RTPROT_TABBY: u8 = 201;

/// A BGP neighbour this node should have.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerSpec {
    /// Its address.
    pub addr: IpAddr,
    /// Its AS.
    pub asn: u32,
    /// Why it is a peer.
    pub peer_type: PeerType,
    /// TCP MD5 password.
    pub password: Option<String>,
    /// Export rules from the peer's BGPFilters.
    pub export: Vec<Rule>,
    /// The peer's prefix limit (Cease 6/1 beyond it).
    pub max_prefix: Option<u32>,
}

/// Everything the agent reads from the datastore on each pass.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// IPAM documents and nodes.
    pub snapshot: Snapshot,
    /// Cluster BGP settings.
    pub bgp: BgpConfiguration,
    /// Explicit peers.
    pub peers: Vec<BgpPeer>,
    /// BGP filters the peers name.
    pub filters: Vec<BgpFilter>,
}

impl ClusterView {
    /// The AS of `node`: its own, else the cluster's.
    pub fn asn_of(&self, node: &str) -> u32 {
        self.snapshot
            .nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.asn)
            .unwrap_or(self.bgp.as_number)
    }
}

/// The peers of node `me` (whose address is `my_addr`), without duplicates
/// (an explicit peer wins over the mesh entry for the same address).
pub fn desired_peers(view: &ClusterView, me: &str, my_addr: IpAddr) -> Vec<PeerSpec> {
    let mut by_addr: BTreeMap<IpAddr, PeerSpec> = BTreeMap::new();
    if view.bgp.node_to_node_mesh {
        for n in &view.snapshot.nodes {
            if let Some(addr) = n.address.filter(|a| n.name != me && *a != my_addr) {
                let asn = n.asn.unwrap_or(view.bgp.as_number);
                by_addr.insert(
                    addr,
                    PeerSpec {
                        addr,
                        asn,
                        peer_type: PeerType::NodeMesh,
                        password: None,
                        export: Vec::new(),
                        max_prefix: None,
                    },
                );
            }
        }
    }
    for p in &view.peers {
        let peer_type = match p.node.as_deref() {
            None => PeerType::Global,
            Some(n) if n == me => PeerType::NodeSpecific,
            Some(_) => continue,
        };
        if p.peer_ip == my_addr {
            continue;
        }
        by_addr.insert(
            p.peer_ip,
            PeerSpec {
                addr: p.peer_ip,
                asn: p.as_number,
                peer_type,
                password: p.password.clone(),
                export: crate::policy::peer_rules(
                    &view.filters,
                    p,
                    crate::policy::Direction::Export,
                ),
                max_prefix: p.max_prefix,
            },
        );
    }
    by_addr.into_values().collect()
}

/// The BGPPeer that makes `addr` a peer of node `me`, if one does (the
/// last of them, as in [`desired_peers`]).
pub fn explicit_peer<'a>(view: &'a ClusterView, me: &str, addr: IpAddr) -> Option<&'a BgpPeer> {
    view.peers
        .iter()
        .rev()
        .find(|p| p.peer_ip == addr && p.node.as_deref().is_none_or(|n| n == me))
}

/// This node's confirmed blocks.
pub fn local_blocks(view: &ClusterView, me: &str) -> BTreeSet<IpNetwork> {
    view.snapshot
        .affinities
        .iter()
        .filter(|a| a.node == me && a.state == AffinityState::Confirmed)
        .map(|a| a.cidr)
        .filter(|cidr| {
            view.snapshot
                .blocks
                .iter()
                .any(|b| b.cidr == *cidr && b.node() == Some(me))
        })
        .collect()
}

/// What this node originates: its blocks, and a host route for every
/// address it borrowed from a block affine to another node.
pub fn local_prefixes(view: &ClusterView, me: &str) -> BTreeSet<IpNetwork> {
    let mut out = local_blocks(view, me);
    for b in view.snapshot.blocks.iter().filter(|b| b.node() != Some(me)) {
        for (ip, attr) in b.allocated() {
            if attr.secondary.get("node").map(String::as_str) == Some(me) {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                if let Ok(net) = IpNetwork::new(ip, len) {
                    out.insert(net);
                }
            }
        }
    }
    out
}

/// The proxy's view of this node: its address, the cluster CIDR
/// (`cluster_cidr` if configured, else the first enabled IPv4 pool) and its blocks.
pub fn node_facts(
    view: &ClusterView,
    me: &str,
    my_addr: IpAddr,
    cluster_cidr: Option<Ipv4Network>,
) -> NodeFacts {
    let v4 = |n: &IpNetwork| match n {
        IpNetwork::V4(n) => Some(*n),
        IpNetwork::V6(_) => None,
    };
    let cluster_cidr = cluster_cidr.or_else(|| {
        view.snapshot
            .pools
            .iter()
            .filter(|p| !p.disabled)
            .find_map(|p| v4(&p.cidr))
    });
    NodeFacts {
        name: me.to_string(),
        node_ips: match my_addr {
            IpAddr::V4(a) => vec![a],
            IpAddr::V6(_) => Vec::new(),
        },
        cluster_cidr,
        pod_cidrs: local_blocks(view, me).iter().filter_map(v4).collect(),
    }
}

#[cfg(test)]
mod tests;
