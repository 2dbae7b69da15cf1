//! The tunnel devices through netlink: `vxlan.tabby` with its address,
//! permanent neighbours and FDB entries, and `tunl0` with its address.
//!
//! Each call compares the kernel with what is wanted and changes only the
//! difference, so it also removes what a previous run left behind.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use tabby_dataplane::{FdbEntry, Neighbour, Netlink, VxlanSpec};

use super::plan::Vtep;
use super::{EncapError, IPIP_DEVICE, VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI};

/// What `vxlan.tabby` must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanWant {
    /// Its link settings.
    pub spec: VxlanSpec,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Its MTU (uplink − 50).
    pub mtu: u32,
    /// Its address (a /32), once allocated.
    pub addr: Option<Ipv4Addr>,
    /// The remote VTEPs.
    pub vteps: BTreeSet<Vtep>,
}

impl VxlanWant {
    /// The spec of Tabby's device over `uplink` from `local`.
    pub fn spec(local: Ipv4Addr, uplink: u32) -> VxlanSpec {
        VxlanSpec {
            vni: VXLAN_VNI,
            port: VXLAN_PORT,
            local,
            dev: uplink,
        }
    }
}

fn dev_err(what: String) -> impl FnOnce(tabby_dataplane::Error) -> EncapError {
    move |source| EncapError::Device { what, source }
}

/// Makes `vxlan.tabby` as wanted (or deletes it for `None`); returns its index.
pub fn sync_vxlan(nl: &Netlink, want: Option<&VxlanWant>) -> Result<Option<u32>, EncapError> {
    let Some(want) = want else {
        if nl
            .delete_link(VXLAN_DEVICE)
            .map_err(dev_err(format!("delete {VXLAN_DEVICE}")))?
        {
            tracing::info!(device = VXLAN_DEVICE, "deleted: no pool uses VXLAN");
        }
        return Ok(None);
    };
    let index = vxlan_link(nl, want)?;
    sync_addr(nl, index, VXLAN_DEVICE, want.addr)?;
    sync_neighbours(nl, index, &want.vteps)?;
    sync_fdb(nl, index, &want.vteps)?;
    Ok(Some(index))
}

/// Creates the device, or recreates it when its VNI, port, local address
/// or underlay differ; sets MAC and MTU; brings it up.
fn vxlan_link(nl: &Netlink, want: &VxlanWant) -> Result<u32, EncapError> {
    let name = VXLAN_DEVICE;
    let have = nl
        .vxlan_spec(name)
        .map_err(dev_err(format!("read {name}")))?;
    if have.is_some() && have != Some(Some(want.spec)) {
        tracing::info!(device = name, ?have, want = ?want.spec, "recreating: settings differ");
        nl.delete_link(name)
            .map_err(dev_err(format!("delete {name}")))?;
    }
    if have != Some(Some(want.spec)) {
        nl.create_vxlan(name, &want.spec, want.mac, want.mtu)
            .map_err(dev_err(format!("create {name}")))?;
        tracing::info!(device = name, vni = want.spec.vni, local = %want.spec.local, mtu = want.mtu, "created");
    }
    let link = (nl.link(name).map_err(dev_err(format!("read {name}")))?)
        .ok_or(EncapError::Vanished { device: name })?;
    if link.mac != Some(want.mac) {
        nl.set_mac(link.index, want.mac)
            .map_err(dev_err(format!("set {name} address")))?;
    }
    finish_link(nl, &link, want.mtu)?;
    Ok(link.index)
}

/// Sets the MTU and brings the link up.
fn finish_link(nl: &Netlink, link: &tabby_dataplane::Link, mtu: u32) -> Result<(), EncapError> {
    if link.mtu != mtu {
        nl.set_mtu(link.index, mtu)
            .map_err(dev_err(format!("set {} mtu {mtu}", link.name)))?;
    }
    if !link.up {
        nl.set_up(link.index)
            .map_err(dev_err(format!("set {} up", link.name)))?;
    }
    Ok(())
}

/// Gives the device exactly `addr`/32 (no address for `None`).
fn sync_addr(
    nl: &Netlink,
    index: u32,
    name: &str,
    addr: Option<Ipv4Addr>,
) -> Result<(), EncapError> {
    let want: Option<IpNetwork> = addr.and_then(|a| IpNetwork::new(IpAddr::V4(a), 32).ok());
    let have = nl
        .addresses(index)
        .map_err(dev_err(format!("list addresses of {name}")))?;
    for old in have.iter().filter(|a| a.is_ipv4() && Some(**a) != want) {
        nl.delete_address(index, *old)
            .map_err(dev_err(format!("delete {old} from {name}")))?;
    }
    if let Some(w) = want.filter(|w| !have.contains(w)) {
        nl.add_address(index, w)
            .map_err(dev_err(format!("add {w} to {name}")))?;
        tracing::info!(device = name, addr = %w, "tunnel address set");
    }
    Ok(())
}

fn sync_neighbours(nl: &Netlink, index: u32, vteps: &BTreeSet<Vtep>) -> Result<(), EncapError> {
    let want: BTreeSet<Neighbour> = (vteps.iter())
        .map(|v| Neighbour {
            ip: IpAddr::V4(v.tunnel_ip),
            mac: v.mac,
        })
        .collect();
    let have: BTreeSet<Neighbour> = (nl.permanent_neighbours(index))
        .map_err(dev_err(format!("list neighbours of {VXLAN_DEVICE}")))?
        .into_iter()
        .collect();
    for n in have.difference(&want) {
        nl.delete_neighbour(index, n.ip)
            .map_err(dev_err(format!("delete neighbour {}", n.ip)))?;
    }
    for n in want.difference(&have) {
        nl.set_neighbour(index, *n)
            .map_err(dev_err(format!("set neighbour {}", n.ip)))?;
    }
    Ok(())
}

fn sync_fdb(nl: &Netlink, index: u32, vteps: &BTreeSet<Vtep>) -> Result<(), EncapError> {
    let want: BTreeSet<FdbEntry> = (vteps.iter())
        .map(|v| FdbEntry {
            mac: v.mac,
            dst: IpAddr::V4(v.node_ip),
        })
        .collect();
    let have: BTreeSet<FdbEntry> = (nl.fdb_entries(index))
        .map_err(dev_err(format!("list fdb of {VXLAN_DEVICE}")))?
        .into_iter()
        .collect();
    for e in have.difference(&want) {
        nl.delete_fdb(index, *e)
            .map_err(dev_err(format!("delete fdb entry dst {}", e.dst)))?;
    }
    for e in want.difference(&have) {
        nl.set_fdb(index, *e)
            .map_err(dev_err(format!("set fdb entry dst {}", e.dst)))?;
    }
    Ok(())
}

/// Makes `tunl0` up with `addr`/32 and `mtu` (or takes its address away
/// for `None`: the module's device cannot be deleted); returns its index.
pub fn sync_ipip(
    nl: &Netlink,
    want: Option<(Option<Ipv4Addr>, u32)>,
) -> Result<Option<u32>, EncapError> {
    let Some((addr, mtu)) = want else {
        if let Some(link) = nl
            .link(IPIP_DEVICE)
            .map_err(dev_err(format!("read {IPIP_DEVICE}")))?
        {
            sync_addr(nl, link.index, IPIP_DEVICE, None)?;
        }
        return Ok(None);
    };
    let index = nl
        .ensure_tunl0()
        .map_err(|source| match source.is_unsupported() {
            true => EncapError::IpipUnsupported { source },
            false => EncapError::Device {
                what: format!("create {IPIP_DEVICE}"),
                source,
            },
        })?;
    let link = (nl
        .link_by_index(index)
        .map_err(dev_err(format!("read {IPIP_DEVICE}")))?)
    .ok_or(EncapError::Vanished {
        device: IPIP_DEVICE,
    })?;
    finish_link(nl, &link, mtu)?;
    sync_addr(nl, index, IPIP_DEVICE, addr)?;
    Ok(Some(index))
}
