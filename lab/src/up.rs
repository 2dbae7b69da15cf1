//! `tabby-lab up`: underlay, nodes with their agents, pods, summary.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::agent;
use crate::encap::Encap;
use crate::names::{self, MAX_NODES, MAX_SUBNETS};
use crate::pods;
use crate::process::{poll_until, spawn_in_netns};
use crate::resources::sync_endpoint_slices;
use crate::sh::{self, list_netns};
use crate::state::LabState;
use crate::{topology, Lab};

/// The lab's pod pool and its block size.
pub const POOL_NAME: &str = "default-ipv4-ippool";
/// The pod pool's CIDR.
pub const POOL_CIDR: &str = "10.244.0.0/16";
/// The pool's per-node block prefix length.
pub const BLOCK_SIZE: u8 = 26;

/// What `tabby-lab up` builds (the namespace lab).
#[derive(Debug, Clone)]
pub struct Options {
    /// Node count.
    pub nodes: usize,
    /// Pods per node.
    pub pods_per_node: usize,
    /// Every agent's `[proxy] mode`.
    pub proxy_mode: String,
    /// Underlay subnets the nodes alternate between (1 or 2).
    pub subnets: u8,
    /// The default pool's encapsulation.
    pub encap: Encap,
    /// The default pool's natOutgoing.
    pub nat_outgoing: bool,
}

/// The default pool as `up` creates it.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Its encapsulation.
    pub encap: Encap,
    /// Whether traffic from it to the outside is masqueraded.
    pub nat_outgoing: bool,
}

/// Builds the lab: `nodes` nodes with `pods_per_node` pods each.
pub fn up(lab: &Lab, opts: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_NODES).contains(&opts.nodes),
        "--nodes must be between 1 and {MAX_NODES}"
    );
    anyhow::ensure!(
        (1..=MAX_SUBNETS).contains(&opts.subnets),
        "--subnets must be between 1 and {MAX_SUBNETS}"
    );
    opts.encap.check_kernel()?;
    for bin in ["tabby", "tabbyctl"] {
        let path = lab.bin_dir.join(bin);
        anyhow::ensure!(
            path.is_file(),
            "{} is not built: cargo build --release -p tabby-lab -p tabby-cni -p tabby-ctl (or pass --bin-dir)",
            path.display()
        );
    }
    let _lock = lab.dir.lock()?;
    refuse_existing(lab)?;
    build(lab, opts).map_err(|e| {
        e.context(format!(
            "tabby-lab up stopped half-way; `{} down` removes what it made",
            invocation(lab)
        ))
    })
}

/// `tabby-lab` with the flags that reach this lab.
pub fn invocation(lab: &Lab) -> String {
    let default_dir = format!("/run/{}-lab", lab.names.prefix());
    match lab.dir.root() == std::path::Path::new(&default_dir) {
        true if lab.names.prefix() == "tabby" => "tabby-lab".to_string(),
        true => format!("tabby-lab --prefix {}", lab.names.prefix()),
        false => format!("tabby-lab --state-dir {}", lab.dir.root().display()),
    }
}

/// The steps of [`up`] once nothing stands in its way.
fn build(lab: &Lab, opts: &Options) -> anyhow::Result<()> {
    let (nodes, pods_per_node, proxy_mode) = (opts.nodes, opts.pods_per_node, &opts.proxy_mode);
    let mut state = LabState {
        prefix: lab.names.prefix().to_string(),
        bin_dir: lab.bin_dir.clone(),
        proxy_mode: proxy_mode.to_string(),
        subnets: opts.subnets,
        encap: opts.encap,
        ..LabState::default()
    };
    state.save(&lab.dir)?;
    println!(
        "tabby-lab: building {nodes} nodes x {pods_per_node} pods in {} (proxy mode {proxy_mode})",
        lab.dir.root().display()
    );

    let pool = PoolOptions {
        encap: opts.encap,
        nat_outgoing: opts.nat_outgoing,
    };
    create_datastore(lab, pool)?;
    std::fs::create_dir_all(lab.dir.resources())
        .with_context(|| format!("creating {}", lab.dir.resources().display()))?;
    network(lab, &mut state)?;

    let mut agents_down = Vec::new();
    for index in 1..=nodes {
        let node = names::node_name(index);
        topology::add_node(&lab.names, &mut state, &lab.dir, index)?;
        let node_state = state.node(&node).expect("just added").clone();
        let started = agent::start(&node_state, &lab.dir, &lab.bin_dir, proxy_mode)?;
        state.node_mut(&node).expect("just added").agent = started.process().cloned();
        state.save(&lab.dir)?;
        if started.process().is_none() {
            agents_down.push(node.clone());
        } else {
            wait_for_mtu_file(lab, &node);
        }
        let what = started.describe(&lab.bin_dir.join("tabby-node"), &lab.dir.agent_log(&node));
        println!(
            "[{index}/{nodes}] {node}: namespace {} {}, {what}",
            node_state.netns, node_state.address
        );
        for k in 1..=pods_per_node {
            let pod = names::pod_name(&node, k);
            let ip = pods::add(lab, &mut state, &node, &pod, pods::default_labels(&node))
                .with_context(|| format!("creating pod {pod}"))?;
            println!("      pod {pod} {ip}");
        }
    }
    sync_endpoint_slices(&lab.dir.resources(), &state)?;
    state.complete = true;
    state.save(&lab.dir)?;
    let unroutable = state.subnets > 1 && opts.encap == Encap::None;
    if agents_down.is_empty() {
        wait_for_sessions(lab, &state);
        if !unroutable {
            wait_for_routes(&state);
        }
    }

    println!();
    print_pods(&state);
    if !agents_down.is_empty() {
        println!(
            "\nWARNING: no tabby-node agent is running on {}: pods reach pods on their own node only.",
            agents_down.join(", ")
        );
    }
    if unroutable {
        println!(
            "\nNOTE: --subnets 2 with --encap none: a node cannot route natively to a node on the other subnet and the router knows no blocks, so pods reach pods on their own subnet only; use --encap vxlan-crosssubnet (or `tabbyctl pool update`)."
        );
    }
    let me = invocation(lab);
    println!("\nnext: {me} status | {me} exec node-1-pod1 -- ip addr | {me} down");
    Ok(())
}

/// The underlay with its subnets, the external client and the internet
/// with its server.
fn network(lab: &Lab, state: &mut LabState) -> anyhow::Result<()> {
    topology::add_underlay(&lab.names, state, &lab.dir, state.subnets)?;
    topology::add_external(&lab.names, state, &lab.dir)?;
    let bridges: Vec<String> = (0..state.subnets)
        .map(|s| {
            let gateway = names::subnet_host(s, names::GATEWAY_HOST);
            format!("{} {gateway}/24", names::bridge(s))
        })
        .collect();
    println!(
        "underlay: {} (the router) bridge {}, external client {} {}",
        lab.names.underlay_ns(),
        bridges.join(", bridge "),
        lab.names.external_ns(),
        names::host(names::EXTERNAL_HOST)
    );
    topology::add_internet(&lab.names, state, &lab.dir)?;
    let server = names::internet_host(names::INTERNET_SERVER_HOST);
    let args = [
        "echo-server",
        "--name",
        "internet",
        "--port",
        &names::INTERNET_SERVER_PORT.to_string(),
        "--lab",
        lab.names.prefix(),
    ]
    .map(String::from);
    let ns = lab.names.internet_ns();
    let log = lab.dir.echo_log("internet");
    state.internet_server = Some(spawn_in_netns(&ns, &lab.self_exe, &args, &log)?);
    state.save(&lab.dir)?;
    println!(
        "internet: {ns} server http://{server}:{} (no route to the pods)",
        names::INTERNET_SERVER_PORT
    );
    Ok(())
}

/// Waits (bounded) until `node`'s agent has written the pods' MTU file the
/// plugin reads, so that the node's pods get the encapsulation's MTU.
fn wait_for_mtu_file(lab: &Lab, node: &str) {
    let file = lab.dir.agent_mtu_file(node);
    let start = std::time::Instant::now();
    while !file.is_file() {
        if start.elapsed() > MTU_FILE_DEADLINE {
            println!(
                "WARNING: {node}'s agent wrote no {} within {MTU_FILE_DEADLINE:?}: its pods take the plugin's own MTU guess",
                file.display()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every agent reports a BGP session Established with every
/// other node (what `tabbyctl node status` shows), so that `status` right
/// after `up` shows no peer missing; prints how long it took.
pub fn wait_for_sessions(lab: &Lab, state: &LabState) {
    let start = Instant::now();
    let all_up = |node: &crate::state::NodeState| -> bool {
        let Some(peers) = agent::sessions(&agent::socket(lab, state, &node.name)) else {
            return false;
        };
        state
            .nodes
            .iter()
            .filter(|other| other.name != node.name)
            .all(|other| {
                peers
                    .iter()
                    .any(|(addr, established)| *established && *addr == other.address.to_string())
            })
    };
    if poll_until(CONVERGENCE_DEADLINE, Duration::from_millis(50), || {
        state.nodes.iter().all(all_up)
    }) {
        println!(
            "bgp: every node has its {} sessions Established (waited {:.1?})",
            state.nodes.len().saturating_sub(1),
            start.elapsed()
        );
    } else {
        let lagging: Vec<&str> = state
            .nodes
            .iter()
            .filter(|n| !all_up(n))
            .map(|n| n.name.as_str())
            .collect();
        println!(
            "WARNING: after {CONVERGENCE_DEADLINE:?} {} still miss BGP sessions: see `tabby-lab status` and the agent logs",
            lagging.join(", ")
        );
    }
}

/// How long `up` waits for BGP to spread every block to every node.
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(30);
/// How long an agent gets to write its MTU file before its pods are made.
const MTU_FILE_DEADLINE: Duration = Duration::from_secs(10);

/// Waits until every node's kernel holds a `proto 201` route for every block
/// (a blackhole for its own, a route via its owner for the others), so that
/// the lab is usable across nodes when `up` returns; prints how long it took.
fn wait_for_routes(state: &LabState) {
    let mask = u32::MAX << (32 - u32::from(BLOCK_SIZE));
    let blocks: BTreeSet<u32> = state
        .pods
        .iter()
        .filter_map(|p| p.ip)
        .map(|ip| u32::from(ip) & mask)
        .collect();
    let start = Instant::now();
    let count = |ns: &str| -> usize {
        sh::run({
            let mut c = Command::new("ip");
            c.args(["-n", ns, "route", "show", "proto", "201"]);
            c
        })
        .map(|out| out.lines().count())
        .unwrap_or(0)
    };
    let converged = poll_until(CONVERGENCE_DEADLINE, Duration::from_millis(50), || {
        state.nodes.iter().all(|n| count(&n.netns) >= blocks.len())
    });
    if converged {
        println!(
            "routes: every node has all {} block routes (waited {:.1?} after the pods)",
            blocks.len(),
            start.elapsed()
        );
    } else {
        let lagging: Vec<&str> = state
            .nodes
            .iter()
            .filter(|n| count(&n.netns) < blocks.len())
            .map(|n| n.name.as_str())
            .collect();
        println!(
            "WARNING: after {CONVERGENCE_DEADLINE:?} {} still miss block routes: see `tabby-lab status` and the agent logs",
            lagging.join(", ")
        );
    }
}

/// Refuses to build over an existing lab with the same state dir or prefix.
pub fn refuse_existing(lab: &Lab) -> anyhow::Result<()> {
    if let Ok(Some(_)) = LabState::load(&lab.dir) {
        anyhow::bail!(
            "a lab is already up with state in {}: run `tabby-lab down` first",
            lab.dir.root().display()
        );
    }
    let leftovers: Vec<String> = list_netns()
        .into_iter()
        .filter(|ns| lab.names.owns_ns(ns))
        .collect();
    if !leftovers.is_empty() {
        anyhow::bail!(
            "namespaces of a lab with prefix {:?} exist ({}): run `tabby-lab --prefix {} down` first",
            lab.names.prefix(),
            leftovers.join(", "),
            lab.names.prefix()
        );
    }
    Ok(())
}

/// Creates the datastore with the pod pool, through `tabbyctl` like an operator.
pub fn create_datastore(lab: &Lab, pool: PoolOptions) -> anyhow::Result<()> {
    let mut cmd = Command::new(lab.bin_dir.join("tabbyctl"));
    cmd.arg("--datastore").arg(lab.dir.datastore());
    create_pool(cmd, pool)?;
    println!("datastore: {}", lab.dir.datastore().display());
    Ok(())
}

/// `tabbyctl ... pool create` of the lab's pool, with `tabbyctl`'s
/// datastore arguments already in `cmd`.
pub fn create_pool(mut cmd: Command, pool: PoolOptions) -> anyhow::Result<()> {
    let (ipip, vxlan) = pool.encap.pool_modes();
    cmd.args([
        "pool",
        "create",
        "--name",
        POOL_NAME,
        "--cidr",
        POOL_CIDR,
        "--block-size",
    ])
    .arg(BLOCK_SIZE.to_string())
    .args(["--ipip-mode", ipip, "--vxlan-mode", vxlan]);
    if pool.nat_outgoing {
        cmd.arg("--nat-outgoing");
    }
    sh::run(cmd).context("creating the IP pool")?;
    println!(
        "pool {POOL_NAME} {POOL_CIDR}, blocks /{BLOCK_SIZE}, ipipMode {ipip}, vxlanMode {vxlan}, natOutgoing {}",
        pool.nat_outgoing
    );
    Ok(())
}

/// The pods table: name, node, address, readiness, namespace, labels.
pub fn print_pods(state: &LabState) {
    let rows: Vec<[String; 6]> = state
        .pods
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.node.clone(),
                p.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
                if p.ready { "yes" } else { "no" }.to_string(),
                p.netns.clone(),
                p.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    print_table(["POD", "NODE", "IP", "READY", "NETNS", "LABELS"], &rows);
}

/// Prints left-aligned columns sized to their widest cell.
pub fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
