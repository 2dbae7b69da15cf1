//! proxy-sync: the service proxy's sync time against raw `iptables-restore`.
//!
//! For each backend (legacy, nft) and size (1k, 5k, 10k services × 10
//! endpoints), in fresh network namespaces (needs root):
//! - full sync: Tabby's first sync (generation, `iptables-save`, one restore)
//!   against `iptables-restore --noflush` of the same payload into another
//!   fresh namespace (the baseline), and their ratio (target ≤ 1.5);
//! - single change: one endpoint of one service replaced, as a partial sync
//!   (median of 5), against a raw restore of the same partial payload
//!   (target ≤ 20 ms at 10k services on legacy);
//! - rule and chain counts, payload size, and the process's peak RSS.
//!
//! Usage: `proxy-sync [SIZES...] [--backend legacy|nft]`, e.g. `proxy-sync 1000 10000`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tabby_proxy::conntrack::NoConntrack;
use tabby_proxy::iptables::{Backend, Iptables};
use tabby_proxy::proxier::{Proxier, ProxyEvent, SyncConfig};
use tabby_proxy::{NodeFacts, ProxyOptions};
use tabby_testkit::Netns;

const ENDPOINTS: usize = 10;

fn meta(name: &str, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("bench".into()),
        labels,
        ..Default::default()
    }
}

fn service(i: usize) -> Service {
    Service {
        metadata: meta(&format!("svc-{i}"), None),
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: usize, generation: usize) -> EndpointSlice {
    let labels = BTreeMap::from([("kubernetes.io/service-name".to_string(), format!("svc-{i}"))]);
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|e| {
            let n = i * ENDPOINTS + e + generation * 7;
            Endpoint {
                addresses: vec![format!(
                    "10.{}.{}.{}",
                    128 + n / 62_500 % 64,
                    n / 250 % 250,
                    n % 250 + 1
                )],
                node_name: Some(format!("node-{}", e % 3)),
                ..Default::default()
            }
        })
        .collect();
    EndpointSlice {
        metadata: meta(&format!("svc-{i}-1"), Some(labels)),
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// Time `iptables-restore --noflush` of `payload` in `ns`, exactly as the executor runs it.
fn raw_restore(backend: Backend, ns: &Netns, payload: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(backend.restore_program())
        .args(["--noflush", "--wait=5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(payload.as_bytes())?;
    let out = child.wait_with_output()?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!(
            "raw restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(backend: Backend, n: usize) -> Result<()> {
    let node = NodeFacts {
        name: "node-0".into(),
        node_ips: vec!["192.168.1.10".parse()?],
        cluster_cidr: Some("10.128.0.0/10".parse()?),
        pod_cidrs: vec![],
    };
    let tabby_ns = Netns::new("tbsy");
    let raw_ns = Netns::new("tbsy");
    let ipt = Iptables::new(backend).in_netns(tabby_ns.path());
    let mut p = Proxier::new(
        node,
        ProxyOptions::default(),
        SyncConfig::default(),
        ipt,
        NoConntrack::default(),
    );
    for i in 0..n {
        p.apply_event(ProxyEvent::ServiceUpsert(Box::new(service(i))));
        p.apply_event(ProxyEvent::SliceUpsert(Box::new(slice(i, 0))));
    }
    let t0 = Instant::now();
    let full = p.sync(t0)?;
    let raw_full = raw_restore(backend, &raw_ns, &full.payload.text)?;

    let (mut partial, mut raw_partial, mut gen) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=5 {
        let mut changed = slice(n / 2, 0);
        changed.endpoints.as_mut().expect("endpoints")[3].addresses =
            vec![format!("10.250.{}.{}", round, n % 250 + 1)];
        p.apply_event(ProxyEvent::SliceUpsert(Box::new(changed)));
        let r = p.sync(t0 + Duration::from_secs(2 * round))?;
        assert!(!r.full, "expected a partial sync");
        let raw = raw_restore(backend, &raw_ns, &r.payload.text)?;
        gen.push(r.elapsed.saturating_sub(r.restore));
        partial.push(r.elapsed);
        raw_partial.push(raw);
    }
    let m = p.metrics();
    println!(
        "{:<15} {:>6} {:>7} {:>8} {:>8} {:>8.1} | {:>9.1} {:>9.1} {:>6.2} {:>7.1} | {:>8.2} {:>8.2} {:>8.2} | {:>7.1}",
        backend.name(),
        n,
        m.endpoints(),
        m.nat_rules(),
        m.nat_chains(),
        full.payload.text.len() as f64 / 1e6,
        ms(full.elapsed),
        ms(raw_full),
        full.elapsed.as_secs_f64() / raw_full.as_secs_f64(),
        ms(full.elapsed.saturating_sub(full.restore)),
        ms(median(partial)),
        ms(median(raw_partial)),
        ms(median(gen)),
        peak_rss_mib(),
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![1000, 5000, 10_000];
    }
    let backends: Vec<Backend> = match args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
    {
        Some(b) => vec![Backend::from_name(b).context("backend is legacy or nft")?],
        None => vec![Backend::Legacy, Backend::Nft],
    };
    println!("proxy-sync: {ENDPOINTS} endpoints per service; times in ms; ratio = Tabby full sync / raw iptables-restore of the same payload");
    println!("partial = one endpoint of one service replaced (median of 5); tabby = the sync's own work (generation, render, iptables-save, conntrack), i.e. minus its restore");
    println!(
        "{:<15} {:>6} {:>7} {:>8} {:>8} {:>8} | {:>9} {:>9} {:>6} {:>7} | {:>8} {:>8} {:>8} | {:>7}",
        "backend", "svcs", "eps", "natrules", "chains", "MB", "full", "raw", "ratio", "tabby", "partial", "rawpart", "tabby", "rssMiB"
    );
    for backend in backends {
        for &n in &sizes {
            run(backend, n)?;
        }
    }
    Ok(())
}
