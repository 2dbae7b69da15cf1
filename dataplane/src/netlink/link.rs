//! Links: `ip link add/show/set/del`.

use std::os::fd::AsRawFd;

use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::{deleted, Netlink};
use crate::error::{Error, Result};
use crate::netns::NetNs;

/// A network interface as `ip link show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The interface index, unique within its namespace.
    pub index: u32,
    /// The interface name, e.g. `eth0` or `tabby1a2b3c4d5e`.
    pub name: String,
    /// The hardware address, when it is a 6-byte Ethernet address.
    pub mac: Option<[u8; 6]>,
    /// The MTU in bytes.
    pub mtu: u32,
    /// Whether the interface is administratively up (`IFF_UP`).
    pub up: bool,
    /// The link kind (`veth`, `dummy`, `ipip`, ...), none for physical devices.
    pub kind: Option<String>,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(addr) => link.mac = <[u8; 6]>::try_from(addr).ok(),
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                LinkAttribute::LinkInfo(infos) => {
                    link.kind = infos.into_iter().find_map(|info| match info {
                        LinkInfo::Kind(kind) => Some(kind.to_string()),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        link
    }
}

impl Netlink {
    /// Creates a veth pair with the peer created directly in `peer_ns`:
    ///
    /// `ip link add HOST address HOST_MAC mtu MTU type veth peer name PEER mtu MTU netns NS`
    ///
    /// The peer's namespace is given by file descriptor (`IFLA_NET_NS_FD`) in
    /// the peer's part of the request, so the kernel creates it there: no
    /// device is moved afterwards. Both ends are left down. Returns the
    /// host end's ifindex. A name already taken on either side gives
    /// [`Error::Exists`].
    pub fn create_veth(
        &self,
        host_name: &str,
        host_mac: [u8; 6],
        peer_name: &str,
        peer_ns: &NetNs,
        mtu: Option<u32>,
    ) -> Result<u32> {
        let what = || {
            format!(
                "create veth {host_name} (peer {peer_name} in {})",
                peer_ns.path().display()
            )
        };
        tracing::debug!(host = host_name, peer = peer_name, netns = %peer_ns.path().display(), ?mtu, "create veth");
        let message = veth_message(host_name, host_mac, peer_name, peer_ns, mtu);
        let result = self.block_on(self.handle.link().add(message).execute());
        result.map_err(|e| Error::netlink(what(), e))?;
        match self.link(host_name)? {
            Some(link) => Ok(link.index),
            None => Err(Error::Netlink {
                what: what(),
                source: std::io::Error::other("the host end vanished right after creation"),
            }),
        }
    }

    /// Looks a link up by name (`ip link show NAME`); `None` when there is none.
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        let request = self.handle.link().get().match_name(name).execute();
        self.single_link(request, || format!("get link {name}"))
    }

    /// Looks a link up by index (`ip link show` filtered on the index);
    /// `None` when there is none.
    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let request = self.handle.link().get().match_index(index).execute();
        self.single_link(request, || format!("get link #{index}"))
    }

    /// Lists every link of the namespace (`ip link show`).
    pub fn links(&self) -> Result<Vec<Link>> {
        let messages = self
            .collect(self.handle.link().get().execute())
            .map_err(|e| Error::netlink("list links", e))?;
        Ok(messages.into_iter().map(Link::from_message).collect())
    }

    /// Brings a link up (`ip link set dev DEV up`).
    pub fn set_up(&self, index: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.block_on(self.handle.link().set(message).execute())
            .map_err(|e| Error::netlink(format!("set link #{index} up"), e))
    }

    /// Sets a link's MTU (`ip link set dev DEV mtu MTU`).
    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.block_on(self.handle.link().set(message).execute())
            .map_err(|e| Error::netlink(format!("set link #{index} mtu {mtu}"), e))
    }

    /// Deletes a link by name (`ip link del NAME`). Deleting one end of a
    /// veth pair deletes both. Returns `false` when there was no such link.
    pub fn delete_link(&self, name: &str) -> Result<bool> {
        tracing::debug!(link = name, "delete link");
        let message = LinkUnspec::new_with_name(name).build();
        let result = self.block_on(self.handle.link().del_with_message(message).execute());
        deleted(result, || format!("delete link {name}"))
    }

    fn single_link(
        &self,
        request: impl futures::Stream<Item = Result<LinkMessage, rtnetlink::Error>>,
        what: impl FnOnce() -> String,
    ) -> Result<Option<Link>> {
        match self.collect(request) {
            Ok(messages) => Ok(messages.into_iter().next().map(Link::from_message)),
            Err(e) => {
                let err = Error::netlink(what(), e);
                if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }
}

/// Builds the `RTM_NEWLINK` request of [`Netlink::create_veth`].
fn veth_message(
    host_name: &str,
    host_mac: [u8; 6],
    peer_name: &str,
    peer_ns: &NetNs,
    mtu: Option<u32>,
) -> LinkMessage {
    let mut peer = LinkUnspec::new_with_name(peer_name).setns_by_fd(peer_ns.as_raw_fd());
    let mut host = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name)
        .address(host_mac.to_vec());
    if let Some(mtu) = mtu {
        peer = peer.mtu(mtu);
        host = host.mtu(mtu);
    }
    host.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build()
}
