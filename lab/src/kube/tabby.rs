//! `--cni tabby`: Tabby as the cluster's network, installed by the lab
//! (main has no `deploy/tabby.yaml` DaemonSet yet). Per node: the `tabby`
//! and `tabby-ipam` plugins (and upstream `loopback`, which containerd's
//! CRI runs for every sandbox) in the node's private `/opt/cni/bin`, a
//! conflist in its private `/etc/cni/net.d` naming the node and the lab's
//! file datastore, and the node's `tabby-node` agent (BGP full mesh and the
//! embedded service proxy, which reads the relayed Services: [`super::sync`]).
//! No kube-proxy runs.

use std::fs;

use anyhow::Context;
use serde_json::{json, Value};

use super::node::Node;
use super::{mounts, upstream};
use crate::cni::{self, NETWORK};
use crate::state::{write_atomic, StateDir};

/// The conflist's file name.
pub const CONFLIST: &str = "10-tabby.conflist";

/// The pods' MTU under `--kubernetes` (VXLAN-sized, so every encapsulation fits).
pub const KUBE_MTU: u32 = 1450;

/// The conflist containerd hands the plugin on `node`: the namespace
/// lab's network config, as a list.
pub fn conflist(node: &str, dir: &StateDir) -> Value {
    let mut plugin = cni::net_conf(node, dir);
    let version = plugin["cniVersion"].take();
    if let Some(obj) = plugin.as_object_mut() {
        obj.remove("cniVersion");
        obj.remove("name");
        // The agent here runs from the DaemonSet, not the namespace lab's
        // config: no per-node MTU file; keep a VXLAN-sized MTU.
        obj.remove("mtuFile");
        obj.insert("mtu".into(), json!(KUBE_MTU));
    }
    json!({ "cniVersion": version, "name": NETWORK, "plugins": [plugin] })
}

/// Copies the plugins into the node's `/opt/cni/bin`, then writes the
/// conflist (last and atomically: the node turns Ready on it).
pub fn install_cni(node: &Node<'_>, bin_dir: &std::path::Path) -> anyhow::Result<()> {
    let root = node.root();
    let plugins = mounts::private_dir(&root, "/opt/cni/bin").expect("a private dir");
    let sources = [
        ("tabby", bin_dir.join("tabby")),
        ("tabby-ipam", bin_dir.join("tabby-ipam")),
        ("loopback", upstream("loopback")?),
    ];
    for (name, from) in sources {
        let to = plugins.join(name);
        fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    let conf_dir = mounts::private_dir(&root, "/etc/cni/net.d").expect("a private dir");
    let text = serde_json::to_string_pretty(&conflist(node.name, node.dir))?;
    write_atomic(&conf_dir.join(CONFLIST), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conflist_names_the_node_and_the_labs_datastore() {
        let dir = StateDir::new("/s");
        let conf = conflist("node-2", &dir);
        assert_eq!(conf["name"], NETWORK);
        assert_eq!(conf["cniVersion"], "1.1.0");
        let plugin = &conf["plugins"][0];
        assert_eq!(plugin["type"], "tabby");
        assert_eq!(plugin["nodename"], "node-2");
        assert!(plugin.get("name").is_none() && plugin.get("cniVersion").is_none());
        assert_eq!(plugin["ipam"]["datastore"]["path"], "/s/datastore");
    }
}
