//! Encapsulation: IPIP (`tunl0`) and VXLAN (`vxlan.tabby`) per pool, as
//! Calico's felix does it.
//!
//! - [`plan`]: pure, from the cluster view to the wanted routes, VTEPs and devices;
//! - [`tunnel`]: this node's tunnel addresses (IPAM handles) and VTEP MAC in its Node;
//! - [`device`]: the devices, neighbour and FDB entries through netlink;
//! - [`sync`]: one pass of all of it, the MTU file, and what routes and status need.

pub mod device;
pub mod plan;
pub mod sync;
pub mod tunnel;

pub use plan::{Encap, EncapPlan, Hop, Vtep};
pub use sync::{EncapRoutes, EncapStatus, Encapsulation};

/// The VXLAN device.
pub const VXLAN_DEVICE: &str = "vxlan.tabby";
/// The IPIP device (the `ipip` module's fallback device).
pub const IPIP_DEVICE: &str = "tunl0";
/// Calico's VNI.
pub const VXLAN_VNI: u32 = 4096;
/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// Why a part of the encapsulation could not be set up (the rest of the
/// agent keeps going; the error shows in the log, status and readiness).
#[derive(Debug, thiserror::Error)]
pub enum EncapError {
    /// Allocating or releasing a tunnel address failed.
    #[error("{encap} tunnel address")]
    TunnelAddress {
        /// Which tunnel.
        encap: Encap,
        /// Why.
        #[source]
        source: tabby_ipam::IpamError,
    },
    /// Writing the tunnel facts into this node's document failed.
    #[error("publish the tunnel addresses in the node")]
    PublishNode(#[source] tabby_ipam::DatastoreError),
    /// A netlink call on a tunnel device failed.
    #[error("{what}")]
    Device {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: tabby_dataplane::Error,
    },
    /// The kernel has no IPIP (no `ipip` module, or none it can load).
    #[error("an IPIP pool needs tunl0, but this kernel has no ipip support (load the ipip module, or use VXLAN)")]
    IpipUnsupported {
        /// The kernel's answer.
        #[source]
        source: tabby_dataplane::Error,
    },
    /// VXLAN needs an IPv4 underlay address (`bgp_address`).
    #[error("a VXLAN pool needs an IPv4 bgp_address for the tunnel's local address")]
    Ipv6Underlay,
    /// A device disappeared right after it was set up.
    #[error("{device} vanished while being set up")]
    Vanished {
        /// The device.
        device: &'static str,
    },
    /// Writing the MTU file failed.
    #[error("write the MTU file {path}")]
    MtuFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
