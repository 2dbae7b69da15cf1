//! The lab's state file, `<state>/lab.json`: everything the lab made, written
//! *before* each thing is made so that `down` can clean up after a crash.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::encap::Encap;
use crate::kube::KubeState;
use crate::process::ProcRef;

/// The lab's state directory and the paths inside it.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root` (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `lab.json`.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("lab.json")
    }

    /// The lock that serializes the lab's mutating commands.
    fn lock_file(&self) -> PathBuf {
        self.root.join("lab.lock")
    }

    /// The cluster's file datastore.
    pub fn datastore(&self) -> PathBuf {
        self.root.join("datastore")
    }

    /// The directory of applied Kubernetes objects the agents watch.
    pub fn resources(&self) -> PathBuf {
        self.root.join("resources")
    }

    /// A node agent's config file.
    pub fn agent_config(&self, node: &str) -> PathBuf {
        self.root.join(format!("{node}.toml"))
    }

    /// A node agent's log.
    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.root.join(format!("{node}.log"))
    }

    /// A node agent's status socket (read by `tabbyctl node status`).
    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.root.join(format!("{node}.sock"))
    }

    /// The pods' MTU a node's agent writes (its uplink's less the
    /// encapsulation's overhead); one per node, as every node shares the
    /// host's file system.
    pub fn agent_mtu_file(&self, node: &str) -> PathBuf {
        self.root.join(format!("{node}.mtu"))
    }

    /// The CNI plugin's log on a node.
    pub fn cni_log(&self, node: &str) -> PathBuf {
        self.root.join(format!("cni-{node}.log"))
    }

    /// A pod's echo server log.
    pub fn echo_log(&self, pod: &str) -> PathBuf {
        self.root.join(format!("echo-{pod}.log"))
    }

    /// Takes the lab's exclusive lock (creating the directory), held until
    /// the returned guard is dropped.
    pub fn lock(&self) -> anyhow::Result<Flock<File>> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let path = self.lock_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| anyhow::anyhow!("locking {}: {errno}", path.display()))
    }
}

/// Everything one lab made.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabState {
    /// The prefix of every namespace name.
    pub prefix: String,
    /// Where the `tabby`, `tabby-node` and `tabbyctl` binaries were taken from.
    pub bin_dir: PathBuf,
    /// Every namespace the lab made (or was about to make), in creation order.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// The nodes.
    #[serde(default)]
    pub nodes: Vec<NodeState>,
    /// The pods.
    #[serde(default)]
    pub pods: Vec<PodState>,
    /// Whether `up` got to the end.
    #[serde(default)]
    pub complete: bool,
    /// The Kubernetes side of a `--kubernetes` lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeState>,
    /// Every agent's `[proxy] mode`: `iptables` (the default) or `nftables`.
    #[serde(default = "default_proxy_mode")]
    pub proxy_mode: String,
    /// How many underlay subnets the nodes alternate between (1 or 2).
    #[serde(default = "one")]
    pub subnets: u8,
    /// The default pool's encapsulation at `up` (`--encap`); `tabbyctl pool
    /// update` may have changed it since: the datastore has the truth.
    #[serde(default)]
    pub encap: Encap,
    /// The internet namespace's echo server, once started.
    #[serde(default)]
    pub internet_server: Option<ProcRef>,
}

fn default_proxy_mode() -> String {
    "iptables".into()
}

fn one() -> u8 {
    1
}

/// One node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    /// e.g. `node-1`.
    pub name: String,
    /// The node's namespace, e.g. `tabby-node-1`.
    pub netns: String,
    /// Its underlay address.
    pub address: Ipv4Addr,
    /// Its `tabby-node`, when one was started.
    #[serde(default)]
    pub agent: Option<ProcRef>,
}

/// One pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    /// e.g. `node-1-pod1`.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its namespace, ending with its name.
    pub netns: String,
    /// The CNI container ID.
    pub container_id: String,
    /// Its address, once the plugin returned one.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its echo server, once started.
    #[serde(default)]
    pub echo: Option<ProcRef>,
    /// Whether the echo server answered (only ready pods back services).
    #[serde(default)]
    pub ready: bool,
}

impl LabState {
    /// Reads the state file; `Ok(None)` when there is none.
    pub fn load(dir: &StateDir) -> anyhow::Result<Option<LabState>> {
        let path = dir.state_file();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        Ok(Some(state))
    }

    /// Writes the state file atomically (a reader never sees half of it).
    pub fn save(&self, dir: &StateDir) -> anyhow::Result<()> {
        let path = dir.state_file();
        let json = serde_json::to_vec_pretty(self).context("encoding the lab state")?;
        write_atomic(&path, &json)
    }

    /// Records a namespace before it is created.
    pub fn record_ns(&mut self, ns: &str) {
        if !self.namespaces.iter().any(|n| n == ns) {
            self.namespaces.push(ns.to_string());
        }
    }

    /// The Kubernetes side; only called in a `--kubernetes` lab.
    pub fn kube_mut(&mut self) -> &mut KubeState {
        self.kubernetes
            .as_mut()
            .expect("only a Kubernetes lab has a Kubernetes state")
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The pod called `name`, mutably.
    pub fn pod_mut(&mut self, name: &str) -> Option<&mut PodState> {
        self.pods.iter_mut().find(|p| p.name == name)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node called `name`, mutably.
    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeState> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden and without the final extension, so watchers of `*.yaml` skip it.
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
