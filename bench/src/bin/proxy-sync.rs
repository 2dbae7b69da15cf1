//! proxy-sync: the service proxy's sync times and first-packet latency, per mode.
//!
//! Modes: iptables-legacy, iptables-nft (Tabby's iptables mode over each
//! backend) and nftables (Tabby's nftables mode). For each mode and size
//! (1k, 10k, 30k services × 10 endpoints), in fresh network namespaces
//! (needs root), one child process measures:
//! - full: the first sync (generation, reading the kernel, one transaction);
//! - 1 ep: one endpoint of one service replaced, a partial sync (median of 5);
//! - +svc: one service added, a partial sync;
//! - resync: a full sync over the programmed table (as the periodic resync does);
//! - CPU time of the helper programs (iptables-restore, nft) over those syncs,
//!   the child's peak RSS and the largest helper's peak RSS;
//! - connect: TCP connect time p50/p99 over 200 connections from the node to
//!   the first and to the last service (iptables-legacy and nftables only),
//!   with a listener on every endpoint address in a second namespace.
//!
//! A mode that has not finished a size within the time limit (2 minutes by
//! default: iptables-nft is known not to finish at 5k+) prints "did not
//! finish" and the run moves on.
//!
//! Usage: `proxy-sync [SIZES...] [--mode MODE[,MODE...]] [--limit SECS]`
//! (modes: iptables-legacy, iptables-nft, nftables; default all three, and
//! 1000 10000 30000 services). `PROXY_SYNC_DUMP=DIR` writes every payload
//! to DIR (to replay one with `nft -f` and profile it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nix::sys::resource::{getrusage, UsageWho};
use tabby_proxy::conntrack::NoConntrack;
use tabby_proxy::iptables::{Backend as IptBackend, Iptables};
use tabby_proxy::nftables::{NftCli, Nftables};
use tabby_proxy::proxier::{Proxier, ProxyEvent, SyncConfig};
use tabby_proxy::{Backend, NodeFacts, ProxyOptions};
use tabby_testkit::Netns;

const ENDPOINTS: usize = 10;
const CONNECTS: usize = 200;
const MODES: [&str; 3] = ["iptables-legacy", "iptables-nft", "nftables"];

fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        bail!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn meta(name: &str, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("bench".into()),
        labels,
        ..Default::default()
    }
}

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn service(i: usize) -> Service {
    Service {
        metadata: meta(&format!("svc-{i}"), None),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip(i)),
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

fn slice(i: usize) -> EndpointSlice {
    let labels = BTreeMap::from([("kubernetes.io/service-name".to_string(), format!("svc-{i}"))]);
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|e| {
            let n = i * ENDPOINTS + e;
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

/// CPU time (user + system) of the calling thread (Tabby's own work: the syncs run on it).
fn thread_cpu() -> Duration {
    match getrusage(UsageWho::RUSAGE_THREAD) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::from_micros(tv.tv_sec() as u64 * 1_000_000 + tv.tv_usec() as u64)
            };
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// CPU time (user + system) of the finished helper programs, and the largest one's peak RSS in MiB.
fn children() -> (Duration, f64) {
    match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::from_micros(tv.tv_sec() as u64 * 1_000_000 + tv.tv_usec() as u64)
            };
            (
                t(u.user_time()) + t(u.system_time()),
                u.max_rss() as f64 / 1024.0,
            )
        }
        Err(_) => (Duration::ZERO, 0.0),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The node namespace's uplink to a namespace that answers on every endpoint address.
fn wire(node: &Netns, backends: &Netns) -> Result<()> {
    let (a, b) = (
        format!("bn{}", std::process::id() % 100_000),
        format!("bb{}", std::process::id() % 100_000),
    );
    sh(
        "ip",
        &[
            "link",
            "add",
            &a,
            "netns",
            node.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            backends.name(),
        ],
    )?;
    node.ip(&["addr", "add", "192.168.77.1/30", "dev", &a]);
    node.ip(&["link", "set", &a, "up"]);
    node.ip(&["link", "set", "lo", "up"]);
    node.ip(&["route", "add", "default", "via", "192.168.77.2"]);
    backends.ip(&["addr", "add", "192.168.77.2/30", "dev", &b]);
    backends.ip(&["link", "set", &b, "up"]);
    backends.ip(&["link", "set", "lo", "up"]);
    backends.ip(&["route", "add", "local", "10.128.0.0/10", "dev", "lo"]);
    Ok(())
}

/// Runs `f` on a thread inside the namespace at `path`.
fn in_netns<T: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    Ok(std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    }))
}

/// Connect-time p50 and p99 (ms) to `ip:80` from the node, 200 connections.
fn connect_times(node: &Netns, ip: &str) -> Result<(f64, f64)> {
    let addr: SocketAddr = format!("{ip}:80").parse()?;
    let h = in_netns(&node.path().to_string_lossy(), move || {
        let mut v = Vec::with_capacity(CONNECTS);
        for _ in 0..CONNECTS {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            v.push(t.elapsed());
            drop(s);
        }
        Ok::<_, std::io::Error>(v)
    })?;
    let mut v = h.join().map_err(|_| anyhow::anyhow!("client thread"))??;
    v.sort();
    Ok((ms(v[v.len() / 2]), ms(v[v.len() * 99 / 100])))
}

fn node_facts() -> Result<NodeFacts> {
    Ok(NodeFacts {
        name: "node-0".into(),
        node_ips: vec!["192.168.77.1".parse()?],
        cluster_cidr: Some("10.128.0.0/10".parse()?),
        pod_cidrs: vec![],
    })
}

/// What one mode did at one size.
struct Figures {
    full: Duration,
    endpoint: Duration,
    /// Of `endpoint`, Tabby's own work (planning, rendering: all but the apply).
    own: Duration,
    /// CPU time of one endpoint change: Tabby's thread, and the helper (nft) (medians).
    own_cpu: Duration,
    helper_cpu_1ep: Duration,
    added: Duration,
    resync: Duration,
    helper_cpu: Duration,
    rules: i64,
    chains: i64,
    elements: i64,
    bytes: usize,
}

/// With `PROXY_SYNC_DUMP=DIR`, writes each payload to `DIR/NAME` (to replay and profile).
fn dump(name: &str, text: &str) {
    if let Some(dir) = std::env::var_os("PROXY_SYNC_DUMP") {
        let path = std::path::Path::new(&dir).join(name);
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("write {}: {e}", path.display());
        }
    }
}

fn syncs<B: Backend>(p: &mut Proxier<B, NoConntrack>, n: usize) -> Result<Figures> {
    for i in 0..n {
        p.apply_event(ProxyEvent::ServiceUpsert(Box::new(service(i))));
        p.apply_event(ProxyEvent::SliceUpsert(Box::new(slice(i))));
    }
    let (cpu0, _) = children();
    let t0 = Instant::now();
    let full = p.sync(t0)?;
    let bytes = full.payload.text.len();
    dump("full", &full.payload.text);
    let (mut partial, mut own) = (Vec::new(), Vec::new());
    let (mut own_cpu, mut helper_1ep) = (Vec::new(), Vec::new());
    for round in 1..=5u64 {
        let mut changed = slice(n / 2);
        changed.endpoints.as_mut().expect("endpoints")[3].addresses =
            vec![format!("10.191.{}.{}", round, n % 250 + 1)];
        p.apply_event(ProxyEvent::SliceUpsert(Box::new(changed)));
        let (c0, h0) = (thread_cpu(), children().0);
        let r = p.sync(t0 + Duration::from_secs(2 * round))?;
        own_cpu.push(thread_cpu().saturating_sub(c0));
        helper_1ep.push(children().0.saturating_sub(h0));
        anyhow::ensure!(!r.full, "expected a partial sync");
        dump(&format!("endpoint-{round}"), &r.payload.text);
        partial.push(r.elapsed);
        own.push(r.elapsed.saturating_sub(r.restore));
    }
    p.apply_event(ProxyEvent::ServiceUpsert(Box::new(service(n))));
    p.apply_event(ProxyEvent::SliceUpsert(Box::new(slice(n))));
    let added = p.sync(t0 + Duration::from_secs(20))?;
    anyhow::ensure!(!added.full, "expected a partial sync");
    dump("added", &added.payload.text);
    p.apply_event(ProxyEvent::FullSync);
    let resync = p.sync(t0 + Duration::from_secs(22))?;
    anyhow::ensure!(resync.full, "expected a full sync");
    let (cpu1, _) = children();
    let m = p.metrics();
    Ok(Figures {
        full: full.elapsed,
        endpoint: median(partial),
        own: median(own),
        own_cpu: median(own_cpu),
        helper_cpu_1ep: median(helper_1ep),
        added: added.elapsed,
        resync: resync.elapsed,
        helper_cpu: cpu1.saturating_sub(cpu0),
        rules: m.nat_rules(),
        chains: m.nat_chains(),
        elements: m.elements(),
        bytes,
    })
}

/// One mode at one size, in this process (the child).
fn child(mode: &str, n: usize) -> Result<()> {
    let node_ns = Netns::new("tabby-bench-node");
    let backends = Netns::new("tabby-bench-eps");
    wire(&node_ns, &backends)?;
    let path = node_ns.path().to_string_lossy().into_owned();
    let (opts, cfg) = (ProxyOptions::default(), SyncConfig::default());
    let f = match mode {
        "nftables" => {
            let mut p = Proxier::new(
                node_facts()?,
                opts,
                cfg,
                Nftables::new(NftCli::in_netns(&path)),
                NoConntrack::default(),
            );
            syncs(&mut p, n)?
        }
        _ => {
            let b = IptBackend::from_name(mode).context("mode")?;
            let mut p = Proxier::new(
                node_facts()?,
                opts,
                cfg,
                Iptables::new(b).in_netns(&path),
                NoConntrack::default(),
            );
            syncs(&mut p, n)?
        }
    };
    let (_, helper_rss) = children();
    let latency = if mode == "iptables-nft" {
        "-".to_string()
    } else {
        let _listener = in_netns(&backends.path().to_string_lossy(), || {
            let l = TcpListener::bind("0.0.0.0:8080").expect("bind 8080");
            for s in l.incoming() {
                drop(s);
            }
        })?;
        std::thread::sleep(Duration::from_millis(100)); // the listener binds (a bench, not a test)
        let first = connect_times(&node_ns, &cluster_ip(0))?;
        let last = connect_times(&node_ns, &cluster_ip(n - 1))?;
        format!(
            "{:.3}/{:.3} {:.3}/{:.3} {:.2}",
            first.0,
            first.1,
            last.0,
            last.1,
            last.0 / first.0
        )
    };
    println!(
        "RESULT {mode:<15} {n:>6} {:>8} {:>7} {:>7} {:>6.1} | {:>9.1} {:>8.1} {:>6.2} {:>5.1}/{:<5.1} {:>8.1} {:>8.1} {:>8.1} | {:>6.0} {:>6.0} | {latency}",
        f.rules,
        f.chains,
        f.elements,
        f.bytes as f64 / 1e6,
        ms(f.full),
        ms(f.endpoint),
        ms(f.own),
        ms(f.own_cpu),
        ms(f.helper_cpu_1ep),
        ms(f.added),
        ms(f.resync),
        ms(f.helper_cpu),
        peak_rss_mib(),
        helper_rss,
    );
    Ok(())
}

/// Runs one (mode, size) as a child process; kills it after `limit`.
fn parent(mode: &str, n: usize, limit: Duration) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut c = Command::new(exe)
        .args(["--child", mode, &n.to_string()])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let out = c.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let start = Instant::now();
    loop {
        if let Some(status) = c.try_wait()? {
            let lines = reader.join().map_err(|_| anyhow::anyhow!("reader"))?;
            match lines.iter().find_map(|l| l.strip_prefix("RESULT ")) {
                Some(r) => println!("{r}"),
                None => println!("{mode:<15} {n:>6} failed ({status})"),
            }
            return Ok(());
        }
        if start.elapsed() > limit {
            let pid = nix::unistd::Pid::from_raw(-(c.id() as i32));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
            for tag in ["node", "eps"] {
                let _ = Command::new("ip")
                    .args(["netns", "del", &format!("tabby-bench-{}-{tag}", c.id())])
                    .status();
            }
            println!(
                "{mode:<15} {n:>6} did not finish within {} s",
                limit.as_secs()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let n = args.get(2).context("size")?.parse()?;
        return child(args.get(1).context("mode")?, n);
    }
    let mut sizes: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || !args[i - 1].starts_with("--"))
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![1000, 10_000, 30_000];
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let modes: Vec<&str> = match flag("--mode") {
        Some(list) => list
            .split(',')
            .map(|m| {
                MODES
                    .iter()
                    .copied()
                    .find(|x| x == &m)
                    .context("modes are iptables-legacy, iptables-nft and nftables")
            })
            .collect::<Result<_>>()?,
        None => MODES.to_vec(),
    };
    let limit: u64 = match flag("--limit") {
        Some(l) => l.parse().context("--limit SECS")?,
        None => 120,
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at the start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("proxy-sync: {ENDPOINTS} endpoints per service; times in ms of wall clock (the machine is shared: see helperCPU)");
    println!("1ep = one endpoint replaced (median of 5), own = Tabby's own part of it (all but the apply), 1epCPU = CPU ms of it, Tabby's thread/helper; +svc = one service added; resync = a full sync over the programmed table; helperCPU = user+sys of iptables-restore/nft over all syncs");
    println!(
        "connect = TCP connect p50/p99 ms to the first and the last service, and last/first p50"
    );
    println!(
        "{:<15} {:>6} {:>8} {:>7} {:>7} {:>6} | {:>9} {:>8} {:>6} {:>11} {:>8} {:>8} {:>8} | {:>6} {:>6} | connect first last ratio",
        "mode", "svcs", "rules", "chains", "elems", "MB", "full", "1ep", "own", "1epCPU", "+svc", "resync", "helperCPU", "rssMiB", "helperMiB"
    );
    for &n in &sizes {
        for mode in &modes {
            parent(mode, n, Duration::from_secs(limit))?;
        }
    }
    Ok(())
}
