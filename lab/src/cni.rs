//! Calling the real `tabby` CNI plugin exactly as a container runtime does:
//! `CNI_*` environment, the network config on stdin, the result on stdout.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use serde_json::{json, Value};

use crate::names::netns_path;
use crate::sh::{describe, in_netns};
use crate::state::StateDir;

/// The pod network's name, as in Calico's conflist.
pub const NETWORK: &str = "k8s-pod-network";
/// The pods' Kubernetes namespace.
pub const POD_NAMESPACE: &str = "default";
/// The network config a runtime hands the plugin on `node`: the conflist's
/// single entry. The pods' MTU comes from the file `node`'s agent writes
/// (its uplink's less the overhead of the pools' encapsulation).
pub fn net_conf(node: &str, dir: &StateDir) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": NETWORK,
        "type": "tabby",
        "nodename": node,
        "mtuFile": dir.agent_mtu_file(node),
        "log_file": dir.cni_log(node),
        "ipam": {
            "type": "tabby-ipam",
            "datastore": { "type": "file", "path": dir.datastore() },
        },
    })
}

/// One plugin invocation.
#[derive(Debug)]
pub struct Invocation<'a> {
    /// `ADD`, `DEL`, `CHECK`...
    pub command: &'a str,
    /// The node's namespace, where the plugin runs (the "host").
    pub node_ns: &'a str,
    /// The node's name.
    pub node: &'a str,
    /// The pod's namespace.
    pub pod_ns: &'a str,
    /// The pod's name, also its container ID.
    pub pod: &'a str,
}

/// Runs the plugin from `bin_dir` inside the node's namespace and returns
/// its parsed stdout (`null` when it printed nothing, as DEL does).
pub fn invoke(inv: &Invocation<'_>, bin_dir: &Path, dir: &StateDir) -> anyhow::Result<Value> {
    let plugin = bin_dir.join("tabby");
    if !plugin.is_file() {
        anyhow::bail!(
            "the CNI plugin {} is not built: cargo build --release -p tabby-cni",
            plugin.display()
        );
    }
    let cni_path = format!("{}:/usr/lib/cni:/opt/cni/bin", bin_dir.display());
    let mut cmd = in_netns(inv.node_ns, &plugin);
    cmd.env("CNI_COMMAND", inv.command)
        .env("CNI_CONTAINERID", inv.pod)
        .env("CNI_NETNS", netns_path(inv.pod_ns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={}", inv.pod),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = format!("CNI_COMMAND={} {}", inv.command, describe(&cmd));
    let mut child = cmd.spawn().with_context(|| format!("running {line}"))?;
    let conf = serde_json::to_vec(&net_conf(inv.node, dir))?;
    // A plugin that rejects its environment may exit before reading stdin:
    // then its exit status and error object below say why, not the pipe.
    if let Err(e) = child.stdin.take().expect("stdin is piped").write_all(&conf) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).with_context(|| format!("writing the network config to {line}"));
        }
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {line}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A CNI error is a JSON object with a msg (and details) on stdout.
        let why = serde_json::from_str::<Value>(&stdout)
            .ok()
            .map(|e| {
                format!(
                    "{} {}",
                    e["msg"].as_str().unwrap_or(""),
                    e["details"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_else(|| format!("{stdout} {}", String::from_utf8_lossy(&out.stderr)));
        anyhow::bail!(
            "CNI {} of {} on {} failed ({}): {}",
            inv.command,
            inv.pod,
            inv.node,
            out.status,
            why.trim()
        );
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("parsing the result of {line}: {stdout}"))
}

/// The first IPv4 address of a CNI result (`ips[].address`, CIDR form).
pub fn result_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_config_is_the_conflist_entry_for_the_node() {
        let conf = net_conf("node-1", &StateDir::new("/run/tabby-lab"));
        assert_eq!(conf["type"], "tabby");
        assert_eq!(conf["nodename"], "node-1");
        assert_eq!(conf["mtuFile"], "/run/tabby-lab/node-1.mtu");
        assert!(
            conf.get("mtu").is_none(),
            "a fixed MTU would win over the file"
        );
        assert_eq!(conf["log_file"], "/run/tabby-lab/cni-node-1.log");
        assert_eq!(
            conf["ipam"]["datastore"]["path"],
            "/run/tabby-lab/datastore"
        );
    }

    #[test]
    fn the_pod_address_is_read_from_the_result() {
        let result =
            json!({"cniVersion": "1.1.0", "ips": [{"address": "10.244.3.4/32", "interface": 1}]});
        assert_eq!(result_ipv4(&result), Some(Ipv4Addr::new(10, 244, 3, 4)));
        assert_eq!(result_ipv4(&json!({})), None);
    }
}
