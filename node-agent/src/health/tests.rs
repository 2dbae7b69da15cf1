//! The endpoints over real HTTP, and `/metrics` read as a scraper would.

use std::collections::BTreeMap;
use std::time::Instant;

use super::*;
use crate::status::PeerRow;
use tabby_proxy::metrics::{ProxyMetrics, SyncRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `router` on a loopback port; returns its address.
async fn start(shared: Arc<Mutex<Shared>>, registry: Registry) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        shared,
        Arc::new(registry),
        Duration::from_millis(100),
    ));
    addr
}

/// One request; the status code, the head and the body.
async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a whole response");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, head.to_string(), body.to_string())
}

fn peer(state: &str) -> PeerRow {
    PeerRow {
        peer_address: "10.0.0.2".into(),
        peer_type: "node-to-node mesh".into(),
        state: state.into(),
        since: String::new(),
        info: String::new(),
    }
}

#[tokio::test]
async fn health_and_readiness_follow_the_agent_loop() {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let addr = start(
        Arc::clone(&shared),
        crate::metrics::registry(Arc::clone(&shared)),
    )
    .await;
    assert_eq!(request(addr, "GET", "/healthz").await.2, "starting\n");
    assert_eq!(request(addr, "GET", "/readyz").await.0, 503);
    {
        let mut s = shared.lock().unwrap();
        s.last_pass = Some(Instant::now());
        s.waiting_for = vec!["Node".into(), "IPAMBlock".into()];
    }
    assert_eq!(
        request(addr, "GET", "/healthz").await.0,
        200,
        "alive while listing"
    );
    let (status, _, body) = request(addr, "GET", "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "not ready: waiting for the first list of Node, IPAMBlock\n"
        )
    );
    {
        let mut s = shared.lock().unwrap();
        s.waiting_for.clear();
        s.ready = true;
    }
    for path in ["/healthz", "/livez"] {
        assert_eq!(request(addr, "GET", path).await.0, 200, "{path}");
    }
    assert_eq!(request(addr, "GET", "/readyz").await.2, "ready\n");
    assert_eq!(request(addr, "GET", "/nope").await.0, 404);
    assert_eq!(request(addr, "POST", "/healthz").await.0, 405);
    shared.lock().unwrap().last_pass = Some(Instant::now() - Duration::from_secs(2));
    let (status, _, body) = request(addr, "GET", "/healthz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("the agent loop last ran"), "{body}");
}

/// One metric family of an exposition.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: usize,
    types: usize,
    /// Sample name with its labels -> value.
    samples: BTreeMap<String, f64>,
}

/// The sample names a family of `kind` may use.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_sum", "_count", "_created"],
        _ => &[""],
    }
}

/// Parses an OpenMetrics text exposition, checking its structure: every
/// family declared once by HELP and TYPE before its samples, every sample
/// in the family declared last, with a name its type allows, well-formed
/// labels and a number; `# EOF` last.
fn parse(text: &str) -> BTreeMap<String, Family> {
    let body = text.strip_suffix("# EOF\n").expect("ends with # EOF");
    assert!(!body.contains("# EOF"), "one # EOF only");
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current = String::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            assert!(!families.contains_key(name), "{name} declared twice");
            current = name.to_string();
            families.entry(current.clone()).or_default().help += 1;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert_eq!(name, current, "TYPE right after its HELP");
            let f = families.get_mut(name).unwrap();
            f.types += 1;
            f.kind = kind.to_string();
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            let (series, value) = line.rsplit_once(' ').expect("a sample and its value");
            let name = series.split('{').next().unwrap();
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
                    for pair in inner.expect("labels in braces").split(',') {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        assert!(
                            !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                            "{line}"
                        );
                    }
                }
            }
            let f = families.get_mut(&current).expect("a sample after a TYPE");
            let allowed = suffixes(&f.kind)
                .iter()
                .any(|s| name == format!("{current}{s}"));
            assert!(allowed, "{name} is not a sample of {} {current}", f.kind);
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            f.samples.insert(series.to_string(), v);
        }
    }
    for (name, f) in &families {
        assert_eq!((f.help, f.types), (1, 1), "{name}");
        assert!(!f.samples.is_empty(), "{name} has no sample");
    }
    families
}

#[tokio::test]
async fn metrics_is_one_exposition_with_the_agents_and_the_proxys_families() {
    let shared = Arc::new(Mutex::new(Shared::default()));
    {
        let mut s = shared.lock().unwrap();
        s.status.peers = vec![peer("up"), peer("start"), peer("up")];
        s.learned = 7;
        s.originated = 1;
        s.routes.installed = 8;
        s.routes.errors = 2;
    }
    let mut registry = crate::metrics::registry(Arc::clone(&shared));
    let proxy = ProxyMetrics::default();
    proxy.register(&mut registry);
    proxy.record_sync(&SyncRecord {
        full: true,
        elapsed: Duration::from_millis(3),
        nat_rules: 42,
        ..SyncRecord::default()
    });
    let addr = start(Arc::clone(&shared), registry).await;
    let (status, head, text) = request(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.contains(&format!("\r\nContent-Type: {OPENMETRICS}")),
        "{head}"
    );
    let families = parse(&text);
    let sample = |family: &str, series: &str| {
        families
            .get(family)
            .and_then(|f| f.samples.get(series))
            .copied()
    };
    assert_eq!(
        sample("tabby_bgp_peers", "tabby_bgp_peers{state=\"established\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample("tabby_bgp_peers", "tabby_bgp_peers{state=\"other\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample("tabby_bgp_routes_learned", "tabby_bgp_routes_learned"),
        Some(7.0)
    );
    assert_eq!(
        sample(
            "tabby_bgp_prefixes_originated",
            "tabby_bgp_prefixes_originated"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample("tabby_routes_installed", "tabby_routes_installed"),
        Some(8.0)
    );
    assert_eq!(
        sample("tabby_route_errors", "tabby_route_errors_total"),
        Some(2.0)
    );
    let syncs = "tabby_proxy_syncs_total{mode=\"iptables\",kind=\"full\"}";
    assert_eq!(sample("tabby_proxy_syncs", syncs), Some(1.0));
    let rules = "tabby_proxy_iptables_total_rules{mode=\"iptables\",table=\"nat\"}";
    assert_eq!(
        sample("tabby_proxy_iptables_total_rules", rules),
        Some(42.0)
    );
    let h = &families["tabby_proxy_sync_proxy_rules_duration_seconds"];
    assert_eq!(h.kind, "histogram");
    assert_eq!(
        h.samples.len(),
        15 + 1 + 2,
        "15 buckets, +Inf, sum and count"
    );
    assert_eq!(families["tabby_route_errors"].kind, "counter");
    // The agent's numbers are read at each scrape.
    shared.lock().unwrap().routes.errors = 5;
    let again = parse(&request(addr, "GET", "/metrics").await.2);
    assert_eq!(
        again["tabby_route_errors"].samples["tabby_route_errors_total"],
        5.0
    );
}
