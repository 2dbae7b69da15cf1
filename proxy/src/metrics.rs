//! The service proxy's metrics as prometheus-client types.
//!
//! Names follow kube-proxy's (`sync_proxy_rules_duration_seconds`, ...,
//! with its buckets) so dashboards carry over. The [`Proxier`] owns a
//! [`ProxyMetrics`] and updates it on every sync; the agent registers it
//! into its one [`Registry`] with [`ProxyMetrics::register`], under the
//! `tabby_proxy_` prefix and the label `mode` of the backend (`iptables`
//! or `nftables`, [`Mode`]). The common families (sync durations, syncs,
//! conntrack, service ports, endpoints) are the same in both modes; the
//! rule, chain and failure families are named after the mode
//! (`iptables_total_rules{table="nat"}`, `nftables_total_rules`), and
//! nftables mode adds `nftables_total_elements` (set and map elements).
//! The handles are shared: the proxy thread updates what `/metrics` encodes.
//!
//! [`Proxier`]: crate::proxier::Proxier

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backend::Mode;

/// The metrics' prefix (kube-proxy uses `kubeproxy`).
pub const PREFIX: &str = "tabby_proxy";

/// kube-proxy's sync latency buckets: 1 ms doubling 15 times (to ~16 s).
pub fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// `kind="full"` or `kind="partial"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SyncLabels {
    kind: &'static str,
}

/// `table="nat"` or `table="filter"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableLabels {
    table: &'static str,
}

const FULL: SyncLabels = SyncLabels { kind: "full" };
const PARTIAL: SyncLabels = SyncLabels { kind: "partial" };
const NAT: TableLabels = TableLabels { table: "nat" };
const FILTER: TableLabels = TableLabels { table: "filter" };

/// A gauge of seconds.
type Seconds = Gauge<f64, AtomicU64>;

/// The gauges of the nftables table (one table: no `table` label).
#[derive(Debug, Clone, Default)]
struct NftGauges {
    rules: Gauge,
    chains: Gauge,
    elements: Gauge,
    rules_written: Gauge,
}

/// Everything the proxy counts. Cloning shares the metrics.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    mode: Mode,
    sync_duration: Histogram,
    full_sync_duration: Histogram,
    partial_sync_duration: Histogram,
    syncs: Family<SyncLabels, Counter>,
    restore_failures: Counter,
    partial_restore_failures: Counter,
    conntrack_deletes: Counter,
    conntrack_failures: Counter,
    total_rules: Family<TableLabels, Gauge>,
    last_sync_rules: Family<TableLabels, Gauge>,
    total_chains: Family<TableLabels, Gauge>,
    nft: NftGauges,
    service_ports: Gauge,
    endpoints: Gauge,
    last_sync: Seconds,
    last_sync_duration: Seconds,
    last_payload_bytes: Gauge,
}

impl Default for ProxyMetrics {
    /// iptables mode's metrics.
    fn default() -> Self {
        Self::new(Mode::default())
    }
}

impl ProxyMetrics {
    /// The metrics of a backend in `mode` (the `mode` label), all at zero.
    pub fn new(mode: Mode) -> Self {
        let m = Self {
            mode,
            sync_duration: Histogram::new(sync_buckets()),
            full_sync_duration: Histogram::new(sync_buckets()),
            partial_sync_duration: Histogram::new(sync_buckets()),
            syncs: Family::default(),
            restore_failures: Counter::default(),
            partial_restore_failures: Counter::default(),
            conntrack_deletes: Counter::default(),
            conntrack_failures: Counter::default(),
            total_rules: Family::default(),
            last_sync_rules: Family::default(),
            total_chains: Family::default(),
            nft: NftGauges::default(),
            service_ports: Gauge::default(),
            endpoints: Gauge::default(),
            last_sync: Seconds::default(),
            last_sync_duration: Seconds::default(),
            last_payload_bytes: Gauge::default(),
        };
        // Every series exists from the start, at zero.
        for labels in [FULL, PARTIAL] {
            drop(m.syncs.get_or_create(&labels));
        }
        for labels in [NAT, FILTER] {
            drop(m.total_rules.get_or_create(&labels));
        }
        drop(m.last_sync_rules.get_or_create(&NAT));
        drop(m.total_chains.get_or_create(&NAT));
        m
    }
}

/// What one successful sync wrote, for [`ProxyMetrics::record_sync`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncRecord {
    /// A full sync (else partial).
    pub full: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// nat rules Tabby holds after it (nftables: rules of its table).
    pub nat_rules: usize,
    /// filter rules Tabby holds after it (iptables only).
    pub filter_rules: usize,
    /// nat rules the payload wrote (nftables: rules written).
    pub nat_rules_written: usize,
    /// nat chains Tabby holds after it (nftables: chains of its table).
    pub nat_chains: usize,
    /// Set and map elements of the nftables table (nftables only).
    pub elements: usize,
    /// Service ports programmed.
    pub service_ports: usize,
    /// Endpoints programmed.
    pub endpoints: usize,
    /// Bytes of the payload.
    pub payload_bytes: usize,
}

/// A count as a gauge value.
fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl ProxyMetrics {
    /// The backend's mode (the `mode` label).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Registers every metric into `registry` under [`PREFIX`], labelled
    /// `mode` (`iptables` or `nftables`), with the families of that mode.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry
            .sub_registry_with_prefix(PREFIX)
            .sub_registry_with_label((Cow::Borrowed("mode"), Cow::Borrowed(self.mode.as_str())));
        let m = self;
        r.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        r.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full_sync_duration.clone(),
        );
        r.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial_sync_duration.clone(),
        );
        r.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        r.register(
            "sync_proxy_rules_last_duration_seconds",
            "Duration of the last successful sync",
            m.last_sync_duration.clone(),
        );
        r.register("syncs", "Successful syncs by kind", m.syncs.clone());
        match m.mode {
            Mode::Iptables => Self::register_iptables(r, m),
            Mode::Nftables => Self::register_nftables(r, m),
        }
        Self::register_common(r, m);
    }

    fn register_iptables(r: &mut Registry, m: &Self) {
        r.register(
            "iptables_total_rules",
            "Number of iptables rules owned by the proxy",
            m.total_rules.clone(),
        );
        r.register(
            "iptables_last_sync_rules",
            "Number of iptables rules written by the last sync",
            m.last_sync_rules.clone(),
        );
        r.register(
            "iptables_total_chains",
            "Number of iptables chains owned by the proxy",
            m.total_chains.clone(),
        );
        r.register(
            "iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            m.restore_failures.clone(),
        );
        r.register(
            "iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            m.partial_restore_failures.clone(),
        );
    }

    fn register_nftables(r: &mut Registry, m: &Self) {
        r.register(
            "nftables_total_rules",
            "Number of rules in the proxy's nftables table",
            m.nft.rules.clone(),
        );
        r.register(
            "nftables_last_sync_rules",
            "Number of nftables rules written by the last sync",
            m.nft.rules_written.clone(),
        );
        r.register(
            "nftables_total_chains",
            "Number of chains in the proxy's nftables table",
            m.nft.chains.clone(),
        );
        r.register(
            "nftables_total_elements",
            "Number of set and map elements in the proxy's nftables table",
            m.nft.elements.clone(),
        );
        r.register(
            "nftables_transaction_failures",
            "Cumulative failed nft transactions",
            m.restore_failures.clone(),
        );
        r.register(
            "nftables_partial_transaction_failures",
            "Cumulative failed partial nft transactions",
            m.partial_restore_failures.clone(),
        );
    }

    fn register_common(r: &mut Registry, m: &Self) {
        r.register(
            "conntrack_deletes",
            "Conntrack deletions of stale UDP flows",
            m.conntrack_deletes.clone(),
        );
        r.register(
            "conntrack_delete_failures",
            "Failed conntrack deletions",
            m.conntrack_failures.clone(),
        );
        r.register(
            "service_ports",
            "Service ports programmed",
            m.service_ports.clone(),
        );
        r.register("endpoints", "Endpoints programmed", m.endpoints.clone());
        r.register(
            "last_payload_bytes",
            "Size of the last payload applied",
            m.last_payload_bytes.clone(),
        );
    }

    /// Records a successful sync.
    pub fn record_sync(&self, s: &SyncRecord) {
        let secs = s.elapsed.as_secs_f64();
        self.sync_duration.observe(secs);
        let (kind, histogram) = if s.full {
            (&FULL, &self.full_sync_duration)
        } else {
            (&PARTIAL, &self.partial_sync_duration)
        };
        histogram.observe(secs);
        self.syncs.get_or_create(kind).inc();
        match self.mode {
            Mode::Iptables => self.record_iptables(s),
            Mode::Nftables => self.record_nftables(s),
        }
        self.service_ports.set(gauge_value(s.service_ports));
        self.endpoints.set(gauge_value(s.endpoints));
        self.last_payload_bytes.set(gauge_value(s.payload_bytes));
        self.last_sync_duration.set(secs);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
    }

    fn record_iptables(&self, s: &SyncRecord) {
        self.total_rules
            .get_or_create(&NAT)
            .set(gauge_value(s.nat_rules));
        self.total_rules
            .get_or_create(&FILTER)
            .set(gauge_value(s.filter_rules));
        self.last_sync_rules
            .get_or_create(&NAT)
            .set(gauge_value(s.nat_rules_written));
        self.total_chains
            .get_or_create(&NAT)
            .set(gauge_value(s.nat_chains));
    }

    fn record_nftables(&self, s: &SyncRecord) {
        self.nft.rules.set(gauge_value(s.nat_rules));
        self.nft.rules_written.set(gauge_value(s.nat_rules_written));
        self.nft.chains.set(gauge_value(s.nat_chains));
        self.nft.elements.set(gauge_value(s.elements));
    }

    /// Records a failed apply (`iptables-restore`, nft transaction).
    pub fn record_restore_failure(&self, full: bool) {
        self.restore_failures.inc();
        if !full {
            self.partial_restore_failures.inc();
        }
    }

    /// Records one conntrack deletion and whether it worked.
    pub fn record_conntrack_delete(&self, ok: bool) {
        self.conntrack_deletes.inc();
        if !ok {
            self.conntrack_failures.inc();
        }
    }

    /// Successful full syncs.
    pub fn full_syncs(&self) -> u64 {
        self.syncs.get_or_create(&FULL).get()
    }

    /// Successful partial syncs.
    pub fn partial_syncs(&self) -> u64 {
        self.syncs.get_or_create(&PARTIAL).get()
    }

    /// Failed restores, full or partial.
    pub fn restore_failures(&self) -> u64 {
        self.restore_failures.get()
    }

    /// Failed partial restores.
    pub fn partial_restore_failures(&self) -> u64 {
        self.partial_restore_failures.get()
    }

    /// Conntrack deletions run.
    pub fn conntrack_deletes(&self) -> u64 {
        self.conntrack_deletes.get()
    }

    /// Failed conntrack deletions.
    pub fn conntrack_failures(&self) -> u64 {
        self.conntrack_failures.get()
    }

    /// nat rules Tabby holds (nftables: rules of its table).
    pub fn nat_rules(&self) -> i64 {
        match self.mode {
            Mode::Iptables => self.total_rules.get_or_create(&NAT).get(),
            Mode::Nftables => self.nft.rules.get(),
        }
    }

    /// nat chains Tabby holds (nftables: chains of its table).
    pub fn nat_chains(&self) -> i64 {
        match self.mode {
            Mode::Iptables => self.total_chains.get_or_create(&NAT).get(),
            Mode::Nftables => self.nft.chains.get(),
        }
    }

    /// Set and map elements of the nftables table (0 in iptables mode).
    pub fn elements(&self) -> i64 {
        self.nft.elements.get()
    }

    /// Endpoints programmed.
    pub fn endpoints(&self) -> i64 {
        self.endpoints.get()
    }
}

#[cfg(test)]
mod tests;
