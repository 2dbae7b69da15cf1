//! The snapshot the agent loop publishes for its readers: the status
//! socket, the health and metrics endpoint, and the service proxy's metrics.

use std::time::Instant;

use crate::routes::RouteStats;
use crate::status::NodeStatus;

/// What the status socket and health endpoint read.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    /// The `node status` answer.
    pub status: NodeStatus,
    /// The first reconcile completed.
    pub ready: bool,
    /// Kinds a cluster watch has not listed yet (why it is not ready).
    pub waiting_for: Vec<String>,
    /// When the loop last ran a reconcile.
    pub last_pass: Option<Instant>,
    /// Learned prefixes.
    pub learned: usize,
    /// Originated prefixes.
    pub originated: usize,
    /// Kernel route counters.
    pub routes: RouteStats,
    /// Why the encapsulation is not (fully) set up, if it is not: the
    /// agent is not ready then, though every other route is programmed.
    pub encap_errors: Vec<String>,
}
