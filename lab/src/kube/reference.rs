//! `--cni reference`: the cluster's network from upstream reference parts,
//! the baseline Tabby is compared with. Per node: the `ptp` and
//! `host-local` plugins (v1.10, from the upstream cache) with the node's
//! own pod subnet 10.244.<i>.0/24, a route to every other node's subnet via
//! that node (set by the lab, as a cloud's route table would), and the real
//! kube-proxy in iptables mode as a process in the node's namespaces.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use tabby_testkit::kube::certs::Pki;

use super::control_plane::{client_kubeconfig, cluster_url};
use super::node::Node;
use super::{mounts, upstream, KubeState};
use crate::process::ProcRef;
use crate::sh::ip;
use crate::state::write_atomic;

/// The cluster's pod CIDR (every node's subnet is in it).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The plugins copied into each node's /opt/cni/bin.
const PLUGINS: [&str; 4] = ["ptp", "host-local", "loopback", "portmap"];
/// The conflist's file name.
pub const CONFLIST: &str = "10-lab-ptp.conflist";

/// Node `index`'s (1-based) pod subnet, 10.244.<index>.0/24.
pub fn pod_cidr(index: usize) -> String {
    format!("10.244.{index}.0/24")
}

/// The ptp + host-local conflist for a node with pod subnet `cidr`: no
/// masquerade (pods see each other's addresses), leases in the node's
/// private /var/lib/cni.
pub fn conflist(cidr: &str) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab-ptp",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": false,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": "/var/lib/cni/networks"
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }))
    .expect("a JSON value serializes")
}

/// Installs the plugins and the conflist into the node's private CNI dirs
/// (from the host side, as an installer would write a node's disk). The
/// conflist goes last and atomically: containerd then sees the network
/// and the kubelet reports the node Ready.
pub fn install_cni(node: &Node<'_>, cidr: &str) -> anyhow::Result<()> {
    let root = node.root();
    let bin_dir = mounts::private_dir(&root, "/opt/cni/bin").expect("a private dir");
    for plugin in PLUGINS {
        let from = upstream(plugin)?;
        let to = bin_dir.join(plugin);
        fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    let conf_dir = mounts::private_dir(&root, "/etc/cni/net.d").expect("a private dir");
    write_atomic(&conf_dir.join(CONFLIST), conflist(cidr).as_bytes())
}

/// Routes on node `netns` to every other node's pod subnet via its address.
pub fn add_routes(netns: &str, others: &[(String, Ipv4Addr)]) -> anyhow::Result<()> {
    for (cidr, via) in others {
        ip(&[
            "-n",
            netns,
            "route",
            "replace",
            cidr,
            "via",
            &via.to_string(),
        ])?;
    }
    Ok(())
}

/// The KubeProxyConfiguration: iptables mode, the node's name, the
/// cluster CIDR (traffic from outside it is masqueraded), and no
/// conntrack sysctls (global ones are not the lab's to change).
pub fn kube_proxy_config(kubeconfig: &Path, node: &str) -> String {
    format!(
        r#"# kube-proxy config written by tabby-lab
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: iptables
hostnameOverride: {node}
clusterCIDR: {CLUSTER_CIDR}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = kubeconfig.display()
    )
}

/// Writes kube-proxy's kubeconfig (user `system:kube-proxy`, bound to
/// `system:node-proxier` by default) and config, and starts it on the node.
pub fn start_kube_proxy(
    node: &Node<'_>,
    kube: &mut KubeState,
    pki: &Pki,
) -> anyhow::Result<ProcRef> {
    let root = node.root();
    let kubeconfig = root.join("kube-proxy.kubeconfig");
    client_kubeconfig(pki, &kubeconfig, &cluster_url(), "system:kube-proxy", &[])?;
    let config = root.join("kube-proxy.yaml");
    write_atomic(
        &config,
        kube_proxy_config(&kubeconfig, node.name).as_bytes(),
    )?;
    let args = vec![format!("--config={}", config.display())];
    node.start_component(kube, "kube-proxy", &upstream("kube-proxy")?, &args)
}

/// Whether kube-proxy has programmed node `netns`: the `kubernetes`
/// Service's chain is in its nat table.
pub fn kube_proxy_synced(node: &Node<'_>) -> bool {
    let mut cmd = node.command("iptables-save");
    cmd.args(["-t", "nat"]);
    crate::sh::run(cmd).is_ok_and(|out| out.contains("default/kubernetes:https"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_gets_its_own_subnet_and_a_ptp_host_local_conflist() {
        assert_eq!(pod_cidr(2), "10.244.2.0/24");
        let conf: serde_json::Value = serde_json::from_str(&conflist(&pod_cidr(2))).unwrap();
        assert_eq!(conf["plugins"][0]["type"], "ptp");
        assert_eq!(conf["plugins"][0]["ipMasq"], false);
        assert_eq!(
            conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.2.0/24"
        );
        let proxy = kube_proxy_config(Path::new("/k"), "node-2");
        assert!(
            proxy.contains("mode: iptables\nhostnameOverride: node-2\n"),
            "{proxy}"
        );
    }
}
