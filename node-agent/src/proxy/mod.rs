//! The service proxy: kube-proxy's iptables mode, embedded in `tabby-node`.
//!
//! - [`model`]: Services and EndpointSlices to service ports and endpoints (pure).
//! - [`names`]: chain names and kube-proxy's hash.
//! - [`rules`]: rule generation as data (pure); the per-service chains are built in `chains`.
//! - [`payload`]: full and partial `iptables-restore --noflush` payloads (pure).
//! - [`iptables`]: the executor: backends, jump rules, one restore per sync.
//! - [`conntrack`]: stale UDP flows of removed endpoints, and their deletion.
//! - [`proxier`]: the sync state machine (full then partial syncs, rate limits, metrics).
//! - [`healthcheck`]: the health-check node ports of `externalTrafficPolicy: Local` services.
//! - [`trace`]: a packet tracer over a generated payload, for tests and debugging.

mod chains;
pub mod conntrack;
pub mod error;
pub mod healthcheck;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod names;
pub mod payload;
pub mod proxier;
pub mod rules;
pub mod trace;

pub use error::{Error, Result};
pub use model::NodeFacts;
pub use proxier::ProxyEvent;
pub use rules::{generate, ProxyOptions, RuleSet};
