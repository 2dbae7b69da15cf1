//! `encap-throughput`: what VXLAN costs pod-to-pod across nodes in the lab,
//! against native routing measured in the same run, and how fast the lab
//! follows a pool's mode switch.
//!
//! One lab (`tabby-lab up --nodes 3 --pods-per-node 1`, one subnet, the
//! pool with `vxlanMode: Never`), then for each mode in turn (Never,
//! Always, Never...): `tabbyctl pool update --vxlan-mode M` while the pods
//! run, and
//! - **reconvergence**: from just before the update until every node's
//!   `proto 201` route to every other node's block has the new mode's
//!   gateway (a tunnel address inside the pool for VXLAN, the node's
//!   underlay address for native) *and* every ordered pod pair got an echo
//!   answer (polled every 5 ms, each probe a fresh TCP connection with a
//!   200 ms timeout); probes that failed during the switch are counted;
//! - **throughput**: `iperf3 -c` from node-1's pod to node-2's pod (TCP,
//!   `--seconds` long, default 5), received bits per second;
//! - **latency**: 64-byte request/response round trips on one TCP
//!   connection from node-1's pod to a responder in node-2's pod, p50/p99
//!   over `--requests` (default 5000);
//! - node-1's vxlan.tabby packet counts before and after, so that a VXLAN
//!   figure that went natively is caught (the run fails).
//!
//! Ratios VXLAN / native are printed at the end. The lab is removed by
//! `tabby-lab down` from a drop guard, also on error or Ctrl-C.
//!
//! Run (root): `cargo run --release -p tabby-bench --bin encap-throughput
//! [-- --seconds S --requests N --rounds R]` after `cargo build --release
//! -p tabby-node -p tabby-lab -p tabby-cni -p tabby-ctl`; needs iperf3
//! (scripts/setup.sh installs it).

#[path = "../rtnl.rs"]
mod rtnl;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rtnl::{check_interrupted, nap, Rtnl, PROTO_TABBY, RTN_BLACKHOLE};
use serde_json::Value;
use tabby_bench::lab::Lab;
use tabby_bench::{flag, LAB_BINS, LAB_BUILD};
use tabby_dataplane::NetNs;

const POOL: &str = "default-ipv4-ippool";
const POOL_NET: (Ipv4Addr, u32) = (Ipv4Addr::new(10, 244, 0, 0), 16);
const ECHO_PORT: u16 = 8080;
const RESPONDER_PORT: u16 = 7777;
const IPERF_PORT: u16 = 5201;
const SWITCH_DEADLINE: Duration = Duration::from_secs(30);
const MESSAGE: usize = 64;

/// A pod or node from `lab.json`.
#[derive(Debug, Clone)]
struct Pod {
    node: String,
    netns: String,
    ip: Ipv4Addr,
}

/// The lab's pods, and its nodes as (name, namespace).
type LabView = (Vec<Pod>, Vec<(String, String)>);

fn read_lab(path: &std::path::Path) -> Result<LabView> {
    let v: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let pods = v["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            Ok(Pod {
                node: p["node"].as_str().context("pod node")?.to_string(),
                netns: p["netns"].as_str().context("pod netns")?.to_string(),
                ip: p["ip"].as_str().context("pod ip")?.parse()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let nodes = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let name = n["name"].as_str().unwrap_or_default().to_string();
            (name, n["netns"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    Ok((pods, nodes))
}

fn in_pool(ip: Ipv4Addr) -> bool {
    u32::from(ip) & (u32::MAX << (32 - POOL_NET.1)) == u32::from(POOL_NET.0)
}

/// Whether every remote block route of every node has the mode's gateway.
fn routes_in_mode(socks: &mut [Rtnl], blocks_per_node: usize, vxlan: bool) -> bool {
    socks.iter_mut().all(|s| {
        let Ok(routes) = s.dump_v4() else {
            return false;
        };
        let remote: Vec<_> = routes
            .iter()
            .filter(|r| r.protocol == PROTO_TABBY && r.kind != RTN_BLACKHOLE && in_pool(r.dst))
            .collect();
        remote.len() >= blocks_per_node
            && remote
                .iter()
                .all(|r| r.gateway.is_some_and(|g| in_pool(g) == vxlan))
    })
}

/// One echo request from `from`'s namespace to `to`.
fn probe(from: &NetNs, to: Ipv4Addr) -> bool {
    from.run(|| -> std::io::Result<bool> {
        let t = Duration::from_millis(200);
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((to, ECHO_PORT)), t)?;
        s.set_read_timeout(Some(t))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf.starts_with(b"HTTP/1.1 200"))
    })
    .map(|r| r.unwrap_or(false))
    .unwrap_or(false)
}

/// Switches the pool and measures the time until routes and every pair follow.
fn switch(lab: &Lab, pods: &[Pod], nodes: &[(String, String)], mode: &str) -> Result<()> {
    let vxlan = mode != "Never";
    let mut socks = nodes
        .iter()
        .map(|(_, ns)| Rtnl::open_in(ns, 0))
        .collect::<Result<Vec<_>>>()?;
    let nets: Vec<NetNs> = pods
        .iter()
        .map(|p| NetNs::open(format!("/run/netns/{}", p.netns)))
        .collect::<std::result::Result<_, _>>()?;
    let start = Instant::now();
    lab.run(&["tabbyctl", "pool", "update", POOL, "--vxlan-mode", mode])?;
    let written = start.elapsed();
    let (mut routes_at, mut failed) = (None, 0usize);
    loop {
        check_interrupted()?;
        if start.elapsed() > SWITCH_DEADLINE {
            bail!("{mode}: not converged after {SWITCH_DEADLINE:?}");
        }
        if routes_at.is_none() && routes_in_mode(&mut socks, nodes.len() - 1, vxlan) {
            routes_at = Some(start.elapsed());
        }
        let mut all = true;
        for (i, from) in pods.iter().enumerate() {
            for to in pods.iter().filter(|p| p.node != from.node) {
                if !probe(&nets[i], to.ip) {
                    all = false;
                    failed += 1;
                }
            }
        }
        if let (true, Some(routes_at)) = (all, routes_at) {
            println!(
                "switch to vxlanMode {mode}: pool written in {:.0} ms, routes in {:.0} ms, every pair reached in {:.0} ms ({failed} probes failed meanwhile)",
                written.as_secs_f64() * 1e3,
                routes_at.as_secs_f64() * 1e3,
                start.elapsed().as_secs_f64() * 1e3
            );
            return Ok(());
        }
        nap(Duration::from_millis(5))?;
    }
}

/// node-1's vxlan.tabby tx packets (0 when it has none).
fn vxlan_tx(node_ns: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "-n",
            node_ns,
            "-j",
            "-s",
            "link",
            "show",
            "dev",
            "vxlan.tabby",
        ])
        .output();
    out.ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v[0]["stats64"]["tx"]["packets"].as_u64())
        .unwrap_or(0)
}

/// iperf3 from `client` to `server` for `seconds`: received Gbit/s.
fn iperf(client: &Pod, server: &Pod, seconds: u64) -> Result<f64> {
    let mut srv: Child = Command::new("ip")
        .args(["netns", "exec", &server.netns, "iperf3", "-s"])
        .args(["-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (apt-get install iperf3)")?;
    let srv_ns = NetNs::open(format!("/run/netns/{}", server.netns))?;
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, IPERF_PORT));
    let t = Instant::now();
    while !srv_ns.run(|| TcpStream::connect_timeout(&local, Duration::from_millis(50)).is_ok())? {
        if t.elapsed() > Duration::from_secs(5) {
            let _ = srv.kill();
            bail!("iperf3 -s did not start");
        }
        nap(Duration::from_millis(20))?;
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns, "iperf3", "-J", "-c"])
        .arg(server.ip.to_string())
        .args(["-p", &IPERF_PORT.to_string(), "-t", &seconds.to_string()])
        .output()?;
    // Not `-s -1`: the readiness probe above would be its one client.
    let _ = srv.kill();
    let _ = srv.wait();
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in iperf3's answer: {}", v["error"]))?;
    Ok(bps / 1e9)
}

/// A responder in `server`'s pod echoing fixed-size messages; returns when it listens.
fn responder(server: &Pod) -> Result<()> {
    let ns = NetNs::open(format!("/run/netns/{}", server.netns))?;
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, RESPONDER_PORT)))??;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; MESSAGE];
                while c.read_exact(&mut buf).is_ok() && c.write_all(&buf).is_ok() {}
            });
        }
    });
    Ok(())
}

/// `n` round trips from `client` to the responder: (p50, p99) in µs.
fn latency(client: &Pod, server: &Pod, n: usize) -> Result<(f64, f64)> {
    let ns = NetNs::open(format!("/run/netns/{}", client.netns))?;
    let to = SocketAddr::from((server.ip, RESPONDER_PORT));
    let mut samples = ns.run(|| -> Result<Vec<f64>> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let (msg, mut buf) = ([7u8; MESSAGE], [0u8; MESSAGE]);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(&msg)?;
            s.read_exact(&mut buf)?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(samples)
    })??;
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.99)))
}

/// One mode's figures.
struct Figures {
    gbps: f64,
    p50_us: f64,
    p99_us: f64,
    vxlan_packets: u64,
}

fn measure(pods: &[Pod], node1_ns: &str, seconds: u64, requests: usize) -> Result<Figures> {
    let (client, server) = (&pods[0], &pods[1]);
    let before = vxlan_tx(node1_ns);
    let gbps = iperf(client, server, seconds)?;
    let (p50_us, p99_us) = latency(client, server, requests)?;
    Ok(Figures {
        gbps,
        p50_us,
        p99_us,
        vxlan_packets: vxlan_tx(node1_ns) - before,
    })
}

fn main() -> std::process::ExitCode {
    rtnl::catch_signals();
    tabby_bench::exit_code("encap-throughput", real_main())
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds = flag(&args, "--seconds", 5u64)?;
    let requests = flag(&args, "--requests", 5000usize)?;
    let rounds = flag(&args, "--rounds", 1u64)?.max(1);
    let release = tabby_bench::release_dir(&LAB_BINS, LAB_BUILD)?;
    let lab = Lab::new(
        &release.join("tabby-lab"),
        format!("tbe{}", std::process::id()),
    )?;
    lab.run(&["up", "--nodes", "3", "--pods-per-node", "1"])?;
    let (pods, nodes) = read_lab(&lab.state_file())?;
    if pods.len() < 3 {
        bail!("expected 3 pods, found {}", pods.len());
    }
    let node1_ns = nodes[0].1.clone();
    println!(
        "lab {}: {} nodes x 1 pod, iperf3 {seconds} s and {requests} round trips of {MESSAGE} B from {} to {}",
        lab.prefix,
        nodes.len(),
        pods[0].ip,
        pods[1].ip
    );
    responder(&pods[1])?;
    let (mut native, mut vxlan) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for mode in ["Never", "Always"] {
            switch(&lab, &pods, &nodes, mode)?;
            let f = measure(&pods, &node1_ns, seconds, requests)?;
            println!(
                "round {round} vxlanMode {mode:<6}: {:.2} Gbit/s, p50 {:.0} µs, p99 {:.0} µs, {} packets through node-1's vxlan.tabby",
                f.gbps, f.p50_us, f.p99_us, f.vxlan_packets
            );
            match mode {
                "Never" if f.vxlan_packets > 100 => bail!("native figures went through VXLAN"),
                "Always" if f.vxlan_packets == 0 => bail!("VXLAN figures went natively"),
                "Never" => native.push(f),
                _ => vxlan.push(f),
            }
        }
    }
    switch(&lab, &pods, &nodes, "Never")?;
    let mean =
        |v: &[Figures], f: fn(&Figures) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    println!(
        "VXLAN / native: throughput {:.2}, p50 latency {:.2}, p99 latency {:.2} (over {rounds} rounds)",
        mean(&vxlan, |f| f.gbps) / mean(&native, |f| f.gbps),
        mean(&vxlan, |f| f.p50_us) / mean(&native, |f| f.p50_us),
        mean(&vxlan, |f| f.p99_us) / mean(&native, |f| f.p99_us),
    );
    Ok(())
}
