//! `status`, `kubectl` and `exec` in a Kubernetes lab.

use std::ffi::OsString;
use std::process::ExitStatus;

use anyhow::Context;

use super::kubectl::Kubectl;
use super::{cluster_path, node::Node};
use crate::names;
use crate::state::LabState;
use crate::Lab;

/// Runs the cluster's kubectl with `args` (stdin, stdout, stderr passed through).
pub fn kubectl(lab: &Lab, state: &LabState, args: &[OsString]) -> anyhow::Result<ExitStatus> {
    anyhow::ensure!(
        state.kubernetes.is_some(),
        "the lab in {} is a namespace lab: `tabby-lab kubectl` needs `up --kubernetes`",
        lab.dir.root().display()
    );
    Kubectl::new(&lab.dir)?.interactive(args)
}

/// The processes, the kubeconfig, then `kubectl get nodes,pods -o wide -A`;
/// with Tabby, each node's agent status, routes and rules, and the IPAM blocks.
pub fn status(lab: &Lab, state: &LabState) -> anyhow::Result<()> {
    let kube = state.kubernetes.as_ref().context("not a Kubernetes lab")?;
    println!(
        "=== control plane ({}, {})",
        lab.names.control_plane_ns(),
        super::control_plane::cluster_url()
    );
    for c in &kube.control_plane {
        println!("{:<24} {}", c.name, describe(&c.process));
    }
    for node in &kube.nodes {
        let cidr = node.pod_cidr.as_deref().unwrap_or("-");
        println!(
            "=== {} (cgroup {}, pod CIDR {cidr})",
            node.name, node.cgroup_root
        );
        for c in &node.components {
            println!("{:<24} {}", c.name, describe(&c.process));
        }
    }
    println!("\nkubeconfig: {}", lab.dir.kubeconfig().display());
    println!(
        "  kubectl --kubeconfig {} get nodes   (or: tabby-lab kubectl get nodes)\n",
        lab.dir.kubeconfig().display()
    );
    let out = Kubectl::new(&lab.dir)?
        .run(&["get", "nodes,pods", "-o", "wide", "-A"])
        .unwrap_or_else(|e| format!("(kubectl failed: {e:#})\n"));
    print!("{out}");
    if kube.cni == super::CniMode::Tabby {
        println!();
        for node in &state.nodes {
            println!("=== {} ({}, {})", node.name, node.netns, node.address);
            crate::status::node_dataplane(lab, state, node);
        }
        crate::status::ipam(lab, state);
    }
    if !state.complete {
        println!("\nWARNING: `up` did not finish: the cluster may be half-built (`tabby-lab down` removes it).");
    }
    Ok(())
}

fn describe(p: &crate::process::ProcRef) -> String {
    match p.alive() {
        true => format!("running (pid {})", p.pid),
        false => format!("NOT running (pid {} exited)", p.pid),
    }
}

/// Runs `command` on node `target` (its network, mount and UTS namespaces),
/// or in the control plane's or external client's network namespace.
pub fn exec(
    lab: &Lab,
    state: &LabState,
    target: &str,
    command: &[OsString],
) -> anyhow::Result<ExitStatus> {
    anyhow::ensure!(
        !command.is_empty(),
        "nothing to run: tabby-lab exec {target} -- CMD [ARGS...]"
    );
    let Some(node) = state.node(target) else {
        let ns = match target {
            "control-plane" => lab.names.control_plane_ns(),
            "external" => lab.names.external_ns(),
            "underlay" => lab.names.underlay_ns(),
            _ => anyhow::bail!(
                "no node {target:?} in the lab (nodes: {}; or control-plane, external, underlay); pods: `tabby-lab kubectl exec POD -- CMD`",
                state.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        let mut cmd = crate::sh::in_netns(&ns, &command[0]);
        cmd.args(&command[1..]).env("PATH", cluster_path());
        return cmd
            .status()
            .with_context(|| format!("running {:?} in {ns}", command[0]));
    };
    let group = lab.names.node_cgroup(&node.name);
    let n = Node {
        name: &node.name,
        netns: &node.netns,
        address: node.address,
        cgroup: &group,
        dir: &lab.dir,
    };
    anyhow::ensure!(
        n.mnt().exists() && names::netns_path(&node.netns).exists(),
        "{target}'s namespaces are gone"
    );
    let mut cmd = n.command(&command[0]);
    cmd.args(&command[1..]);
    cmd.status()
        .with_context(|| format!("running {:?} on {target}", command[0]))
}
