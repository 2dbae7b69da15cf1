//! The agent's one Prometheus registry: its own gauges, read from the
//! shared snapshot at each scrape, and the service proxy's metrics
//! (registered by `service_proxy::start`). `/metrics` encodes it.
//!
//! ```text
//!  Registry ─┬─ AgentCollector ──reads──▶ Arc<Mutex<Shared>>   tabby_bgp_*, tabby_route*
//!            └─ tabby_proxy_* {mode="iptables"} ◀──updates── proxy thread
//! ```

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::agent::Shared;

/// The agent's numbers at one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Snapshot {
    peers_established: u64,
    peers_other: u64,
    learned: u64,
    originated: u64,
    routes_installed: u64,
    route_errors: u64,
}

impl Snapshot {
    fn of(s: &Shared) -> Self {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let up = s.status.peers.iter().filter(|p| p.state == "up").count();
        Self {
            peers_established: count(up),
            peers_other: count(s.status.peers.len() - up),
            learned: count(s.learned),
            originated: count(s.originated),
            routes_installed: s.routes.installed,
            route_errors: s.routes.errors,
        }
    }
}

/// Encodes the agent's gauges from [`Shared`] when scraped.
#[derive(Debug)]
struct AgentCollector {
    shared: Arc<Mutex<Shared>>,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Copy the numbers out: the lock is not held while encoding.
        let s = self
            .shared
            .lock()
            .map(|s| Snapshot::of(&s))
            .unwrap_or_default();
        let mut peers = encoder.encode_descriptor(
            "tabby_bgp_peers",
            "BGP peers by session state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [
            ("established", s.peers_established),
            ("other", s.peers_other),
        ] {
            let labels = [("state", state)];
            let metric = peers.encode_family(&labels)?;
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(metric)?;
        }
        let e = &mut encoder;
        gauge(
            e,
            "tabby_bgp_routes_learned",
            "Prefixes learned from peers.",
            s.learned,
        )?;
        gauge(
            e,
            "tabby_bgp_prefixes_originated",
            "Prefixes this node advertises.",
            s.originated,
        )?;
        gauge(
            e,
            "tabby_routes_installed",
            "Kernel routes owned by tabby-node.",
            s.routes_installed,
        )?;
        let errors = e.encode_descriptor(
            "tabby_route_errors",
            "Failed route changes.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.route_errors).encode(errors)
    }
}

/// A registry holding the agent's own metrics, read from `shared`; the
/// service proxy adds its own before it is shared with `/metrics`.
pub fn registry(shared: Arc<Mutex<Shared>>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector { shared }));
    registry
}
