//! Static neighbours and VXLAN forwarding entries: `ip neigh ... nud
//! permanent` and `bridge fdb ... self permanent`.

use std::net::IpAddr;

use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;

use super::{deleted, Netlink};
use crate::error::{Error, Result};

/// A permanent neighbour entry (`ip neigh add IP lladdr MAC dev DEV nud permanent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    /// The neighbour's address.
    pub ip: IpAddr,
    /// Its MAC.
    pub mac: [u8; 6],
}

/// A forwarding entry of a VXLAN device (`bridge fdb add MAC dev DEV dst IP self permanent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// The inner destination MAC.
    pub mac: [u8; 6],
    /// The remote VTEP's underlay address.
    pub dst: IpAddr,
}

fn address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn ip_of(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The destination and MAC of a neighbour message.
fn parts(msg: &NeighbourMessage) -> (Option<IpAddr>, Option<[u8; 6]>) {
    let mut out = (None, None);
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(a) => out.0 = ip_of(a),
            NeighbourAttribute::LinkLayerAddress(l) => out.1 = <[u8; 6]>::try_from(&l[..]).ok(),
            _ => {}
        }
    }
    out
}

impl Netlink {
    /// The permanent neighbours of link `index` (`ip neigh show dev DEV nud permanent`).
    pub fn permanent_neighbours(&self, index: u32) -> Result<Vec<Neighbour>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let request = self.handle.neighbours().get().set_address_family(family);
            let msgs = self
                .collect(request.execute())
                .map_err(|e| Error::netlink(format!("list neighbours of #{index}"), e))?;
            for m in msgs.iter().filter(|m| m.header.ifindex == index) {
                if m.header.state != NeighbourState::Permanent {
                    continue;
                }
                if let (Some(ip), Some(mac)) = parts(m) {
                    out.push(Neighbour { ip, mac });
                }
            }
        }
        Ok(out)
    }

    /// Adds or replaces a permanent neighbour on link `index`.
    pub fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<()> {
        let request = (self.handle.neighbours().add(index, n.ip))
            .link_layer_address(&n.mac)
            .state(NeighbourState::Permanent)
            .replace();
        self.block_on(request.execute())
            .map_err(|e| Error::netlink(format!("set neighbour {} dev #{index}", n.ip), e))
    }

    /// Deletes the neighbour `ip` of link `index`; `false` when it was gone.
    pub fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<bool> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(address(ip)));
        let result = self.block_on(self.handle.neighbours().del(msg).execute());
        deleted(result, || format!("delete neighbour {ip} dev #{index}"))
    }

    /// The forwarding entries with a remote of link `index` (`bridge fdb show dev DEV`).
    pub fn fdb_entries(&self, index: u32) -> Result<Vec<FdbEntry>> {
        let request = (self.handle.neighbours().get()).set_address_family(AddressFamily::Bridge);
        let msgs = self
            .collect(request.execute())
            .map_err(|e| Error::netlink(format!("list fdb of #{index}"), e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index)
            .filter_map(|m| match parts(m) {
                (Some(dst), Some(mac)) => Some(FdbEntry { mac, dst }),
                _ => None,
            })
            .collect())
    }

    /// Adds or replaces a permanent forwarding entry of link `index`.
    pub fn set_fdb(&self, index: u32, e: FdbEntry) -> Result<()> {
        let mut request = (self.handle.neighbours().add_bridge(index, &e.mac))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace();
        (request.message_mut().attributes).push(NeighbourAttribute::Destination(address(e.dst)));
        self.block_on(request.execute()).map_err(|err| {
            Error::netlink(
                format!("set fdb {} dst {} dev #{index}", fmt_mac(e.mac), e.dst),
                err,
            )
        })
    }

    /// Deletes a forwarding entry of link `index`; `false` when it was gone.
    pub fn delete_fdb(&self, index: u32, e: FdbEntry) -> Result<bool> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(e.mac.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(address(e.dst)));
        let result = self.block_on(self.handle.neighbours().del(msg).execute());
        deleted(result, || {
            format!("delete fdb {} dst {} dev #{index}", fmt_mac(e.mac), e.dst)
        })
    }
}

fn fmt_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}
