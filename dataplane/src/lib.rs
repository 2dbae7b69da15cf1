//! Linux side effects shared by Tabby's CNI plugin and node agent: netlink,
//! network namespaces and sysctls.
//!
//! - [`NetNs`]: open a network namespace and run code inside it;
//! - [`Netlink`]: a blocking rtnetlink socket bound to one namespace, for
//!   links, addresses and routes;
//! - [`route_sync`]: owning the routes of one protocol: changes and repair, pure;
//! - [`sysctl`]: read and write `/proc/sys` in the calling thread's namespace.
#![warn(missing_docs)]

pub mod error;
pub mod netlink;
pub mod netns;
pub mod route_sync;
pub mod sysctl;

pub use error::{Error, Result};
pub use netlink::{
    Deletion, Family, FdbEntry, Link, LinkWatch, Neighbour, Netlink, Route, RouteBatch, RouteKind,
    Scope, VxlanSpec, RTPROT_BOOT, RT_TABLE_MAIN,
};
pub use netns::NetNs;
