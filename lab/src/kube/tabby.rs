//! `--cni tabby`: Tabby installed the operator's way, by `kubectl apply -f
//! deploy/tabby.yaml` (the file unchanged: the lab's image carries the
//! name the file gives). Before it, the lab puts on each node what the
//! node's OS packages would (upstream `loopback` in `/opt/cni/bin`, which
//! containerd's CRI runs for every sandbox) and creates the
//! `tabby-api-endpoint` ConfigMap the manifest reads: the apiserver's own
//! address, as Calico's `kubernetes-services-endpoint` does, because the
//! agents must reach the API before their proxies serve the `kubernetes`
//! Service. The DaemonSet's init container then installs `tabby`,
//! `tabby-ipam`, the conflist and the plugin's kubeconfig into each node's
//! private `/opt/cni/bin` and `/etc/cni/net.d`; the agents peer over BGP
//! and serve every Service (no kube-proxy runs). Last, the lab's pool goes
//! into the Kubernetes datastore.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::kubectl::Kubectl;
use super::node::Node;
use super::{control_plane, mounts, upstream};

/// The manifest, in the workspace.
pub fn manifest() -> PathBuf {
    tabby_testkit::bins::workspace_root().join("deploy/tabby.yaml")
}

/// The namespace `deploy/tabby.yaml` installs into.
pub const NAMESPACE: &str = "kube-system";
/// The DaemonSet's name.
pub const DAEMONSET: &str = "tabby-node";
/// How long the DaemonSet gets to run an agent on every node.
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);

/// What the node's OS provides before any CNI: upstream `loopback`.
pub fn install_loopback(node: &Node<'_>) -> anyhow::Result<()> {
    let bin = mounts::private_dir(&node.root(), "/opt/cni/bin").expect("a private dir");
    let from = upstream("loopback")?;
    fs::copy(&from, bin.join("loopback"))
        .with_context(|| format!("copying {} into {}", from.display(), bin.display()))?;
    Ok(())
}

/// The `tabby-api-endpoint` ConfigMap, then the manifest; waits until its
/// CRDs are Established (so that the pool can be created).
pub fn apply(kubectl: &Kubectl) -> anyhow::Result<()> {
    let host = format!(
        "--from-literal=KUBERNETES_SERVICE_HOST={}",
        control_plane::address()
    );
    let port = format!(
        "--from-literal=KUBERNETES_SERVICE_PORT={}",
        control_plane::APISERVER_PORT
    );
    kubectl
        .run(&[
            "-n",
            NAMESPACE,
            "create",
            "configmap",
            "tabby-api-endpoint",
            &host,
            &port,
        ])
        .context("creating the tabby-api-endpoint ConfigMap")?;
    let file = manifest();
    kubectl
        .run(&["apply", "-f", &file.display().to_string()])
        .with_context(|| format!("kubectl apply -f {}", file.display()))?;
    kubectl
        .run(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ])
        .context("waiting for Tabby's CRDs to be Established")?;
    Ok(())
}

/// `tabbyctl --datastore kubernetes --kubeconfig <admin>`, ready for arguments.
pub fn tabbyctl(bin_dir: &Path, kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(bin_dir.join("tabbyctl"));
    cmd.args(["--datastore", "kubernetes", "--kubeconfig"])
        .arg(kubeconfig);
    cmd
}

/// Waits until the DaemonSet runs a ready agent on every node; on a
/// timeout says which pods are not ready and why.
pub fn wait_rollout(kubectl: &Kubectl) -> anyhow::Result<()> {
    let timeout = format!("--timeout={}s", ROLLOUT_TIMEOUT.as_secs());
    let ds = format!("daemonset/{DAEMONSET}");
    if kubectl
        .run(&["-n", NAMESPACE, "rollout", "status", &ds, &timeout])
        .is_ok()
    {
        return Ok(());
    }
    let pods = kubectl
        .run(&[
            "-n",
            NAMESPACE,
            "describe",
            "pods",
            "-l",
            "app.kubernetes.io/name=tabby",
        ])
        .unwrap_or_else(|e| format!("(kubectl describe failed: {e:#})"));
    anyhow::bail!(
        "the {DAEMONSET} DaemonSet did not become ready within {ROLLOUT_TIMEOUT:?}:\n{}",
        pods
    )
}
