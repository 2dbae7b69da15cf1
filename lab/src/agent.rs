//! Each node's `tabby-node` agent: its config file and its start.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::names::{netns_path, UPLINK};
use crate::process::{poll_until, spawn_in_netns, ProcRef};
use crate::state::{write_atomic, NodeState, StateDir};

/// The AS number of the lab's full-mesh iBGP.
pub const AS_NUMBER: u32 = 64512;
/// BGP hold time of the lab's sessions (Calico's default is 90 s; a lab wants
/// a killed agent noticed in seconds).
pub const HOLD_TIME: u16 = 9;
/// Where each agent serves health and readiness, inside its node namespace.
pub const HEALTH_LISTEN: &str = "127.0.0.1:9099";
/// How long a fresh agent gets to either answer on its health port or exit.
const START_WINDOW: Duration = Duration::from_millis(1500);

/// The agent's config file for `node`.
///
/// This is the one place that knows the agent's config format: adjust it
/// here when `tabby-node`'s format changes.
pub fn node_agent_config(node: &NodeState, dir: &StateDir, proxy_mode: &str) -> String {
    format!(
        "# tabby-node config written by tabby-lab\n\
         node_name = {name:?}\n\
         bgp_address = \"{address}\"\n\
         as_number = {AS_NUMBER}\n\
         datastore = {datastore:?}\n\
         uplink = \"{UPLINK}\"\n\
         status_socket = {socket:?}\n\
         health_listen = \"{HEALTH_LISTEN}\"\n\
         mtu_file = {mtu_file:?}\n\
         # short timers: a lab converges in seconds, not minutes\n\
         hold_time = {HOLD_TIME}\n\
         connect_retry = 1\n\
         poll_interval_ms = 200\n\
         \n\
         [proxy]\n\
         mode = {proxy_mode:?}\n\
         resources_dir = {resources:?}\n\
         resources_poll_ms = 100\n\
         min_sync_period_ms = 200\n",
        name = node.name,
        address = node.address,
        datastore = dir.datastore().display().to_string(),
        socket = dir.agent_socket(&node.name).display().to_string(),
        mtu_file = dir.agent_mtu_file(&node.name).display().to_string(),
        resources = dir.resources().display().to_string(),
    )
}

/// How a node's agent came up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStart {
    /// Running and answering on its health port.
    Healthy(ProcRef),
    /// Running, but not (yet) answering on its health port.
    Running(ProcRef),
    /// The binary is not built.
    Missing,
    /// It exited during its first moments; see its log.
    Exited,
}

impl AgentStart {
    /// The process, when one is running.
    pub fn process(&self) -> Option<&ProcRef> {
        match self {
            AgentStart::Healthy(p) | AgentStart::Running(p) => Some(p),
            AgentStart::Missing | AgentStart::Exited => None,
        }
    }

    /// A few words for the progress line.
    pub fn describe(&self, bin: &Path, log: &Path) -> String {
        match self {
            AgentStart::Healthy(p) => format!("agent started (pid {})", p.pid),
            AgentStart::Running(p) => format!(
                "agent started (pid {}, health port not answering yet)",
                p.pid
            ),
            AgentStart::Missing => format!("agent NOT running: {} is not built", bin.display()),
            AgentStart::Exited => format!(
                "agent NOT running: it exited at once, see {}",
                log.display()
            ),
        }
    }
}

/// Writes `node`'s config and starts `tabby-node --config FILE` in its
/// namespace, with its output in the node's log.
pub fn start(
    node: &NodeState,
    dir: &StateDir,
    bin_dir: &Path,
    proxy_mode: &str,
) -> anyhow::Result<AgentStart> {
    let bin = bin_dir.join("tabby-node");
    if !bin.is_file() {
        return Ok(AgentStart::Missing);
    }
    let config = dir.agent_config(&node.name);
    write_atomic(&config, node_agent_config(node, dir, proxy_mode).as_bytes())?;
    let log = dir.agent_log(&node.name);
    let args = vec!["--config".to_string(), config.display().to_string()];
    let Ok(proc) = spawn_in_netns(&node.netns, &bin, &args, &log) else {
        return Ok(AgentStart::Exited);
    };
    let health: SocketAddr = HEALTH_LISTEN.parse().expect("a valid constant address");
    let mut healthy = false;
    let settled = poll_until(START_WINDOW, Duration::from_millis(50), || {
        healthy = probe_tcp(&node.netns, health).unwrap_or(false);
        healthy || !proc.alive()
    });
    Ok(match (settled, healthy, proc.alive()) {
        (_, true, _) => AgentStart::Healthy(proc),
        (_, false, false) => AgentStart::Exited,
        _ => AgentStart::Running(proc),
    })
}

/// Where node `name`'s agent answers `tabbyctl node status`: the lab's
/// socket in the namespace lab; under `--kubernetes` the DaemonSet's
/// agent listens on `/run/tabby/node.sock` of the node's own mount
/// namespace, reached through a process of that node.
pub fn socket(lab: &crate::Lab, state: &crate::state::LabState, name: &str) -> std::path::PathBuf {
    match state
        .kubernetes
        .as_ref()
        .and_then(|k| k.node_root_pid(name))
    {
        Some(pid) => format!("/proc/{pid}/root{NODE_SOCKET}").into(),
        None => lab.dir.agent_socket(name),
    }
}

/// The agent's default status socket (and `tabbyctl node status`'s).
const NODE_SOCKET: &str = "/run/tabby/node.sock";

/// The BGP peers a node's agent reports on its status socket (the JSON
/// `tabbyctl node status` reads), with whether each session is Established.
pub fn sessions(socket: &Path) -> Option<Vec<(String, bool)>> {
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).ok()?;
    let status: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some(
        status["peers"]
            .as_array()?
            .iter()
            .map(|p| {
                let addr = p["peerAddress"].as_str().unwrap_or_default().to_string();
                (addr, p["info"] == "Established")
            })
            .collect(),
    )
}

/// Whether a TCP connect to `addr` succeeds from inside namespace `ns`.
pub fn probe_tcp(ns: &str, addr: SocketAddr) -> anyhow::Result<bool> {
    let handle = tabby_dataplane::NetNs::open(netns_path(ns))
        .with_context(|| format!("opening namespace {ns}"))?;
    let connected = handle
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        .with_context(|| format!("entering namespace {ns}"))?;
    Ok(connected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_config_names_the_node_its_address_and_the_datastore() {
        let node = NodeState {
            name: "node-2".into(),
            netns: "tabby-node-2".into(),
            address: "10.98.0.2".parse().unwrap(),
            agent: None,
        };
        let text = node_agent_config(&node, &StateDir::new("/run/tabby-lab"), "nftables");
        for line in [
            "node_name = \"node-2\"",
            "bgp_address = \"10.98.0.2\"",
            "as_number = 64512",
            "datastore = \"/run/tabby-lab/datastore\"",
            "uplink = \"eth0\"",
            "status_socket = \"/run/tabby-lab/node-2.sock\"",
            "health_listen = \"127.0.0.1:9099\"",
            "mtu_file = \"/run/tabby-lab/node-2.mtu\"",
            "mode = \"nftables\"",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
