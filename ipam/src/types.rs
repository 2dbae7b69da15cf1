//! The documents IPAM stores, serialized as JSON with camelCase keys like
//! Calico's resources so that operators recognise them.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Encapsulation mode of a pool, as Calico's `ipipMode` / `vxlanMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum EncapMode {
    /// Never encapsulate.
    #[default]
    Never,
    /// Always encapsulate between nodes.
    Always,
    /// Encapsulate only between nodes on different subnets.
    CrossSubnet,
}

/// A cluster-wide address pool (`IPPool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpPool {
    /// Unique name, e.g. `default-ipv4-ippool`.
    pub name: String,
    /// The pool's CIDR.
    #[schemars(with = "String")]
    pub cidr: IpNetwork,
    /// Prefix length of the blocks carved from it (26 for IPv4, 122 for IPv6 by default).
    pub block_size: u8,
    /// IPIP encapsulation mode.
    #[serde(default)]
    pub ipip_mode: EncapMode,
    /// VXLAN encapsulation mode.
    #[serde(default)]
    pub vxlan_mode: EncapMode,
    /// Masquerade traffic from this pool leaving all pools.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// A disabled pool hands out no new addresses.
    #[serde(default)]
    pub disabled: bool,
    /// Label selector of the nodes that may use this pool (`all()` by default).
    #[serde(default = "default_selector")]
    pub node_selector: String,
}

fn default_selector() -> String {
    "all()".to_string()
}

impl IpPool {
    /// An enabled pool `name` on `cidr` for every node, with the family's
    /// default block size, no encapsulation and no NAT.
    pub fn new(name: impl Into<String>, cidr: IpNetwork) -> IpPool {
        IpPool {
            name: name.into(),
            cidr,
            block_size: default_block_size(&cidr),
            ipip_mode: EncapMode::Never,
            vxlan_mode: EncapMode::Never,
            nat_outgoing: false,
            disabled: false,
            node_selector: default_selector(),
        }
    }
}

/// The default block size for a pool of this address family.
pub fn default_block_size(cidr: &IpNetwork) -> u8 {
    match cidr {
        IpNetwork::V4(_) => 26,
        IpNetwork::V6(_) => 122,
    }
}

/// One allocation's attributes: who holds the address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AllocationAttribute {
    /// The handle that owns the address.
    pub handle_id: String,
    /// Free-form attributes (node, pod, namespace, containerID, netns, ifname, hostVeth).
    #[serde(default)]
    pub secondary: BTreeMap<String, String>,
}

/// A block: a `blockSize` CIDR of a pool with its allocation table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    /// The block's CIDR.
    #[schemars(with = "String")]
    pub cidr: IpNetwork,
    /// `host:<node>` when affine to a node, as Calico writes it.
    pub affinity: Option<String>,
    /// Whether the affinity is confirmed (a pending claim may still lose).
    #[serde(default)]
    pub strict_affinity: bool,
    /// Ordinal -> index into `attributes`, `None` when free.
    pub allocations: Vec<Option<usize>>,
    /// Free ordinals in the order they will be handed out.
    pub unallocated: Vec<usize>,
    /// Allocation attributes, shared by the ordinals of one handle.
    pub attributes: Vec<AllocationAttribute>,
    /// A block being released; assign skips it.
    #[serde(default)]
    pub deleted: bool,
}

/// State of a node's claim on a block (two-phase, like Calico's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    /// Claimed, but the block document may not be ours yet.
    Pending,
    /// The block document names this node: the claim won.
    Confirmed,
    /// Being released.
    PendingDeletion,
}

/// A node's claim on a block (`BlockAffinity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinity {
    /// The node name.
    pub node: String,
    /// The claimed block's CIDR.
    #[schemars(with = "String")]
    pub cidr: IpNetwork,
    /// The claim's state.
    pub state: AffinityState,
}

/// The owner of allocations: `<network>.<containerID>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Handle {
    /// The handle ID.
    pub handle_id: String,
    /// Block CIDR (as a string key) -> how many addresses this handle holds there.
    pub block: BTreeMap<String, u32>,
    /// The node whose IPAM wrote it (absent in documents of older releases):
    /// a handle the blocks no longer back is repaired by that node's GC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A node known to the datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// The node name.
    pub name: String,
    /// The node's BGP / underlay address, once the agent registered it.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// The node's AS number, once the agent registered it.
    #[serde(default)]
    pub asn: Option<u32>,
    /// Labels, for pool node selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The node's underlay address with its prefix (`10.98.0.1/24`), taken
    /// from the uplink by the agent: CrossSubnet compares these subnets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub ipv4_address: Option<IpNetwork>,
    /// The address of this node's `vxlan.tabby`, from a VXLAN pool.
    #[serde(
        default,
        rename = "ipv4VXLANTunnelAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_vxlan_tunnel_addr: Option<std::net::Ipv4Addr>,
    /// The MAC of this node's `vxlan.tabby` (`66:xx:...`).
    #[serde(
        default,
        rename = "vxlanTunnelMACAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub vxlan_tunnel_mac_addr: Option<String>,
    /// The address of this node's `tunl0`, from an IPIP pool.
    #[serde(
        default,
        rename = "ipv4IPIPTunnelAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_ipip_tunnel_addr: Option<std::net::Ipv4Addr>,
}

/// Cluster-wide IPAM settings (`config/ipam`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct IpamConfig {
    /// Never borrow from another node's block.
    #[serde(default)]
    pub strict_affinity: bool,
    /// Blocks one node may claim at most (0: no limit).
    #[serde(default)]
    pub max_blocks_per_host: u32,
}
