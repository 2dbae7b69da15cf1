//! This node's tunnel addresses and VTEP MAC: allocated through IPAM
//! under Calico's handles (`vxlan-tunnel-addr-<node>`,
//! `ipip-tunnel-addr-<node>`), published in the node's document, released
//! when no pool needs them any more.
//!
//! Idempotent: a restart finds the address in the Node (and its handle)
//! and keeps it; an address outside every pool of its kind (the pool
//! changed) is released and a new one taken.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use tabby_ipam::datastore::Datastore;
use tabby_ipam::store::{self, node_key};
use tabby_ipam::{AssignArgs, DatastoreError, EncapMode, IpPool, Ipam, Node};

use super::plan::{format_mac, mac_for_node, parse_mac, Encap};
use super::EncapError;
use crate::desired::ClusterView;

/// This node's tunnel facts after a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tunnels {
    /// The address of `vxlan.tabby`, while a VXLAN pool exists.
    pub vxlan: Option<Ipv4Addr>,
    /// The address of `tunl0`, while an IPIP pool exists.
    pub ipip: Option<Ipv4Addr>,
    /// The MAC of `vxlan.tabby`.
    pub mac: [u8; 6],
}

/// The IPAM handle of a tunnel address.
pub fn handle(encap: Encap, node: &str) -> String {
    format!("{encap}-tunnel-addr-{node}")
}

/// The enabled IPv4 pools of `encap` (where a new address may come from).
fn pools_of(pools: &[IpPool], encap: Encap) -> Vec<IpNetwork> {
    pools
        .iter()
        .filter(|p| p.cidr.is_ipv4() && !p.disabled)
        .filter(|p| match encap {
            Encap::Ipip => p.ipip_mode != EncapMode::Never,
            Encap::Vxlan => p.vxlan_mode != EncapMode::Never,
        })
        .map(|p| p.cidr)
        .collect()
}

/// What to do with one tunnel address (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrAction {
    /// Keep it (or keep having none).
    Keep(Option<Ipv4Addr>),
    /// Release the handle and publish none.
    Release,
    /// Take one from these pools (after releasing a stale one).
    Allocate(Vec<IpNetwork>),
}

/// Decides from the published address, whether the handle exists and the pools.
pub fn addr_action(
    current: Option<Ipv4Addr>,
    has_handle: bool,
    pools: Vec<IpNetwork>,
) -> AddrAction {
    if pools.is_empty() {
        return match current.is_some() || has_handle {
            true => AddrAction::Release,
            false => AddrAction::Keep(None),
        };
    }
    match current {
        Some(ip) if has_handle && pools.iter().any(|p| p.contains(IpAddr::V4(ip))) => {
            AddrAction::Keep(Some(ip))
        }
        _ => AddrAction::Allocate(pools),
    }
}

/// Brings this node's tunnel addresses and MAC in line with the pools of
/// `view`, writing the node document when they change.
pub fn ensure<D: Datastore>(
    ds: &Arc<D>,
    view: &ClusterView,
    me: &str,
) -> Result<Tunnels, EncapError> {
    let node = view.snapshot.nodes.iter().find(|n| n.name == me);
    let current = |e: Encap| {
        node.and_then(|n| match e {
            Encap::Vxlan => n.ipv4_vxlan_tunnel_addr,
            Encap::Ipip => n.ipv4_ipip_tunnel_addr,
        })
    };
    let mut out = Tunnels {
        mac: (node.and_then(|n| parse_mac(n.vxlan_tunnel_mac_addr.as_deref()?)))
            .unwrap_or_else(|| mac_for_node(me)),
        ..Tunnels::default()
    };
    for encap in [Encap::Vxlan, Encap::Ipip] {
        let h = handle(encap, me);
        let has_handle = view.snapshot.handles.iter().any(|x| x.handle_id == h);
        let pools = pools_of(&view.snapshot.pools, encap);
        let ip = match addr_action(current(encap), has_handle, pools) {
            AddrAction::Keep(ip) => ip,
            AddrAction::Release => release(ds, &h, encap)?,
            AddrAction::Allocate(pools) => Some(allocate(ds, me, &h, encap, pools)?),
        };
        match encap {
            Encap::Vxlan => out.vxlan = ip,
            Encap::Ipip => out.ipip = ip,
        }
    }
    publish(ds, me, &out)?;
    Ok(out)
}

fn release<D: Datastore>(
    ds: &Arc<D>,
    h: &str,
    encap: Encap,
) -> Result<Option<Ipv4Addr>, EncapError> {
    let released = (Ipam::new(Arc::clone(ds)).release_by_handle(h))
        .map_err(|source| EncapError::TunnelAddress { encap, source })?;
    for r in released {
        tracing::info!(%encap, ip = %r.ip, "released the tunnel address: no pool uses it any more");
    }
    Ok(None)
}

/// Reuses what the handle holds in `pools`, else releases it and assigns one.
fn allocate<D: Datastore>(
    ds: &Arc<D>,
    me: &str,
    h: &str,
    encap: Encap,
    pools: Vec<IpNetwork>,
) -> Result<Ipv4Addr, EncapError> {
    let err = |source| EncapError::TunnelAddress { encap, source };
    let ipam = Ipam::new(Arc::clone(ds));
    let held = ipam.addresses_of(h).map_err(err)?;
    let reusable = held.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) if pools.iter().any(|p| p.contains(*ip)) => Some(*v4),
        _ => None,
    });
    if let Some(ip) = reusable {
        return Ok(ip);
    }
    if !held.is_empty() {
        ipam.release_by_handle(h).map_err(err)?;
    }
    let kind = match encap {
        Encap::Vxlan => "vxlanTunnelAddress",
        Encap::Ipip => "ipipTunnelAddress",
    };
    let args = AssignArgs {
        handle: h.to_string(),
        node: me.to_string(),
        attrs: BTreeMap::from([("type".to_string(), kind.to_string())]),
        num_v4: 1,
        num_v6: 0,
        pools,
    };
    let got = ipam.assign(&args).map_err(err)?;
    match got.first().map(|n| n.ip()) {
        Some(IpAddr::V4(ip)) => {
            tracing::info!(%encap, %ip, handle = h, "allocated the tunnel address");
            Ok(ip)
        }
        _ => Err(err(tabby_ipam::IpamError::Exhausted {
            pools: (args.pools.iter().map(ToString::to_string))
                .collect::<Vec<_>>()
                .join(", "),
            node: me.to_string(),
        })),
    }
}

/// Writes the tunnel fields into `nodes/<me>` when they differ.
fn publish<D: Datastore>(ds: &D, me: &str, t: &Tunnels) -> Result<(), EncapError> {
    let key = node_key(me);
    let write = || -> Result<(), DatastoreError> {
        for _ in 0..20 {
            let Some(doc) = store::get::<Node>(ds, &key)? else {
                return Ok(());
            };
            let mut node = doc.value.clone();
            node.ipv4_vxlan_tunnel_addr = t.vxlan;
            node.ipv4_ipip_tunnel_addr = t.ipip;
            node.vxlan_tunnel_mac_addr = t.vxlan.map(|_| format_mac(t.mac));
            if node == doc.value {
                return Ok(());
            }
            match store::update(ds, &key, &node, &doc.revision) {
                Err(DatastoreError::Conflict { .. }) => continue,
                other => return other.map(|_| ()),
            }
        }
        Err(DatastoreError::Conflict { key: key.clone() })
    };
    write().map_err(EncapError::PublishNode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn a_tunnel_address_is_kept_allocated_or_released_by_its_pools() {
        let ip = Some("10.244.0.1".parse().unwrap());
        let pools = vec![net("10.244.0.0/16")];
        assert_eq!(addr_action(ip, true, pools.clone()), AddrAction::Keep(ip));
        assert_eq!(
            addr_action(ip, false, pools.clone()),
            AddrAction::Allocate(pools.clone()),
            "published but its handle is gone: take one again"
        );
        assert_eq!(
            addr_action(None, false, pools.clone()),
            AddrAction::Allocate(pools.clone())
        );
        let other = vec![net("10.245.0.0/16")];
        assert_eq!(
            addr_action(ip, true, other.clone()),
            AddrAction::Allocate(other),
            "outside every pool of its kind: a new one"
        );
        assert_eq!(addr_action(ip, true, vec![]), AddrAction::Release);
        assert_eq!(addr_action(None, true, vec![]), AddrAction::Release);
        assert_eq!(addr_action(None, false, vec![]), AddrAction::Keep(None));
    }

    #[test]
    fn tunnel_addresses_survive_a_restart_and_go_when_the_pool_stops_encapsulating() {
        let ds = Arc::new(tabby_ipam::MemDatastore::default());
        let ipam = Ipam::new(Arc::clone(&ds));
        let mut pool = IpPool {
            name: "p".into(),
            cidr: net("10.244.0.0/16"),
            block_size: 26,
            ipip_mode: EncapMode::Never,
            vxlan_mode: EncapMode::Always,
            nat_outgoing: false,
            disabled: false,
            node_selector: "all()".into(),
        };
        ipam.create_pool(&pool).unwrap();
        let node = Node {
            name: "node-1".into(),
            ..Default::default()
        };
        store::create(ds.as_ref(), &node_key("node-1"), &node).unwrap();
        let load = || crate::register::load_view(ds.as_ref()).unwrap();
        let first = ensure(&ds, &load(), "node-1").unwrap();
        let ip = first.vxlan.expect("a VXLAN address");
        assert_eq!(first.ipip, None);
        let view = load();
        let n = &view.snapshot.nodes[0];
        assert_eq!(n.ipv4_vxlan_tunnel_addr, Some(ip));
        assert_eq!(
            n.vxlan_tunnel_mac_addr,
            Some(format_mac(mac_for_node("node-1")))
        );
        assert_eq!(
            ensure(&ds, &view, "node-1").unwrap(),
            first,
            "a restart keeps them"
        );
        assert_eq!(
            ipam.addresses_of("vxlan-tunnel-addr-node-1").unwrap(),
            vec![IpAddr::V4(ip)]
        );
        let doc = store::get::<IpPool>(ds.as_ref(), &store::pool_key("p"))
            .unwrap()
            .unwrap();
        pool.vxlan_mode = EncapMode::Never;
        pool.ipip_mode = EncapMode::Always;
        store::update(ds.as_ref(), &store::pool_key("p"), &pool, &doc.revision).unwrap();
        let switched = ensure(&ds, &load(), "node-1").unwrap();
        assert_eq!(switched.vxlan, None);
        assert!(switched.ipip.is_some());
        assert!(ipam
            .addresses_of("vxlan-tunnel-addr-node-1")
            .unwrap()
            .is_empty());
        let n = &load().snapshot.nodes[0];
        assert_eq!(
            (n.ipv4_vxlan_tunnel_addr, n.vxlan_tunnel_mac_addr.as_deref()),
            (None, None)
        );
        assert_eq!(n.ipv4_ipip_tunnel_addr, switched.ipip);
    }
}
