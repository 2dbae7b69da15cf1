//! `tabby-lab up --kubernetes`: a real Kubernetes cluster on one machine,
//! like kind but with namespaces instead of containers as nodes.
//!
//! ```text
//!  host netns                       tabby-underlay (br0 10.98.0.254/24)
//!  127.0.0.1:PORT ── forward ──┐   ┌────────────┬─────────────┬──────────────┐
//!  (<state>/kubeconfig)        └─> control-plane  node-1        node-N         external
//!                                  10.98.0.250    10.98.0.1     10.98.0.N      10.98.0.200
//!                                  etcd           containerd    containerd
//!                                  apiserver:6443 kubelet       kubelet
//!                                  controller-mgr (kube-proxy)  (kube-proxy)
//!                                  scheduler      own mount + UTS namespace,
//!                                                 cgroup /<prefix>-node-<i>
//! ```
//!
//! The control plane has a namespace of its own on the underlay, so that
//! the kubelets reach the apiserver and the apiserver reaches the kubelets
//! (logs, exec) without touching the host's network; the host reaches it
//! through a small TCP forwarder on 127.0.0.1 ([`forward`]), as kind's port
//! mapping does. Every process is detached from `tabby-lab` and recorded in
//! the state file before `up` goes on; `down` finds what a crash left by the
//! prefix's names (namespaces, cgroups) and the mounts under the state dir.
//!
//! Modules: [`control_plane`] (PKI, etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler), [`node`] (mount + UTS
//! namespace, containerd, kubelet), [`cgroup`], [`mounts`], [`images`] and
//! [`oci`] (the images, built from static binaries) with [`host_tools`]
//! (the tabby image's netfilter tools), [`reference`] (ptp + host-local +
//! kube-proxy), [`tabby`] (Tabby installed by its DaemonSet), [`kubectl`],
//! [`up`], [`down`].

pub mod cgroup;
pub mod control_plane;
pub mod down;
pub mod forward;
pub mod host_tools;
pub mod images;
pub mod kubectl;
pub mod mounts;
pub mod node;
pub mod oci;
pub mod reference;
pub mod status;
pub mod tabby;
pub mod up;

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::process::ProcRef;
use crate::state::StateDir;

/// The cluster's pod network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CniMode {
    /// Tabby, installed by `kubectl apply -f deploy/tabby.yaml`.
    Tabby,
    /// The upstream reference plugins `ptp` + `host-local` with routes set
    /// by the lab, and the real kube-proxy: the baseline for comparisons.
    Reference,
}

/// What a Kubernetes lab made, beside [`crate::state::LabState`]'s namespaces.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubeState {
    /// The pod network.
    pub cni: CniMode,
    /// The host port of the apiserver forwarder (127.0.0.1), once chosen.
    #[serde(default)]
    pub host_port: Option<u16>,
    /// etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the forwarder.
    #[serde(default)]
    pub control_plane: Vec<Component>,
    /// The nodes' Kubernetes side.
    #[serde(default)]
    pub nodes: Vec<KubeNode>,
}

/// One process of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Component {
    /// e.g. `kube-apiserver`.
    pub name: String,
    /// The process.
    pub process: ProcRef,
}

/// A node's Kubernetes side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubeNode {
    /// e.g. `node-1`.
    pub name: String,
    /// The kubelet's cgroupRoot, e.g. `/tabby-node-1`.
    pub cgroup_root: String,
    /// containerd, kubelet and (reference CNI) kube-proxy.
    #[serde(default)]
    pub components: Vec<Component>,
    /// The node's pod CIDR (reference CNI).
    #[serde(default)]
    pub pod_cidr: Option<String>,
}

impl KubeState {
    /// A fresh record for a cluster with `cni`.
    pub fn new(cni: CniMode) -> KubeState {
        KubeState {
            cni,
            host_port: None,
            control_plane: Vec::new(),
            nodes: Vec::new(),
        }
    }

    /// Every recorded process, nodes first (kubelets before the apiservers they talk to).
    pub fn processes(&self) -> Vec<ProcRef> {
        let nodes = self.nodes.iter().flat_map(|n| n.components.iter().rev());
        nodes
            .chain(self.control_plane.iter().rev())
            .map(|c| c.process.clone())
            .collect()
    }

    /// A live process of node `name` (its containerd): its `/proc/PID/root`
    /// is the node's file system view.
    pub fn node_root_pid(&self, name: &str) -> Option<i32> {
        let node = self.nodes.iter().find(|n| n.name == name)?;
        let c = node.components.iter().find(|c| c.name == "containerd")?;
        c.process.alive().then_some(c.process.pid)
    }

    /// The node called `name`, mutably.
    pub fn node_mut(&mut self, name: &str) -> Option<&mut KubeNode> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }
}

/// The Kubernetes lab's paths inside the state directory.
impl StateDir {
    /// The admin kubeconfig, for the host (`tabby-lab kubectl`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.root().join("kubeconfig")
    }

    /// The control plane's directory: PKI, etcd data, kubeconfigs, logs.
    pub fn control_plane_dir(&self) -> PathBuf {
        self.root().join("control-plane")
    }

    /// A node's directory: containerd's root, the kubelet's files, its private dirs.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root().join("nodes").join(node)
    }

    /// The directory of the nodes' persistent mount and UTS namespaces.
    pub fn ns_dir(&self) -> PathBuf {
        self.root().join("ns")
    }

    /// A node's mount namespace (a bind mount of its nsfs file).
    pub fn mount_ns(&self, node: &str) -> PathBuf {
        self.ns_dir().join(format!("{node}.mnt"))
    }

    /// A node's UTS namespace.
    pub fn uts_ns(&self, node: &str) -> PathBuf {
        self.ns_dir().join(format!("{node}.uts"))
    }
}

/// Prints a step of `up` with the time since it started.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
}

impl Progress {
    /// Starts the clock.
    pub fn start() -> Progress {
        Progress {
            start: Instant::now(),
        }
    }

    /// `[  12.3s] what`.
    pub fn step(&self, what: impl std::fmt::Display) {
        println!("[{:>6.1}s] {what}", self.start.elapsed().as_secs_f64());
    }
}

/// The upstream binary `name` (from `TABBY_UPSTREAM_BIN`, else
/// /var/cache/tabby/bin), or an error naming the script that builds it.
pub fn upstream(name: &str) -> anyhow::Result<PathBuf> {
    let path = tabby_testkit::bins::upstream_dir().join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `bash scripts/upstream.sh` first (or set TABBY_UPSTREAM_BIN)",
        path.display()
    );
    Ok(path)
}

/// `PATH` for the cluster's processes: the upstream binaries first, then the system's.
pub fn cluster_path() -> String {
    format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        tabby_testkit::bins::upstream_dir().display()
    )
}
