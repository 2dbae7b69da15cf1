//! The metrics as a scraper reads them: the registry encoded as text.

use super::*;
use prometheus_client::encoding::text::encode;

fn exposition(m: &ProxyMetrics) -> String {
    let mut registry = Registry::default();
    m.register(&mut registry);
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    text
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
fn kube_proxy_buckets_double_from_one_millisecond() {
    let b: Vec<f64> = sync_buckets().collect();
    assert_eq!(b.len(), 15);
    assert_eq!(b[0], 0.001);
    assert_eq!(b[14], 16.384);
}

fn sync(full: bool, ms: u64) -> SyncRecord {
    SyncRecord {
        full,
        elapsed: Duration::from_millis(ms),
        ..SyncRecord::default()
    }
}

#[test]
fn histograms_encode_cumulative_buckets_sum_and_count() {
    let m = ProxyMetrics::default();
    m.record_sync(&sync(true, 3));
    m.record_sync(&sync(false, 500));
    let text = exposition(&m);
    let name = "tabby_proxy_sync_proxy_rules_duration_seconds";
    assert!(
        has_line(&text, &format!("# TYPE {name} histogram")),
        "{text}"
    );
    for (le, n) in [
        ("0.001", 0),
        ("0.002", 0),
        ("0.004", 1),
        ("0.512", 2),
        ("16.384", 2),
        ("+Inf", 2),
    ] {
        let line = format!("{name}_bucket{{mode=\"iptables\",le=\"{le}\"}} {n}");
        assert!(has_line(&text, &line), "{line} in {text}");
    }
    assert!(
        has_line(&text, &format!("{name}_sum{{mode=\"iptables\"}} 0.503")),
        "{text}"
    );
    assert!(
        has_line(&text, &format!("{name}_count{{mode=\"iptables\"}} 2")),
        "{text}"
    );
    for (kind, n) in [("full", 1), ("partial", 1)] {
        let line = format!(
            "tabby_proxy_sync_{kind}_proxy_rules_duration_seconds_count{{mode=\"iptables\"}} {n}"
        );
        assert!(has_line(&text, &line), "{line} in {text}");
    }
}

#[test]
fn gauges_and_counters_carry_kube_proxy_names_and_table_labels() {
    let m = ProxyMetrics::default();
    m.record_sync(&sync(false, 1));
    m.record_sync(&SyncRecord {
        full: true,
        nat_rules: 120,
        filter_rules: 4,
        nat_rules_written: 17,
        ..SyncRecord::default()
    });
    m.record_restore_failure(true);
    m.record_restore_failure(false);
    m.record_conntrack_delete(false);
    assert_eq!((m.full_syncs(), m.partial_syncs()), (1, 1));
    assert_eq!((m.restore_failures(), m.partial_restore_failures()), (2, 1));
    assert_eq!((m.conntrack_deletes(), m.conntrack_failures()), (1, 1));
    let text = exposition(&m);
    for line in [
        "# TYPE tabby_proxy_sync_proxy_rules_last_timestamp_seconds gauge",
        "tabby_proxy_iptables_total_rules{mode=\"iptables\",table=\"nat\"} 120",
        "tabby_proxy_iptables_total_rules{mode=\"iptables\",table=\"filter\"} 4",
        "tabby_proxy_iptables_last_sync_rules{mode=\"iptables\",table=\"nat\"} 17",
        "# TYPE tabby_proxy_iptables_restore_failures counter",
        "tabby_proxy_iptables_restore_failures_total{mode=\"iptables\"} 2",
        "tabby_proxy_iptables_partial_restore_failures_total{mode=\"iptables\"} 1",
        "tabby_proxy_conntrack_delete_failures_total{mode=\"iptables\"} 1",
        "tabby_proxy_syncs_total{mode=\"iptables\",kind=\"full\"} 1",
        "tabby_proxy_syncs_total{mode=\"iptables\",kind=\"partial\"} 1",
    ] {
        assert!(has_line(&text, line), "{line} in {text}");
    }
    // Each sync sets the gauges anew.
    assert_eq!(m.nat_rules(), 120);
    m.record_sync(&sync(false, 1));
    assert_eq!(m.nat_rules(), 0);
}

#[test]
fn a_proxy_that_never_synced_reports_timestamp_zero_and_zero_series() {
    let text = exposition(&ProxyMetrics::default());
    for line in [
        "tabby_proxy_sync_proxy_rules_last_timestamp_seconds{mode=\"iptables\"} 0.0",
        "tabby_proxy_syncs_total{mode=\"iptables\",kind=\"full\"} 0",
        "tabby_proxy_syncs_total{mode=\"iptables\",kind=\"partial\"} 0",
    ] {
        assert!(has_line(&text, line), "{line} in {text}");
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn the_last_sync_timestamp_is_the_wall_clock() {
    let m = ProxyMetrics::default();
    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    m.record_sync(&sync(true, 1));
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let t = m.last_sync.get();
    assert!(
        (before.as_secs_f64()..=after.as_secs_f64()).contains(&t),
        "{t}"
    );
}

#[test]
fn nftables_mode_labels_every_sample_and_counts_elements() {
    let m = ProxyMetrics::new(Mode::Nftables);
    assert_eq!(m.mode(), Mode::Nftables);
    m.record_sync(&SyncRecord {
        full: true,
        nat_rules: 40,
        nat_rules_written: 40,
        nat_chains: 9,
        elements: 12,
        ..SyncRecord::default()
    });
    m.record_restore_failure(false);
    assert_eq!((m.nat_rules(), m.nat_chains(), m.elements()), (40, 9, 12));
    let text = exposition(&m);
    for line in [
        "tabby_proxy_nftables_total_rules{mode=\"nftables\"} 40",
        "tabby_proxy_nftables_last_sync_rules{mode=\"nftables\"} 40",
        "tabby_proxy_nftables_total_chains{mode=\"nftables\"} 9",
        "tabby_proxy_nftables_total_elements{mode=\"nftables\"} 12",
        "tabby_proxy_nftables_transaction_failures_total{mode=\"nftables\"} 1",
        "tabby_proxy_nftables_partial_transaction_failures_total{mode=\"nftables\"} 1",
        "tabby_proxy_syncs_total{mode=\"nftables\",kind=\"full\"} 1",
    ] {
        assert!(has_line(&text, line), "{line} in {text}");
    }
    assert!(!text.contains("iptables"), "{text}");
    assert!(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .all(|l| l.contains("mode=\"nftables\"")));
}
