//! Encapsulation: IPIP (`tunl0`) and VXLAN (`vxlan.tabby`) per pool, as
//! Calico's felix does it.
//!
//! - [`plan`]: pure, from the cluster view to the wanted routes, VTEPs and devices;
//! - [`tunnel`]: this node's tunnel addresses (IPAM handles) and VTEP MAC in its Node;
//! - [`device`]: the devices, neighbour and FDB entries through netlink.

pub mod plan;

pub use plan::{Encap, EncapPlan, Hop, Vtep};

/// The VXLAN device.
pub const VXLAN_DEVICE: &str = "vxlan.tabby";
/// The IPIP device (the `ipip` module's fallback device).
pub const IPIP_DEVICE: &str = "tunl0";
/// Calico's VNI.
pub const VXLAN_VNI: u32 = 4096;
/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
