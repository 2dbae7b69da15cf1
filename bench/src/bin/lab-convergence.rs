//! `lab-convergence`: how long a 10-node lab takes until every node's kernel
//! holds a route for every other node's block.
//!
//! Each run builds a lab of its own (`tabby-lab up --nodes 10
//! --pods-per-node 1` with a unique prefix and a temporary state dir) and,
//! *while `up` runs*, dumps every node's IPv4 table over rtnetlink every
//! 10 ms, keeping the history of each node's `proto 201` routes. Once `up`
//! returned, the expected set of each node is known from `<state>/lab.json`:
//! a blackhole for its own /26 block and `<block> via <node address>` for
//! every other node's block (blocks are derived from the pods' addresses,
//! one pod per node, so one block per node). A node's convergence time is
//! the first dump that held its whole expected set.
//!
//! Reference point: the start of the *last* agent, read from `lab.json`
//! (`nodes[].agent.start_time`, clock ticks since boot, 10 ms resolution).
//! The time from `up` returning is printed too (negative: converged before
//! `up` returned, which is usual since `up` still creates the last pod).
//!
//! Every lab is removed by `tabby-lab down` from a drop guard: also on
//! error, panic or Ctrl-C.
//!
//! Run (root): `cargo run --release -p tabby-bench --bin lab-convergence
//! [-- --nodes N --runs R]` after `cargo build --release -p tabby-node -p
//! tabby-lab -p tabby-cni -p tabby-ctl`.

#[path = "../rtnl.rs"]
mod rtnl;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rtnl::{nap, Rtnl, V4Route, PROTO_TABBY, RTN_BLACKHOLE};
use serde_json::Value;
use tabby_bench::lab::Lab;
use tabby_bench::{flag, LAB_BINS, LAB_BUILD};

/// The lab's block size (lab/src/up.rs `BLOCK_SIZE`).
const BLOCK_LEN: u8 = 26;
/// How often every node's table is dumped.
const POLL: Duration = Duration::from_millis(10);
/// How long to wait for convergence after `up` returned.
const DEADLINE: Duration = Duration::from_secs(90);

/// One node as `lab.json` describes it.
struct Node {
    name: String,
    netns: String,
    address: Ipv4Addr,
    start_ticks: Option<u64>,
}

/// The nodes and each node's block, from `lab.json`.
fn read_state(path: &std::path::Path) -> Result<(Vec<Node>, BTreeMap<String, Ipv4Addr>)> {
    let v: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let mut nodes = Vec::new();
    for n in v["nodes"].as_array().into_iter().flatten() {
        nodes.push(Node {
            name: n["name"].as_str().context("node name")?.to_string(),
            netns: n["netns"].as_str().context("node netns")?.to_string(),
            address: n["address"].as_str().context("node address")?.parse()?,
            start_ticks: n["agent"]["start_time"].as_u64(),
        });
    }
    let mut blocks = BTreeMap::new();
    for p in v["pods"].as_array().into_iter().flatten() {
        if let (Some(node), Some(ip)) = (p["node"].as_str(), p["ip"].as_str()) {
            let ip: Ipv4Addr = ip.parse()?;
            let block = Ipv4Addr::from(u32::from(ip) & (u32::MAX << (32 - BLOCK_LEN)));
            blocks.insert(node.to_string(), block);
        }
    }
    Ok((nodes, blocks))
}

/// Each node's routes of protocol 201, with the history of their changes.
#[derive(Default)]
struct Watch {
    socks: BTreeMap<String, Rtnl>,
    history: BTreeMap<String, Vec<(Instant, BTreeSet<V4Route>)>>,
}

impl Watch {
    /// Opens sockets for nodes that appeared, then dumps every node once.
    fn poll(&mut self, state_file: &std::path::Path) {
        if let Ok((nodes, _)) = read_state(state_file) {
            for n in nodes {
                if !self.socks.contains_key(&n.name) {
                    if let Ok(s) = Rtnl::open_in(&n.netns, 0) {
                        self.socks.insert(n.name.clone(), s);
                    }
                }
            }
        }
        for (name, sock) in &mut self.socks {
            let Ok(routes) = sock.dump_v4() else { continue };
            let now = Instant::now();
            let set: BTreeSet<V4Route> = routes
                .into_iter()
                .filter(|r| r.protocol == PROTO_TABBY)
                .collect();
            let h = self.history.entry(name.clone()).or_default();
            if h.last().is_none_or(|(_, last)| *last != set) {
                h.push((now, set));
            }
        }
    }

    /// The first moment `node`'s table held all of `want`.
    fn converged(&self, node: &str, want: &BTreeSet<V4Route>) -> Option<Instant> {
        self.history
            .get(node)?
            .iter()
            .find(|(_, set)| want.is_subset(set))
            .map(|(t, _)| *t)
    }
}

/// What `node` must hold: its own blackhole and every other block via its node.
fn expected(node: &Node, nodes: &[Node], blocks: &BTreeMap<String, Ipv4Addr>) -> BTreeSet<V4Route> {
    let mut want = BTreeSet::new();
    for other in nodes {
        let Some(block) = blocks.get(&other.name) else {
            continue;
        };
        let own = other.name == node.name;
        want.insert(V4Route {
            dst: *block,
            len: BLOCK_LEN,
            gateway: (!own).then_some(other.address),
            kind: if own { RTN_BLACKHOLE } else { 1 },
            protocol: PROTO_TABBY,
        });
    }
    want
}

/// Signed milliseconds from `from` to `to`.
fn ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1e3
    } else {
        -((from - to).as_secs_f64() * 1e3)
    }
}

/// Runs `tabby-lab up` for a fresh lab, dumping every node's table while
/// it runs; returns the lab's guard, the watch, and when `up` returned.
fn build_lab(lab_bin: &Path, run: usize, node_count: usize) -> Result<(Lab, Watch, Instant)> {
    let prefix = format!("lc{}-{run}", std::process::id());
    let mut guard = Lab::new(lab_bin, prefix.clone())?;
    let state_file = guard.state_file();
    println!("run {run}: tabby-lab --prefix {prefix} --state-dir {} up --nodes {node_count} --pods-per-node 1", guard.state.path().display());
    let t_spawn = Instant::now();
    let mut child = guard
        .command(&[
            "up",
            "--nodes",
            &node_count.to_string(),
            "--pods-per-node",
            "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning tabby-lab up")?;
    let out = child.stdout.take().context("up stdout")?;
    guard.up = Some(child);
    let fwd = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with('[') || line.starts_with("tabby-lab") {
                println!("    | {line}");
            }
        }
    });
    let mut watch = Watch::default();
    let status = loop {
        watch.poll(&state_file);
        if let Some(s) = guard.up.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            break s;
        }
        nap(POLL)?;
    };
    let t_up = Instant::now();
    let _ = fwd.join();
    if !status.success() {
        bail!("tabby-lab up failed ({status}); see its output above");
    }
    println!(
        "    up returned after {:.1} s",
        (t_up - t_spawn).as_secs_f64()
    );
    Ok((guard, watch, t_up))
}

/// When the last agent started, from the clock ticks in lab.json.
fn last_agent_start(nodes: &[Node], now: Instant) -> Result<Instant> {
    let mut last_start = None::<Instant>;
    for n in nodes {
        let ticks = n
            .start_ticks
            .with_context(|| format!("{} has no running agent in lab.json", n.name))?;
        let age = rtnl::process_age(ticks).context("reading /proc/uptime")?;
        let start = now
            .checked_sub(Duration::from_secs_f64(age.max(0.0)))
            .unwrap_or(now);
        last_start = Some(last_start.map_or(start, |l| l.max(start)));
    }
    last_start.context("no nodes")
}

/// Polls until every node holds what it must; on the deadline says what is missing.
fn wait_converged(
    watch: &mut Watch,
    state_file: &Path,
    nodes: &[Node],
    wants: &[BTreeSet<V4Route>],
    t_up: Instant,
) -> Result<()> {
    let done = |w: &Watch| {
        nodes
            .iter()
            .zip(wants)
            .all(|(n, want)| w.converged(&n.name, want).is_some())
    };
    while !done(watch) {
        if t_up.elapsed() > DEADLINE {
            for (n, want) in nodes.iter().zip(wants) {
                let have = watch
                    .history
                    .get(&n.name)
                    .and_then(|h| h.last())
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default();
                let missing: Vec<_> = want
                    .difference(&have)
                    .map(|r| format!("{}/{}", r.dst, r.len))
                    .collect();
                if !missing.is_empty() {
                    eprintln!("    {} still misses {}", n.name, missing.join(", "));
                }
            }
            bail!("not converged {} s after up returned", DEADLINE.as_secs());
        }
        nap(POLL)?;
        watch.poll(state_file);
    }
    Ok(())
}

/// Prints where the time went: the last node noticing its own block (its
/// datastore poll), then BGP carrying it to every other kernel.
fn breakdown(
    watch: &Watch,
    nodes: &[Node],
    wants: &[BTreeSet<V4Route>],
    last_start: Instant,
    total: f64,
) {
    let Some((n, want)) = nodes.iter().zip(wants).max_by_key(|(n, _)| n.start_ticks) else {
        return;
    };
    let own: BTreeSet<V4Route> = want
        .iter()
        .filter(|r| r.kind == RTN_BLACKHOLE)
        .cloned()
        .collect();
    if let Some(t) = watch.converged(&n.name, &own) {
        let t = ms(last_start, t);
        let rest = match total - t {
            d if d < POLL.as_millis() as f64 => {
                format!("< {} ms (the same dump round)", POLL.as_millis())
            }
            d => format!("{d:.0} ms more"),
        };
        println!(
            "    breakdown: {} installed its own blackhole at {t:.0} ms (its datastore poll saw the block); \
             BGP + kernel on all other nodes: {rest}",
            n.name
        );
    }
}

/// One run: returns (ms from last agent start, ms from `up` returning).
fn run_once(lab_bin: &Path, run: usize, node_count: usize) -> Result<(f64, f64)> {
    let (guard, mut watch, t_up) = build_lab(lab_bin, run, node_count)?;
    let state_file = guard.state_file();
    let (nodes, blocks) = read_state(&state_file).context("reading lab.json")?;
    if nodes.len() != node_count || blocks.len() != node_count {
        bail!(
            "lab.json lists {} nodes and {} blocks, expected {node_count}",
            nodes.len(),
            blocks.len()
        );
    }
    let now = Instant::now();
    let last_start = last_agent_start(&nodes, now)?;
    let wants: Vec<BTreeSet<V4Route>> =
        nodes.iter().map(|n| expected(n, &nodes, &blocks)).collect();
    wait_converged(&mut watch, &state_file, &nodes, &wants, t_up)?;
    let mut total = f64::MIN;
    for (n, want) in nodes.iter().zip(&wants) {
        let t = watch.converged(&n.name, want).expect("checked above");
        let start = n
            .start_ticks
            .and_then(rtnl::process_age)
            .map(|age| ms(now - Duration::from_secs_f64(age.max(0.0)), t));
        println!(
            "    {:<8} {} block {}/{BLOCK_LEN}: all {} routes at {:>7.0} ms after the last agent start ({:>7.0} ms after its own start)",
            n.name,
            n.address,
            blocks[&n.name],
            want.len(),
            ms(last_start, t),
            start.unwrap_or(f64::NAN)
        );
        total = total.max(ms(last_start, t));
    }
    breakdown(&watch, &nodes, &wants, last_start, total);
    let from_up = total + ms(t_up, last_start);
    println!("  run {run}: converged {total:.0} ms after the last agent start ({from_up:.0} ms relative to `up` returning)");
    drop(guard);
    Ok((total, from_up))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> std::process::ExitCode {
    rtnl::catch_signals();
    tabby_bench::exit_code("lab-convergence", real_main())
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nodes = flag(&args, "--nodes", 10usize)?;
    let runs = flag(&args, "--runs", 3usize)?.max(1);
    let lab_bin = tabby_bench::release_dir(&LAB_BINS, LAB_BUILD)?.join("tabby-lab");
    println!("lab-convergence: {runs} runs of a {nodes}-node lab, 1 pod per node; routes dumped every {} ms", POLL.as_millis());
    println!("reference: the last agent's start from lab.json (clock ticks, 10 ms resolution)\n");
    let mut results = Vec::new();
    for run in 1..=runs {
        results.push(run_once(&lab_bin, run, nodes)?);
        println!();
    }
    let totals: Vec<f64> = results.iter().map(|r| r.0).collect();
    let ups: Vec<f64> = results.iter().map(|r| r.1).collect();
    println!("== lab-convergence, {nodes} nodes ==");
    println!(
        "from the last agent start: {} ms; median {:.0} ms",
        totals
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(totals.clone())
    );
    println!(
        "relative to `up` returning: {} ms; median {:.0} ms",
        ups.iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(ups.clone())
    );
    Ok(())
}
