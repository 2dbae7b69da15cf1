//! Tunnel devices: `ip link add ... type vxlan` and the IPIP fallback
//! device `tunl0`.

use std::net::Ipv4Addr;

use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{LinkIpIp, LinkUnspec, LinkVxlan};

use super::Netlink;
use crate::error::{Error, Result};

/// What a VXLAN device is made of (`ip -d link show` of a `vxlan` link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanSpec {
    /// The VNI (`id`).
    pub vni: u32,
    /// The UDP destination port (`dstport`).
    pub port: u16,
    /// The source address of the outer packets (`local`).
    pub local: Ipv4Addr,
    /// The underlay device (`dev`), by index.
    pub dev: u32,
}

impl VxlanSpec {
    /// The `RTM_NEWLINK` request creating `name` with this spec, MAC and
    /// MTU, `nolearning`: `ip link add NAME address MAC mtu MTU type vxlan id
    /// VNI local LOCAL dev DEV dstport PORT nolearning`.
    pub fn to_message(&self, name: &str, mac: [u8; 6], mtu: u32) -> LinkMessage {
        LinkVxlan::new(name, self.vni)
            .dev(self.dev)
            .port(self.port)
            .local(self.local)
            .learning(false)
            .address(mac.to_vec())
            .mtu(mtu)
            .build()
    }

    /// Reads the spec of a link message, `None` when it is no VXLAN device.
    fn from_message(msg: &LinkMessage) -> Option<VxlanSpec> {
        let infos = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })?;
        let data = infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(data)) => Some(data),
            _ => None,
        })?;
        let mut spec = VxlanSpec {
            vni: 0,
            port: 0,
            local: Ipv4Addr::UNSPECIFIED,
            dev: 0,
        };
        for d in data {
            match d {
                InfoVxlan::Id(v) => spec.vni = *v,
                InfoVxlan::Port(p) => spec.port = *p,
                InfoVxlan::Local(a) => spec.local = *a,
                InfoVxlan::Link(i) => spec.dev = *i,
                _ => {}
            }
        }
        Some(spec)
    }
}

impl Netlink {
    /// Creates a VXLAN device (see [`VxlanSpec::to_message`]), left down;
    /// returns its index. A name already taken gives [`Error::Exists`].
    pub fn create_vxlan(
        &self,
        name: &str,
        spec: &VxlanSpec,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<u32> {
        let what = || {
            format!(
                "create vxlan {name} (id {} local {} dev #{})",
                spec.vni, spec.local, spec.dev
            )
        };
        tracing::debug!(device = name, ?spec, mtu, "create vxlan");
        let request = self.handle.link().add(spec.to_message(name, mac, mtu));
        self.block_on(request.execute())
            .map_err(|e| Error::netlink(what(), e))?;
        self.link(name)?
            .map(|l| l.index)
            .ok_or_else(|| Error::Netlink {
                what: what(),
                source: std::io::Error::other("the device vanished right after creation"),
            })
    }

    /// The VXLAN spec of link `name`: `None` when there is no such link,
    /// `Some(None)` when it is not a VXLAN device.
    pub fn vxlan_spec(&self, name: &str) -> Result<Option<Option<VxlanSpec>>> {
        let request = self.handle.link().get().match_name(name).execute();
        match self.collect(request) {
            Ok(msgs) => Ok(msgs.first().map(VxlanSpec::from_message)),
            Err(e) => {
                let err = Error::netlink(format!("get link {name}"), e);
                if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Sets a link's MAC (`ip link set dev DEV address MAC`).
    pub fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<()> {
        let message = LinkUnspec::new_with_index(index)
            .address(mac.to_vec())
            .build();
        self.block_on(self.handle.link().set(message).execute())
            .map_err(|e| Error::netlink(format!("set link #{index} address"), e))
    }

    /// Makes sure `tunl0` exists and returns its index. The device is the
    /// `ipip` module's own: asking for an `ipip` link makes the kernel load
    /// the module (which creates `tunl0`, so the request itself may then
    /// find the name taken). A kernel without IPIP answers an error for
    /// which [`Error::is_unsupported`] holds.
    pub fn ensure_tunl0(&self) -> Result<u32> {
        const NAME: &str = "tunl0";
        if let Some(link) = self.link(NAME)? {
            return Ok(link.index);
        }
        let request = self.handle.link().add(LinkIpIp::new(NAME).build());
        if let Err(e) = self.block_on(request.execute()) {
            let err = Error::netlink(format!("create {NAME} (type ipip)"), e);
            if !err.is_exists() {
                return Err(err);
            }
        }
        self.link(NAME)?
            .map(|l| l.index)
            .ok_or_else(|| Error::Netlink {
                what: format!("create {NAME} (type ipip)"),
                source: std::io::Error::other("the ipip module loaded but created no tunl0"),
            })
    }
}
