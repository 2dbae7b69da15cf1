//! The encapsulation plan: a pure function from the cluster view (nodes,
//! blocks with their affinity, pools) to the routes of remote blocks, the
//! VXLAN neighbour and FDB entries and the tunnel devices this node needs,
//! as felix's VXLAN manager and route resolver compute them.
//!
//! Per remote block, the block's pool decides: `Always`, or `CrossSubnet`
//! towards a node outside the local node's subnet, encapsulates; anything
//! else is routed natively (by BGP, as before). A VXLAN route comes from
//! the datastore (no BGP needed, Calico's `vxlan` backend) and wins over
//! what BGP learned for the block; an IPIP route too. A prefix BGP learned
//! that the datastore does not explain (a borrowed address of a node not
//! registered yet) is resolved by [`Resolver`] from its next hop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use tabby_ipam::{EncapMode, IpPool, Node};

use crate::desired::ClusterView;

/// An encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Encap {
    /// IP in IP through `tunl0` (20 bytes of overhead).
    Ipip,
    /// VXLAN through `vxlan.tabby` (50 bytes of overhead).
    Vxlan,
}

impl Encap {
    /// The bytes the encapsulation adds to a packet.
    pub fn overhead(self) -> u32 {
        match self {
            Encap::Ipip => 20,
            Encap::Vxlan => 50,
        }
    }
}

impl std::fmt::Display for Encap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encap::Ipip => "ipip",
            Encap::Vxlan => "vxlan",
        })
    }
}

/// How a remote prefix is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hop {
    /// `via <node> dev <uplink>` (BGP's next hop).
    Native(IpAddr),
    /// `via <node> dev tunl0 onlink`.
    Ipip(Ipv4Addr),
    /// `via <remote tunnel address> dev vxlan.tabby onlink`.
    Vxlan(Ipv4Addr),
}

/// A remote node's VXLAN endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vtep {
    /// Its `vxlan.tabby` address.
    pub tunnel_ip: Ipv4Addr,
    /// Its `vxlan.tabby` MAC.
    pub mac: [u8; 6],
    /// Its underlay address (the FDB entry's `dst`).
    pub node_ip: Ipv4Addr,
}

/// Everything the encapsulation needs on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncapPlan {
    /// Routes of remote blocks (and borrowed addresses) through a tunnel.
    pub routes: BTreeMap<IpNetwork, Hop>,
    /// One VTEP per remote node that has one: a permanent neighbour
    /// (tunnel IP → MAC) and an FDB entry (MAC → node IP) each.
    pub vteps: BTreeSet<Vtep>,
    /// The devices that must exist (`vxlan.tabby`, `tunl0`).
    pub devices: BTreeSet<Encap>,
    /// Resolves what BGP learned.
    pub resolver: Resolver,
}

/// Turns a learned (prefix, next hop) into a hop, by the prefix's pool and
/// the next hop: IPIP goes to the next hop itself (as BIRD's routes do in
/// Calico, so a node the local datastore does not know works too), VXLAN
/// to the tunnel address of the node with that address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolver {
    /// Encapsulated pools: CIDR, IPIP mode, VXLAN mode.
    pools: Vec<(IpNetwork, EncapMode, EncapMode)>,
    /// The local node's underlay subnet (CrossSubnet's reference).
    subnet: Option<IpNetwork>,
    /// VXLAN tunnel addresses of remote nodes, by underlay address.
    tunnels: BTreeMap<IpAddr, Ipv4Addr>,
}

impl Resolver {
    /// The hop of a prefix learned with next hop `nh`.
    pub fn resolve(&self, prefix: IpNetwork, nh: IpAddr) -> Hop {
        let pool = self.pools.iter().find(|p| p.0.contains(prefix.ip()));
        let (Some(&(_, ipip, vxlan)), IpAddr::V4(v4)) = (pool, nh) else {
            return Hop::Native(nh);
        };
        let same = self.subnet.is_some_and(|s| s.contains(nh));
        if encapsulates(ipip, same) {
            return Hop::Ipip(v4);
        }
        match (encapsulates(vxlan, same), self.tunnels.get(&nh)) {
            (true, Some(t)) => Hop::Vxlan(*t),
            _ => Hop::Native(nh),
        }
    }
}

/// Whether `mode` encapsulates towards a node in (or outside) our subnet.
pub fn encapsulates(mode: EncapMode, same_subnet: bool) -> bool {
    match mode {
        EncapMode::Never => false,
        EncapMode::Always => true,
        EncapMode::CrossSubnet => !same_subnet,
    }
}

/// Whether `remote` is on the local node's underlay subnet. Unknown (the
/// local node registered no prefix yet) counts as another subnet: the
/// tunnel works on both.
pub fn same_subnet(local: Option<&Node>, remote: &Node) -> bool {
    let subnet = local.and_then(|n| n.ipv4_address);
    let addr = remote.address.or(remote.ipv4_address.map(|a| a.ip()));
    matches!((subnet, addr), (Some(net), Some(ip)) if net.contains(ip))
}

/// The encapsulations some IPv4 pool enables (disabled pools too: their
/// blocks still hold pods).
pub fn enabled(pools: &[IpPool]) -> BTreeSet<Encap> {
    let mut out = BTreeSet::new();
    for p in pools.iter().filter(|p| p.cidr.is_ipv4()) {
        if p.ipip_mode != EncapMode::Never {
            out.insert(Encap::Ipip);
        }
        if p.vxlan_mode != EncapMode::Never {
            out.insert(Encap::Vxlan);
        }
    }
    out
}

/// The VXLAN endpoint of `node`, when it has published all of one.
pub fn vtep_of(node: &Node) -> Option<Vtep> {
    let node_ip = match node.address? {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => return None,
    };
    Some(Vtep {
        tunnel_ip: node.ipv4_vxlan_tunnel_addr?,
        mac: parse_mac(node.vxlan_tunnel_mac_addr.as_deref()?)?,
        node_ip,
    })
}

/// Plans the encapsulation of node `me`.
pub fn plan(view: &ClusterView, me: &str) -> EncapPlan {
    let snap = &view.snapshot;
    let local = snap.nodes.iter().find(|n| n.name == me);
    let devices = enabled(&snap.pools);
    let remote: BTreeMap<&str, &Node> = (snap.nodes.iter())
        .filter(|n| n.name != me)
        .map(|n| (n.name.as_str(), n))
        .collect();
    let mut plan = EncapPlan {
        resolver: resolver(view, local, &remote),
        devices,
        ..EncapPlan::default()
    };
    if plan.devices.contains(&Encap::Vxlan) {
        plan.vteps = remote.values().filter_map(|n| vtep_of(n)).collect();
    }
    for (prefix, owner) in remote_prefixes(view, me) {
        let Some(node) = remote.get(owner) else {
            continue;
        };
        if let Some(hop) = block_hop(view, local, node, prefix) {
            plan.routes.insert(prefix, hop);
        }
    }
    plan
}

fn resolver(view: &ClusterView, local: Option<&Node>, remote: &BTreeMap<&str, &Node>) -> Resolver {
    let pools = (view.snapshot.pools.iter())
        .filter(|p| p.ipip_mode != EncapMode::Never || p.vxlan_mode != EncapMode::Never)
        .map(|p| (p.cidr, p.ipip_mode, p.vxlan_mode))
        .collect();
    let tunnels = (remote.values())
        .filter_map(|n| Some((n.address?, n.ipv4_vxlan_tunnel_addr?)))
        .collect();
    Resolver {
        pools,
        subnet: local.and_then(|n| n.ipv4_address),
        tunnels,
    }
}

/// The tunnel hop of `prefix` on `node`, `None` when it is routed natively
/// or the node lacks what the tunnel needs (no address, no VTEP yet).
fn block_hop(
    view: &ClusterView,
    local: Option<&Node>,
    node: &Node,
    prefix: IpNetwork,
) -> Option<Hop> {
    let IpNetwork::V4(_) = prefix else {
        return None;
    };
    let pool = view.snapshot.pool_of(prefix.ip())?;
    let same = same_subnet(local, node);
    if encapsulates(pool.ipip_mode, same) {
        match node.address? {
            IpAddr::V4(v4) => return Some(Hop::Ipip(v4)),
            IpAddr::V6(_) => return None,
        }
    }
    if encapsulates(pool.vxlan_mode, same) {
        return vtep_of(node).map(|v| Hop::Vxlan(v.tunnel_ip));
    }
    None
}

/// Every prefix hosted on another node, with that node: blocks affine to
/// it and the /32s it borrowed from blocks of others.
fn remote_prefixes<'a>(view: &'a ClusterView, me: &str) -> Vec<(IpNetwork, &'a str)> {
    let mut out = Vec::new();
    for b in &view.snapshot.blocks {
        let owner = b.node();
        if let Some(n) = owner.filter(|n| *n != me) {
            out.push((b.cidr, n));
        }
        for (ip, attr) in b.allocated() {
            let Some(n) = attr.secondary.get("node").map(String::as_str) else {
                continue;
            };
            if n != me && Some(n) != owner {
                if let Ok(net) = IpNetwork::new(ip, if ip.is_ipv4() { 32 } else { 128 }) {
                    out.push((net, n));
                }
            }
        }
    }
    out
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The VTEP MAC of node `name`: a locally administered unicast address
/// from a hash of the name, the same on every start.
pub fn mac_for_node(name: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

#[cfg(test)]
mod tests;
