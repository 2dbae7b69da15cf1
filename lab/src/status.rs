//! `tabby-lab status` and `tabby-lab exec`.

use std::ffi::OsString;
use std::process::{Command, ExitStatus};

use anyhow::Context;
use tabby_errors::chain;

use crate::sh::{in_netns, netns_exists};
use crate::state::{LabState, NodeState};
use crate::up::print_pods;
use crate::Lab;
use crate::{agent, topology};

/// Prints, per node, its agent's BGP status, its routes and its Tabby nat
/// rules; then the IPAM blocks and the pods.
pub fn status(lab: &Lab, state: &LabState) -> anyhow::Result<()> {
    for node in &state.nodes {
        let agent = match &node.agent {
            Some(p) if p.alive() => format!("agent running (pid {})", p.pid),
            Some(_) => format!(
                "agent NOT running (exited; see {})",
                lab.dir.agent_log(&node.name).display()
            ),
            None => "agent NOT running (never started)".to_string(),
        };
        println!(
            "=== {} ({}, {}) {agent}",
            node.name, node.netns, node.address
        );
        node_dataplane(lab, state, node);
    }

    encapsulation(lab, state);
    ipam(lab, state);
    println!("\n=== pods");
    print_pods(state);
    Ok(())
}

/// A node's `tabbyctl node status` (from its agent's socket), routes,
/// tunnels and the proxy's rules: the part of `status` both lab modes print.
pub fn node_dataplane(lab: &Lab, state: &LabState, node: &NodeState) {
    if !netns_exists(&node.netns) {
        println!("namespace {} is missing\n", node.netns);
        return;
    }
    println!("--- tabbyctl node status");
    let mut cmd = tabbyctl_command(lab, state);
    cmd.args(["node", "status", "--socket"])
        .arg(agent::socket(lab, state, &node.name));
    match cmd.output() {
        Ok(out) if out.status.success() => print!("{}", String::from_utf8_lossy(&out.stdout)),
        Ok(out) => println!(
            "(tabbyctl node status failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => println!("(cannot run tabbyctl: {})", chain(&e)),
    }

    println!("--- ip route");
    print!("{}", capture(in_netns(&node.netns, "ip").arg("route")));
    println!("--- tunnels: {}", tunnels(&node.netns));

    if state.proxy_mode == "nftables" {
        println!("--- nft list table ip tabby-proxy");
        print!(
            "{}",
            capture(in_netns(&node.netns, "nft").args(["list", "table", "ip", "tabby-proxy"]))
        );
    } else {
        println!("--- iptables -t nat -S (TABBY chains)");
        let rules = tabby_nat_rules(&node.netns);
        if rules.is_empty() {
            println!("(no TABBY rules)");
        }
        for rule in rules {
            println!("{rule}");
        }
    }
    println!();
}

/// `tabbyctl ipam show --show-blocks` on the lab's datastore.
pub fn ipam(lab: &Lab, state: &LabState) {
    println!("=== IPAM");
    let mut cmd = tabbyctl_command(lab, state);
    cmd.args(["ipam", "show", "--show-blocks"]);
    print!("{}", capture(&mut cmd));
}

/// The lab's tabbyctl on the lab's datastore: the file datastore of the
/// namespace lab, or the Kubernetes API (admin kubeconfig) under `--kubernetes`.
pub fn tabbyctl_command(lab: &Lab, state: &LabState) -> Command {
    let mut cmd = Command::new(lab.bin_dir.join("tabbyctl"));
    if state.kubernetes.is_some() {
        cmd.args(["--datastore", "kubernetes", "--kubeconfig"])
            .arg(lab.dir.kubeconfig());
    } else {
        cmd.arg("--datastore").arg(lab.dir.datastore());
    }
    cmd
}

/// The pools' modes (the datastore's, which `tabbyctl pool update` may
/// have changed since `up`), the underlay's VXLAN counts and who reached
/// the internet.
fn encapsulation(lab: &Lab, state: &LabState) {
    println!(
        "=== encapsulation (up: --subnets {} --encap {})",
        state.subnets,
        state.encap.as_str()
    );
    let mut cmd = Command::new(lab.bin_dir.join("tabbyctl"));
    cmd.arg("--datastore")
        .arg(lab.dir.datastore())
        .args(["pool", "list"]);
    print!("{}", capture(&mut cmd));
    match topology::vxlan_counts(&lab.names) {
        Ok((bridged, routed)) => println!(
            "underlay UDP 4789 packets: {bridged} within a subnet, {routed} between subnets"
        ),
        Err(e) => println!("underlay UDP 4789 packets: unknown ({e:#})"),
    }
    if netns_exists(&lab.names.internet_ns()) {
        match topology::internet_syn_sources(&lab.names) {
            Ok(sources) => println!(
                "internet {}: TCP SYNs seen from [{}]",
                lab.names.internet_ns(),
                sources
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => println!("internet: SYN sources unknown ({e:#})"),
        }
    }
    println!();
}

/// The tunnel devices of a node: state, MTU and packet counts, one phrase each.
fn tunnels(ns: &str) -> String {
    let phrases: Vec<String> = ["vxlan.tabby", "tunl0"]
        .iter()
        .map(|dev| {
            let out = in_netns(ns, "ip")
                .args(["-j", "-s", "link", "show", "dev", dev])
                .output();
            let link = out
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .and_then(|v| v.get(0).cloned());
            match link {
                None => format!("{dev} absent"),
                Some(l) => format!(
                    "{dev} {} mtu {} rx {} tx {} packets",
                    l["operstate"].as_str().unwrap_or("?"),
                    l["mtu"],
                    l["stats64"]["rx"]["packets"],
                    l["stats64"]["tx"]["packets"]
                ),
            }
        })
        .collect();
    phrases.join("; ")
}

/// Runs the lab's `tabbyctl --datastore <the lab's> ARGS...`.
pub fn tabbyctl(lab: &Lab, state: &LabState, args: &[OsString]) -> anyhow::Result<ExitStatus> {
    tabbyctl_command(lab, state)
        .args(args)
        .status()
        .with_context(|| format!("running {}", lab.bin_dir.join("tabbyctl").display()))
}

/// The nat table's rules that mention TABBY, from whichever iptables
/// backend holds them (the agent may use legacy or nft).
fn tabby_nat_rules(ns: &str) -> Vec<String> {
    for tool in ["iptables", "iptables-legacy"] {
        let text = capture(in_netns(ns, tool).args(["-t", "nat", "-S"]));
        let rules: Vec<String> = text
            .lines()
            .filter(|l| l.contains("TABBY"))
            .map(str::to_string)
            .collect();
        if !rules.is_empty() {
            return rules;
        }
    }
    Vec::new()
}

/// Runs `cmd` and returns its output, or a line saying why there is none.
fn capture(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => format!(
            "({} failed: {})\n",
            cmd.get_program().to_string_lossy(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!(
            "(cannot run {}: {})\n",
            cmd.get_program().to_string_lossy(),
            chain(&e)
        ),
    }
}

/// The namespace of `target`: a pod, a node, `external`, `internet` or `underlay`.
pub fn target_netns(lab: &Lab, state: Option<&LabState>, target: &str) -> anyhow::Result<String> {
    let from_state = state.and_then(|s| {
        s.pod(target)
            .map(|p| p.netns.clone())
            .or_else(|| s.node(target).map(|n| n.netns.clone()))
    });
    let ns = match (from_state, target) {
        (Some(ns), _) => ns,
        (None, "external") => lab.names.external_ns(),
        (None, "internet") => lab.names.internet_ns(),
        (None, "underlay") => lab.names.underlay_ns(),
        (None, t) if t.starts_with("node-") => lab.names.node_ns(t),
        (None, t) => lab.names.pod_ns(t),
    };
    anyhow::ensure!(
        netns_exists(&ns),
        "no pod, node or client {target:?} in the lab (namespace {ns} does not exist)"
    );
    Ok(ns)
}

/// Runs `command` in `target`'s namespace with the lab's binaries first on
/// PATH (so `tabby-lab http-get` and `tabbyctl` work there), and returns
/// its exit status.
pub fn exec(
    lab: &Lab,
    state: Option<&LabState>,
    target: &str,
    command: &[OsString],
) -> anyhow::Result<ExitStatus> {
    anyhow::ensure!(
        !command.is_empty(),
        "nothing to run: tabby-lab exec {target} -- CMD [ARGS...]"
    );
    let ns = target_netns(lab, state, target)?;
    let mut path = OsString::from(lab.self_exe.parent().unwrap_or(&lab.bin_dir));
    path.push(":");
    path.push(&lab.bin_dir);
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    let mut cmd = in_netns(&ns, &command[0]);
    cmd.args(&command[1..]).env("PATH", path);
    cmd.status()
        .with_context(|| format!("running {:?} in {ns}", command[0]))
}
