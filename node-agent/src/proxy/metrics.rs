//! Metrics of the service proxy as plain data; the agent exposes them.
//!
//! Names follow kube-proxy's (`sync_proxy_rules_duration_seconds`, ...)
//! so dashboards carry over; rendering is left to the metrics endpoint.

use std::time::{Duration, SystemTime};

/// kube-proxy's sync latency buckets: 1 ms doubling 15 times (to ~16 s).
pub fn sync_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// A cumulative histogram in the Prometheus sense.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, in seconds.
    pub bounds: Vec<f64>,
    /// Observations at or below each bound (cumulative).
    pub counts: Vec<u64>,
    /// Sum of all observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len();
        Self {
            bounds,
            counts: vec![0; n],
            sum: 0.0,
            count: 0,
        }
    }

    /// Record one duration.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if s <= *b {
                *c += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(sync_buckets())
    }
}

/// Everything the proxy counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyMetrics {
    /// `sync_proxy_rules_duration_seconds`: every sync.
    pub sync_duration: Histogram,
    /// `sync_full_proxy_rules_duration_seconds`.
    pub full_sync_duration: Histogram,
    /// `sync_partial_proxy_rules_duration_seconds`.
    pub partial_sync_duration: Histogram,
    /// Successful full syncs.
    pub full_syncs: u64,
    /// Successful partial syncs.
    pub partial_syncs: u64,
    /// `iptables_restore_failures_total`.
    pub restore_failures: u64,
    /// `iptables_partial_restore_failures_total`.
    pub partial_restore_failures: u64,
    /// Failed conntrack deletions.
    pub conntrack_failures: u64,
    /// Conntrack deletions run.
    pub conntrack_deletes: u64,
    /// `iptables_total_rules{table="nat"}`: rules Tabby holds in nat.
    pub nat_rules: usize,
    /// `iptables_total_rules{table="filter"}`.
    pub filter_rules: usize,
    /// `iptables_last_sync_rules{table="nat"}`: nat rules written by the last sync.
    pub nat_rules_last_sync: usize,
    /// nat chains Tabby holds.
    pub nat_chains: usize,
    /// Service ports programmed.
    pub service_ports: usize,
    /// Endpoints programmed.
    pub endpoints: usize,
    /// `sync_proxy_rules_last_timestamp_seconds`.
    pub last_sync: Option<SystemTime>,
    /// Duration of the last sync.
    pub last_sync_duration: Duration,
    /// Bytes of the last payload.
    pub last_payload_bytes: usize,
}
