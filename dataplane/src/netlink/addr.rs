//! Addresses: `ip address add/show/del`.

use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};

use super::{deleted, Netlink};
use crate::error::{Error, Result};

impl Netlink {
    /// Adds an address to a link (`ip address add ADDR/LEN dev DEV`).
    /// An address already present gives [`Error::Exists`].
    pub fn add_address(&self, index: u32, addr: IpNetwork) -> Result<()> {
        tracing::debug!(%addr, index, netns = %self.netns.display(), "add address");
        let request = self.handle.address().add(index, addr.ip(), addr.prefix());
        self.block_on(request.execute())
            .map_err(|e| Error::netlink(format!("add address {addr} dev #{index}"), e))
    }

    /// Lists the addresses of a link (`ip address show dev DEV`).
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>> {
        let request = self.handle.address().get().set_link_index_filter(index);
        let messages = self
            .collect(request.execute())
            .map_err(|e| Error::netlink(format!("list addresses of #{index}"), e))?;
        Ok(messages.iter().filter_map(address_of).collect())
    }

    /// Removes an address from a link (`ip address del ADDR/LEN dev DEV`).
    /// Returns `false` when the link did not have it.
    pub fn delete_address(&self, index: u32, addr: IpNetwork) -> Result<bool> {
        let mut message = AddressMessage::default();
        message.header.family = match addr {
            IpNetwork::V4(_) => rtnetlink::packet_route::AddressFamily::Inet,
            IpNetwork::V6(_) => rtnetlink::packet_route::AddressFamily::Inet6,
        };
        message.header.prefix_len = addr.prefix();
        message.header.index = index;
        message.attributes.push(AddressAttribute::Local(addr.ip()));
        if addr.is_ipv6() {
            message
                .attributes
                .push(AddressAttribute::Address(addr.ip()));
        }
        let result = self.block_on(self.handle.address().del(message).execute());
        deleted(result, || format!("delete address {addr} dev #{index}"))
    }
}

/// The local address of an `RTM_NEWADDR` message with its prefix length.
/// IPv4 carries it in `IFA_LOCAL` (`IFA_ADDRESS` is the peer on
/// point-to-point links), IPv6 only in `IFA_ADDRESS`.
fn address_of(msg: &AddressMessage) -> Option<IpNetwork> {
    let local = msg.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    IpNetwork::new(local.or(address)?, msg.header.prefix_len).ok()
}
