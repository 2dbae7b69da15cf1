//! Routes: `ip route add/replace/del/show`.
//!
//! [`Route`] is plain data; [`Route::to_message`] turns it into the netlink
//! message in a pure function, so tests can check the message without root.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
    RouteVia,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::{deleted, Netlink};
use crate::error::{Error, Result};

/// `RTPROT_BOOT`, the protocol of routes added by `ip route add`; the default.
pub const RTPROT_BOOT: u8 = 3;
/// `RT_TABLE_MAIN`, the table `ip route` shows; the default.
pub const RT_TABLE_MAIN: u32 = 254;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 (`ip -4`).
    V4,
    /// IPv6 (`ip -6`).
    V6,
}

/// The scope of a route: how far its destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// A destination reached through a gateway (`scope global`).
    #[default]
    Universe,
    /// A destination on the link itself (`scope link`).
    Link,
    /// An address of this host (`scope host`).
    Host,
    /// Any other scope number (site, nowhere, user-defined).
    Other(u8),
}

/// The type of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RouteKind {
    /// A normal route (`unicast`).
    #[default]
    Unicast,
    /// Drop the packets silently (`blackhole`).
    Blackhole,
    /// Any other type (unreachable, prohibit, throw, ...), by number.
    Other(u8),
}

/// A route of a routing table, as `ip route` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// The destination prefix; `0.0.0.0/0` or `::/0` is `default`.
    pub dst: IpNetwork,
    /// The next hop (`via`).
    pub gateway: Option<IpAddr>,
    /// The output interface index (`dev`).
    pub oif: Option<u32>,
    /// The scope; a route with a gateway must be [`Scope::Universe`].
    pub scope: Scope,
    /// The type.
    pub kind: RouteKind,
    /// Who owns the route (`proto`): [`RTPROT_BOOT`] by default; the node
    /// agent uses its own number to find its routes again. When deleting,
    /// 0 matches any protocol.
    pub protocol: u8,
    /// Trust the gateway to be on the link even without a matching prefix.
    pub onlink: bool,
    /// The table: [`RT_TABLE_MAIN`] by default.
    pub table: u32,
}

impl Route {
    /// A unicast route to `dst` in the main table, scope universe, protocol
    /// boot, with neither gateway nor device yet.
    pub fn new(dst: IpNetwork) -> Route {
        Route {
            dst,
            gateway: None,
            oif: None,
            scope: Scope::Universe,
            kind: RouteKind::Unicast,
            protocol: RTPROT_BOOT,
            onlink: false,
            table: RT_TABLE_MAIN,
        }
    }

    /// `ip route add blackhole DST`.
    pub fn blackhole(dst: IpNetwork) -> Route {
        Route {
            kind: RouteKind::Blackhole,
            ..Route::new(dst)
        }
    }

    /// What to delete to remove the route to `dst` whatever its type, gateway
    /// and device (`ip route del DST`): type 0 and no next hop match any.
    pub fn matching(dst: IpNetwork) -> Route {
        Route {
            kind: RouteKind::Other(0),
            ..Route::new(dst)
        }
    }

    /// Sets the gateway (`via GW`).
    pub fn via(mut self, gateway: IpAddr) -> Route {
        self.gateway = Some(gateway);
        self
    }

    /// Sets the output interface (`dev DEV`).
    pub fn dev(mut self, oif: u32) -> Route {
        self.oif = Some(oif);
        self
    }

    /// Sets the scope (`scope link`).
    pub fn with_scope(mut self, scope: Scope) -> Route {
        self.scope = scope;
        self
    }

    /// Sets the protocol (`proto N`).
    pub fn with_protocol(mut self, protocol: u8) -> Route {
        self.protocol = protocol;
        self
    }

    /// Sets the table (`table N`).
    pub fn in_table(mut self, table: u32) -> Route {
        self.table = table;
        self
    }

    /// Marks the gateway as on-link (`onlink`).
    pub fn with_onlink(mut self) -> Route {
        self.onlink = true;
        self
    }

    /// The address family of the destination.
    pub fn family(&self) -> Family {
        match self.dst {
            IpNetwork::V4(_) => Family::V4,
            IpNetwork::V6(_) => Family::V6,
        }
    }

    /// The route as `ip route` prints it, e.g.
    /// `default via 169.254.1.1 dev #3` or `10.0.0.5 dev #7 scope link`.
    /// The device is shown by index (`#7`) since a route only knows that.
    pub fn to_ip_command(&self) -> String {
        let mut out = String::new();
        match self.kind {
            RouteKind::Unicast => {}
            RouteKind::Blackhole => out.push_str("blackhole "),
            RouteKind::Other(n) => out.push_str(&format!("type {n} ")),
        }
        if self.dst.prefix() == 0 {
            out.push_str("default");
        } else if self.dst.prefix() == max_prefix(self.family()) {
            out.push_str(&self.dst.ip().to_string());
        } else {
            out.push_str(&self.dst.to_string());
        }
        if let Some(gateway) = self.gateway {
            out.push_str(&format!(" via {gateway}"));
        }
        if let Some(oif) = self.oif {
            out.push_str(&format!(" dev #{oif}"));
        }
        if self.table != RT_TABLE_MAIN {
            out.push_str(&format!(" table {}", self.table));
        }
        match self.protocol {
            RTPROT_BOOT => {}
            2 => out.push_str(" proto kernel"),
            4 => out.push_str(" proto static"),
            n => out.push_str(&format!(" proto {n}")),
        }
        match self.scope {
            Scope::Universe => {}
            Scope::Link => out.push_str(" scope link"),
            Scope::Host => out.push_str(" scope host"),
            Scope::Other(n) => out.push_str(&format!(" scope {n}")),
        }
        if self.onlink {
            out.push_str(" onlink");
        }
        out
    }

    /// Builds the `RTM_NEWROUTE` message for this route.
    pub fn to_message(&self) -> Result<RouteMessage> {
        let invalid = |reason: String| Error::InvalidRoute {
            route: self.to_ip_command(),
            reason,
        };
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.dst.ip(), self.dst.prefix())
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(gateway) = self.gateway {
            builder = builder
                .gateway(gateway)
                .map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(oif) = self.oif {
            builder = builder.output_interface(oif);
        }
        builder = builder
            .scope(RouteScope::from(u8::from(self.scope)))
            .kind(RouteType::from(u8::from(self.kind)))
            .protocol(RouteProtocol::from(self.protocol))
            .table_id(self.table);
        if self.onlink {
            builder = builder.onlink();
        }
        Ok(builder.build())
    }

    /// Builds the `RTM_DELROUTE` message: like [`Route::to_message`] but
    /// matching any scope, as `ip route del` does.
    pub(crate) fn to_delete_message(&self) -> Result<RouteMessage> {
        let mut message = self.to_message()?;
        message.header.scope = RouteScope::NoWhere;
        Ok(message)
    }

    /// Reads a route of a dump back; `None` for multicast and other families.
    fn from_message(msg: &RouteMessage) -> Option<Route> {
        let family = match msg.header.address_family {
            AddressFamily::Inet => Family::V4,
            AddressFamily::Inet6 => Family::V6,
            _ => return None,
        };
        let mut dst = None;
        let mut route = Route::new(unspecified(family));
        route.table = u32::from(msg.header.table);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(addr) => dst = route_address(addr),
                RouteAttribute::Gateway(addr) => route.gateway = route_address(addr),
                RouteAttribute::Via(RouteVia::Inet(ip)) => route.gateway = Some(IpAddr::V4(*ip)),
                RouteAttribute::Via(RouteVia::Inet6(ip)) => route.gateway = Some(IpAddr::V6(*ip)),
                RouteAttribute::Oif(index) => route.oif = Some(*index),
                RouteAttribute::Table(table) => route.table = *table,
                _ => {}
            }
        }
        let dst = dst.unwrap_or_else(|| unspecified(family).ip());
        route.dst = IpNetwork::new(dst, msg.header.destination_prefix_length).ok()?;
        route.scope = Scope::from(u8::from(msg.header.scope));
        route.kind = RouteKind::from(u8::from(msg.header.kind));
        route.protocol = u8::from(msg.header.protocol);
        route.onlink = msg.header.flags.contains(RouteFlags::Onlink);
        Some(route)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_ip_command())
    }
}

impl From<Scope> for u8 {
    fn from(scope: Scope) -> u8 {
        match scope {
            Scope::Universe => 0,
            Scope::Link => 253,
            Scope::Host => 254,
            Scope::Other(n) => n,
        }
    }
}

impl From<u8> for Scope {
    fn from(n: u8) -> Scope {
        match n {
            0 => Scope::Universe,
            253 => Scope::Link,
            254 => Scope::Host,
            n => Scope::Other(n),
        }
    }
}

impl From<RouteKind> for u8 {
    fn from(kind: RouteKind) -> u8 {
        match kind {
            RouteKind::Unicast => 1,
            RouteKind::Blackhole => 6,
            RouteKind::Other(n) => n,
        }
    }
}

impl From<u8> for RouteKind {
    fn from(n: u8) -> RouteKind {
        match n {
            1 => RouteKind::Unicast,
            6 => RouteKind::Blackhole,
            n => RouteKind::Other(n),
        }
    }
}

impl Netlink {
    /// Adds a route (`ip route add ROUTE`); an existing route with the same
    /// destination, table and metric gives [`Error::Exists`].
    pub fn add_route(&self, route: &Route) -> Result<()> {
        tracing::debug!(%route, netns = %self.netns.display(), "add route");
        let message = route.to_message()?;
        let request = self.handle.route().add(message).execute();
        self.block_on(request)
            .map_err(|e| Error::netlink(format!("add route \"{route}\""), e))
    }

    /// Adds a route or replaces the one with the same destination, table and
    /// metric (`ip route replace ROUTE`).
    pub fn replace_route(&self, route: &Route) -> Result<()> {
        tracing::debug!(%route, netns = %self.netns.display(), "replace route");
        let message = route.to_message()?;
        let request = self.handle.route().add(message).replace().execute();
        self.block_on(request)
            .map_err(|e| Error::netlink(format!("replace route \"{route}\""), e))
    }

    /// Deletes a route (`ip route del ROUTE`); the kernel matches the
    /// destination, table, type and, when given, device, gateway and
    /// protocol (0 matches any). Returns `false` when there was no such route.
    pub fn delete_route(&self, route: &Route) -> Result<bool> {
        tracing::debug!(%route, netns = %self.netns.display(), "delete route");
        let message = route.to_delete_message()?;
        let result = self.block_on(self.handle.route().del(message).execute());
        deleted(result, || format!("delete route \"{route}\""))
    }

    /// Lists the routes of the main table (`ip -4 route show` or `ip -6 route show`).
    pub fn routes(&self, family: Family) -> Result<Vec<Route>> {
        let mut routes = Vec::new();
        self.for_each_route(family, |r| routes.push(r))?;
        Ok(routes)
    }

    /// Calls `f` on each route of the main table as the dump arrives, so
    /// that a table of 100,000 routes is never held as netlink messages.
    pub fn for_each_route(&self, family: Family, mut f: impl FnMut(Route)) -> Result<()> {
        let query = match family {
            Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let dump = self.handle.route().get(query).execute();
        self.block_on(dump.try_for_each(|message| {
            if let Some(route) = Route::from_message(&message) {
                if route.table == RT_TABLE_MAIN {
                    f(route);
                }
            }
            futures::future::ready(Ok(()))
        }))
        .map_err(|e| Error::netlink(format!("list {family:?} routes"), e))
    }
}

fn max_prefix(family: Family) -> u8 {
    match family {
        Family::V4 => 32,
        Family::V6 => 128,
    }
}

fn unspecified(family: Family) -> IpNetwork {
    match family {
        Family::V4 => IpNetwork::V4(ipnetwork::Ipv4Network::from(Ipv4Addr::UNSPECIFIED)),
        Family::V6 => IpNetwork::V6(ipnetwork::Ipv6Network::from(Ipv6Addr::UNSPECIFIED)),
    }
}

fn route_address(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn pod_gateway() -> Route {
        Route::new(net("169.254.1.1/32"))
            .dev(3)
            .with_scope(Scope::Link)
    }

    fn pod_default() -> Route {
        Route::new(net("0.0.0.0/0"))
            .via("169.254.1.1".parse().unwrap())
            .dev(3)
    }

    #[test]
    fn routes_print_as_ip_route_does() {
        assert_eq!(
            pod_gateway().to_ip_command(),
            "169.254.1.1 dev #3 scope link"
        );
        assert_eq!(
            pod_default().to_ip_command(),
            "default via 169.254.1.1 dev #3"
        );
        let block = Route::blackhole(net("10.65.0.0/26")).with_protocol(80);
        assert_eq!(block.to_ip_command(), "blackhole 10.65.0.0/26 proto 80");
        let v6 = Route::new(net("::/0"))
            .via("fe80::ecee:eeff:feee:eeee".parse().unwrap())
            .dev(3)
            .in_table(100)
            .with_onlink();
        assert_eq!(
            v6.to_ip_command(),
            "default via fe80::ecee:eeff:feee:eeee dev #3 table 100 onlink"
        );
    }

    #[test]
    fn a_route_message_carries_every_field() {
        let msg = pod_default().with_protocol(80).to_message().unwrap();
        assert_eq!(msg.header.address_family, AddressFamily::Inet);
        assert_eq!(msg.header.destination_prefix_length, 0);
        assert_eq!(msg.header.table, 254);
        assert_eq!(u8::from(msg.header.protocol), 80);
        assert_eq!(msg.header.scope, RouteScope::Universe);
        assert_eq!(msg.header.kind, RouteType::Unicast);
        assert!(msg.attributes.contains(&RouteAttribute::Oif(3)));
        assert!(msg
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                169, 254, 1, 1
            )))));

        let msg = pod_gateway().to_message().unwrap();
        assert_eq!(msg.header.scope, RouteScope::Link);
        assert_eq!(msg.header.destination_prefix_length, 32);
    }

    #[test]
    fn a_delete_message_matches_any_scope() {
        let msg = pod_gateway().to_delete_message().unwrap();
        assert_eq!(msg.header.scope, RouteScope::NoWhere);
    }

    #[test]
    fn a_message_reads_back_as_the_same_route() {
        for route in [
            pod_gateway(),
            pod_default(),
            Route::blackhole(net("10.65.0.0/26")).with_protocol(80),
            Route::new(net("fd00::/64"))
                .via("fd00::1".parse().unwrap())
                .with_onlink(),
            Route::new(net("10.0.0.0/8")).dev(9).in_table(1000),
        ] {
            let msg = route.to_message().unwrap();
            assert_eq!(Route::from_message(&msg), Some(route));
        }
    }

    #[test]
    fn an_ipv6_route_cannot_use_an_ipv4_gateway() {
        let route = Route::new(net("::/0")).via("169.254.1.1".parse().unwrap());
        assert!(matches!(
            route.to_message(),
            Err(Error::InvalidRoute { .. })
        ));
    }
}
