//! `tabby-node`: one agent per node.
//!
//! - [`agent`]: the main loop that owns the node's state (diagram there).
//! - [`config`]: the agent's configuration file.
//! - [`register`]: registering the node, reading the cluster view.
//! - [`desired`]: pure computation of peers, originated prefixes and kernel routes.
//! - [`routes`]: the kernel side: applies route changes through rtnetlink.
//! - [`bgp`]: the BGP speaker (codec adapter, RFC 4271 FSM, sessions);
//!   [`speaker_control`] connects it to the agent.
//! - [`cluster_state`]: sources of Services and EndpointSlices (a watched YAML directory).
//! - [`proxy`]: the service proxy (kube-proxy's iptables behaviour);
//!   [`service_proxy`] starts it inside the agent.
//! - [`status`], [`health`], [`http`]: `tabbyctl node status`, health and metrics.

pub mod agent;
pub mod bgp;
pub mod cluster_state;
pub mod config;
pub mod desired;
pub mod error;
pub mod health;
pub mod http;
pub mod proxy;
pub mod register;
pub mod routes;
pub mod service_proxy;
pub mod speaker_control;
pub mod status;
