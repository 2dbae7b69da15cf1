//! `tabby-node`: one agent per node.
//!
//! - [`agent`]: the main loop that owns the node's state (diagram there).
//! - [`config`]: the agent's configuration file.
//! - [`register`]: registering the node, reading the cluster view.
//! - [`cluster`]: where the cluster view comes from: the datastore polled, or Kubernetes watches.
//! - [`desired`]: pure computation of peers, originated prefixes and node facts.
//! - [`policy`]: pure import policy (BGPFilter rules, then Tabby's defaults).
//! - [`encap`]: IPIP and VXLAN per pool: the pure plan, tunnel addresses, devices.
//! - [`nat_outgoing`]: natOutgoing: felix's MASQUERADE rule over ipsets of pools and nodes.
//! - [`plan`]: pure plans from what the agent has to what it wants (peers, prefixes, routes).
//! - [`routes`]: the kernel side: applies route changes through rtnetlink.
//! - [`shared`]: the snapshot the loop publishes for status, health and metrics.
//! - [`speaker_control`]: connects the BGP speaker (crate `tabby-bgp`) to the agent.
//! - [`service_proxy`]: starts the service proxy (crate `tabby-proxy`) inside the agent.
//! - [`status`], [`health`]: `tabbyctl node status`, health and metrics (HTTP).
//! - [`install_cni`]: `tabby-node install-cni`: the plugin, its conflist and kubeconfig on the host.
//! - [`metrics`]: the one Prometheus registry: the agent's gauges and the proxy's metrics.

pub mod agent;
pub mod cluster;
pub mod config;
pub mod desired;
pub mod encap;
pub mod error;
pub mod health;
pub mod install_cni;
pub mod metrics;
pub mod nat_outgoing;
pub mod plan;
pub mod policy;
pub mod register;
pub mod routes;
pub mod service_proxy;
pub mod shared;
pub mod speaker_control;
pub mod status;

pub use error::error_chain;
