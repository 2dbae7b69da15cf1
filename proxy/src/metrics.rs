//! Metrics of the service proxy as plain data; the agent exposes them.
//!
//! Names follow kube-proxy's (`sync_proxy_rules_duration_seconds`, ...)
//! so dashboards carry over; [`render_prometheus`] writes them in the
//! Prometheus text format under a `tabby_proxy_` prefix, for the agent's
//! `/metrics` endpoint.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The metrics' prefix (kube-proxy uses `kubeproxy_`).
const PREFIX: &str = "tabby_proxy_";

/// The metrics in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(m: &ProxyMetrics) -> String {
    let mut out = String::new();
    let w = &mut out;
    histogram(
        w,
        "sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds",
        &m.sync_duration,
    );
    histogram(
        w,
        "sync_full_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds for full resyncs",
        &m.full_sync_duration,
    );
    histogram(
        w,
        "sync_partial_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds for partial resyncs",
        &m.partial_sync_duration,
    );
    let last = m
        .last_sync
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    gauge(
        w,
        "sync_proxy_rules_last_timestamp_seconds",
        "The last time proxy rules were successfully synced",
        &[("", last)],
    );
    gauge(
        w,
        "sync_proxy_rules_last_duration_seconds",
        "Duration of the last successful sync",
        &[("", m.last_sync_duration.as_secs_f64())],
    );
    counter(
        w,
        "syncs_total",
        "Successful syncs by mode",
        &[
            ("mode=\"full\"", m.full_syncs),
            ("mode=\"partial\"", m.partial_syncs),
        ],
    );
    gauge(
        w,
        "iptables_total_rules",
        "Number of iptables rules owned by the proxy",
        &[
            ("table=\"nat\"", count(m.nat_rules)),
            ("table=\"filter\"", count(m.filter_rules)),
        ],
    );
    gauge(
        w,
        "iptables_last_sync_rules",
        "Number of iptables rules written by the last sync",
        &[("table=\"nat\"", count(m.nat_rules_last_sync))],
    );
    gauge(
        w,
        "iptables_total_chains",
        "Number of iptables chains owned by the proxy",
        &[("table=\"nat\"", count(m.nat_chains))],
    );
    counter(
        w,
        "iptables_restore_failures_total",
        "Cumulative proxy iptables restore failures",
        &[("", m.restore_failures)],
    );
    counter(
        w,
        "iptables_partial_restore_failures_total",
        "Cumulative proxy iptables partial restore failures",
        &[("", m.partial_restore_failures)],
    );
    counter(
        w,
        "conntrack_deletes_total",
        "Conntrack deletions of stale UDP flows",
        &[("", m.conntrack_deletes)],
    );
    counter(
        w,
        "conntrack_delete_failures_total",
        "Failed conntrack deletions",
        &[("", m.conntrack_failures)],
    );
    gauge(
        w,
        "service_ports",
        "Service ports programmed",
        &[("", count(m.service_ports))],
    );
    gauge(
        w,
        "endpoints",
        "Endpoints programmed",
        &[("", count(m.endpoints))],
    );
    gauge(
        w,
        "last_payload_bytes",
        "Size of the last iptables-restore payload",
        &[("", count(m.last_payload_bytes))],
    );
    out
}

/// A count as a sample value (exact up to 2^53).
#[allow(clippy::cast_precision_loss)]
fn count(n: usize) -> f64 {
    n as f64
}

fn header(w: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(w, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(w, "# TYPE {PREFIX}{name} {kind}");
}

fn samples<T: std::fmt::Display>(w: &mut String, name: &str, values: &[(&str, T)]) {
    for (labels, v) in values {
        if labels.is_empty() {
            let _ = writeln!(w, "{PREFIX}{name} {v}");
        } else {
            let _ = writeln!(w, "{PREFIX}{name}{{{labels}}} {v}");
        }
    }
}

fn gauge(w: &mut String, name: &str, help: &str, values: &[(&str, f64)]) {
    header(w, name, help, "gauge");
    samples(w, name, values);
}

fn counter(w: &mut String, name: &str, help: &str, values: &[(&str, u64)]) {
    header(w, name, help, "counter");
    samples(w, name, values);
}

fn histogram(w: &mut String, name: &str, help: &str, h: &Histogram) {
    header(w, name, help, "histogram");
    for (bound, c) in h.bounds.iter().zip(&h.counts) {
        let _ = writeln!(w, "{PREFIX}{name}_bucket{{le=\"{bound}\"}} {c}");
    }
    let _ = writeln!(w, "{PREFIX}{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(w, "{PREFIX}{name}_sum {}", h.sum);
    let _ = writeln!(w, "{PREFIX}{name}_count {}", h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_buckets_double_from_one_millisecond() {
        let b = sync_buckets();
        assert_eq!(b.len(), 15);
        assert_eq!(b[0], 0.001);
        assert_eq!(b[14], 16.384);
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let mut m = ProxyMetrics::default();
        m.sync_duration.observe(Duration::from_millis(3));
        m.sync_duration.observe(Duration::from_millis(500));
        let text = render_prometheus(&m);
        let name = "tabby_proxy_sync_proxy_rules_duration_seconds";
        assert!(
            text.contains(&format!("# TYPE {name} histogram\n")),
            "{text}"
        );
        for line in [
            "_bucket{le=\"0.001\"} 0",
            "_bucket{le=\"0.002\"} 0",
            "_bucket{le=\"0.004\"} 1",
            "_bucket{le=\"0.512\"} 2",
            "_bucket{le=\"16.384\"} 2",
            "_bucket{le=\"+Inf\"} 2",
            "_sum 0.503",
            "_count 2",
        ] {
            assert!(
                text.contains(&format!("\n{name}{line}\n")),
                "{line} in {text}"
            );
        }
        assert!(text.contains("\ntabby_proxy_sync_full_proxy_rules_duration_seconds_count 0\n"));
        assert!(text.contains("\ntabby_proxy_sync_partial_proxy_rules_duration_seconds_count 0\n"));
    }

    #[test]
    fn gauges_and_counters_carry_kube_proxy_names_and_table_labels() {
        let m = ProxyMetrics {
            nat_rules: 120,
            filter_rules: 4,
            nat_rules_last_sync: 17,
            restore_failures: 2,
            partial_restore_failures: 1,
            full_syncs: 3,
            partial_syncs: 9,
            last_sync: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500)),
            ..ProxyMetrics::default()
        };
        let text = render_prometheus(&m);
        for line in [
            "# TYPE tabby_proxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "tabby_proxy_sync_proxy_rules_last_timestamp_seconds 1700000000.5",
            "tabby_proxy_iptables_total_rules{table=\"nat\"} 120",
            "tabby_proxy_iptables_total_rules{table=\"filter\"} 4",
            "tabby_proxy_iptables_last_sync_rules{table=\"nat\"} 17",
            "# TYPE tabby_proxy_iptables_restore_failures_total counter",
            "tabby_proxy_iptables_restore_failures_total 2",
            "tabby_proxy_iptables_partial_restore_failures_total 1",
            "tabby_proxy_syncs_total{mode=\"full\"} 3",
            "tabby_proxy_syncs_total{mode=\"partial\"} 9",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        // Every sample line belongs to a declared metric family.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let family = l.split(['{', ' ']).next().unwrap_or("");
            let base = family
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{l}");
        }
    }

    #[test]
    fn a_proxy_that_never_synced_reports_timestamp_zero() {
        let text = render_prometheus(&ProxyMetrics::default());
        assert!(text
            .lines()
            .any(|l| l == "tabby_proxy_sync_proxy_rules_last_timestamp_seconds 0"));
    }
}
