//! `tabby-node`: one agent per node.
//!
//! - [`config`]: the agent's configuration file and flags.
//! - [`desired`]: pure computation of peers, originated prefixes and kernel routes.
//! - [`routes`]: the kernel side: applies route changes through rtnetlink.
//! - [`bgp`]: the BGP speaker (codec adapter, RFC 4271 FSM, sessions).
//! - [`proxy`]: the service proxy (kube-proxy's iptables behaviour).

pub mod bgp;
pub mod desired;
pub mod proxy;
