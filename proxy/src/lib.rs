//! `tabby-proxy`: the service proxy embedded in `tabby-node` (kube-proxy's
//! iptables and nftables modes), and the sources of the cluster state it consumes.
//!
//! - [`cluster_state`]: sources of Services and EndpointSlices (a watched YAML directory).
//! - [`yaml`]: multi-document YAML, and the Services and EndpointSlices in it (also for ctl and the lab).
//!
//! - [`model`]: Services and EndpointSlices to service ports and endpoints (pure).
//! - [`names`]: chain names and kube-proxy's hash.
//! - [`rules`]: rule generation as data (pure); the per-service chains are built in `chains`.
//! - [`payload`]: full and partial `iptables-restore --noflush` payloads (pure).
//! - [`iptables`]: the executor: backends, jump rules, one restore per sync.
//! - [`backend`]: the seam every mode implements (plan → payload → apply).
//! - [`nftables`]: nftables mode: one `ip tabby-proxy` table, planned as data, one `nft -f` per sync.
//! - [`conntrack`]: stale UDP flows of removed endpoints, and their deletion.
//! - [`proxier`]: the sync state machine (full then partial syncs, rate limits, metrics).
//! - [`healthcheck`]: the health-check node ports of `externalTrafficPolicy: Local` services.
//! - [`metrics`]: the proxy's prometheus-client metrics, registered into the agent's registry.
//! - [`http_server`]: hyper's HTTP/1 server for axum routers (health checks, the agent's endpoints).

pub mod backend;
mod chains;
pub mod cluster_state;
pub mod conntrack;
pub mod error;
pub mod healthcheck;
pub mod http_server;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod names;
pub mod nftables;
pub mod payload;
pub mod proxier;
pub mod rules;
pub mod yaml;

pub use backend::{Backend, Mode};
pub use error::{Error, Result};
pub use model::NodeFacts;
pub use proxier::ProxyEvent;
pub use rules::{generate, ProxyOptions, RuleSet};
