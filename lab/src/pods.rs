//! Pods: a fresh namespace, the real CNI plugin's ADD, an echo server.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;

use crate::agent::probe_tcp;
use crate::cni::{self, Invocation};
use crate::names::valid_pod_name;
use crate::process::{poll_until, spawn_in_netns, stop_all, TERM_GRACE};
use crate::sh::{add_netns, del_netns, netns_exists};
use crate::state::{LabState, PodState};
use crate::Lab;

/// The echo server's port in every pod.
pub const ECHO_PORT: u16 = 8080;
/// How long a new echo server gets to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The labels every lab pod carries: `app=echo`, `tabby.dev/node=<node>`.
pub fn default_labels(node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_string(), "echo".to_string()),
        ("tabby.dev/node".to_string(), node.to_string()),
    ])
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    text.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("label {kv:?} is not key=value"))?;
            anyhow::ensure!(!k.trim().is_empty(), "label {kv:?} has an empty key");
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Creates pod `name` on `node`: records it, makes its namespace, runs CNI
/// ADD in the node, starts its echo server and waits until it answers.
/// On failure everything made for the pod is undone and its record dropped.
pub fn add(
    lab: &Lab,
    state: &mut LabState,
    node: &str,
    name: &str,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<Ipv4Addr> {
    anyhow::ensure!(
        valid_pod_name(name),
        "invalid pod name {name:?}: use lowercase letters, digits and '-'"
    );
    anyhow::ensure!(state.pod(name).is_none(), "pod {name} already exists");
    let node_ns = state
        .node(node)
        .with_context(|| format!("no node {node} in the lab"))?
        .netns
        .clone();
    state.pods.push(PodState {
        name: name.to_string(),
        node: node.to_string(),
        netns: lab.names.pod_ns(name),
        container_id: name.to_string(),
        ip: None,
        labels,
        echo: None,
        ready: false,
    });
    state.save(&lab.dir)?;
    match build(lab, state, &node_ns, name) {
        Ok(ip) => Ok(ip),
        Err(e) => {
            if let Err(undo) = remove(lab, state, name) {
                eprintln!("warning: undoing the half-made pod {name}: {undo:#}");
            }
            Err(e)
        }
    }
}

/// The steps of [`add`] after the pod is recorded.
fn build(lab: &Lab, state: &mut LabState, node_ns: &str, name: &str) -> anyhow::Result<Ipv4Addr> {
    let pod = state.pod(name).expect("recorded by add").clone();
    add_netns(&pod.netns)?;
    let inv = Invocation {
        command: "ADD",
        node_ns,
        node: &pod.node,
        pod_ns: &pod.netns,
        pod: &pod.container_id,
    };
    let result = cni::invoke(&inv, &lab.bin_dir, &lab.dir)?;
    let ip = cni::result_ipv4(&result)
        .with_context(|| format!("the CNI result for {name} has no IPv4 address: {result}"))?;
    state.pod_mut(name).expect("recorded").ip = Some(ip);
    state.save(&lab.dir)?;

    let args = [
        "echo-server",
        "--name",
        name,
        "--port",
        &ECHO_PORT.to_string(),
        "--lab",
        lab.names.prefix(),
    ]
    .map(String::from);
    let echo = spawn_in_netns(&pod.netns, &lab.self_exe, &args, &lab.dir.echo_log(name))?;
    state.pod_mut(name).expect("recorded").echo = Some(echo.clone());
    state.save(&lab.dir)?;

    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, ECHO_PORT));
    let ready = poll_until(READY_TIMEOUT, Duration::from_millis(20), || {
        probe_tcp(&pod.netns, local).unwrap_or(false) || !echo.alive()
    }) && echo.alive();
    anyhow::ensure!(
        ready,
        "the echo server of {name} did not start (see {})",
        lab.dir.echo_log(name).display()
    );
    state.pod_mut(name).expect("recorded").ready = true;
    state.save(&lab.dir)?;
    Ok(ip)
}

/// Deletes pod `name`: stops its echo server, runs CNI DEL, deletes its
/// namespace and drops its record. Every step runs even if one fails.
pub fn remove(lab: &Lab, state: &mut LabState, name: &str) -> anyhow::Result<()> {
    let pod = state
        .pod(name)
        .with_context(|| format!("no pod {name} in the lab"))?
        .clone();
    let mut errors = Vec::new();
    if let Some(echo) = &pod.echo {
        stop_all(std::slice::from_ref(echo), TERM_GRACE);
    }
    if let Err(e) = cni_del(lab, state, &pod) {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = del_netns(&pod.netns) {
        errors.push(format!("{e:#}"));
    }
    state.pods.retain(|p| p.name != name);
    state.namespaces.retain(|ns| *ns != pod.netns);
    state.save(&lab.dir)?;
    match errors.is_empty() {
        true => Ok(()),
        false => Err(anyhow::anyhow!(
            "deleting pod {name}: {}",
            errors.join("; ")
        )),
    }
}

/// CNI DEL of `pod` in its node; nothing to do when the node is gone (its
/// namespace took the host side of the pod's veth with it).
pub fn cni_del(lab: &Lab, state: &LabState, pod: &PodState) -> anyhow::Result<()> {
    let Some(node) = state.node(&pod.node) else {
        return Ok(());
    };
    if !netns_exists(&node.netns) {
        return Ok(());
    }
    let inv = Invocation {
        command: "DEL",
        node_ns: &node.netns,
        node: &node.name,
        pod_ns: &pod.netns,
        pod: &pod.container_id,
    };
    cni::invoke(&inv, &lab.bin_dir, &lab.dir).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_from_a_comma_list() {
        let l = parse_labels("app=web, tier=front,").unwrap();
        assert_eq!(l.get("app").unwrap(), "web");
        assert_eq!(l.get("tier").unwrap(), "front");
        assert!(parse_labels("nokey").is_err());
        assert!(parse_labels("=v").is_err());
        assert_eq!(
            default_labels("node-2").get("tabby.dev/node").unwrap(),
            "node-2"
        );
    }
}
