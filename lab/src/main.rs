//! `tabby-lab`: a multi-node Tabby cluster on one machine.
//!
//! Nodes and pods are network namespaces: an underlay namespace with a
//! bridge, node namespaces each running a real `tabby-node`, pods made by
//! exec'ing the real `tabby` CNI plugin like a runtime, each pod running an
//! HTTP echo server that answers like traefik/whoami. With `--kubernetes`
//! the nodes run containerd and a kubelet instead, under a real control
//! plane ([`kube`]). See DESIGN.md, "The lab".

mod agent;
mod cni;
mod down;
mod encap;
mod endpoints;
mod kube;
mod names;
mod pods;
mod process;
mod programmed;
mod resources;
mod sh;
mod state;
mod status;
mod topology;
mod up;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::encap::Encap;
use crate::names::Names;
use crate::state::{LabState, StateDir};

/// A multi-node Tabby cluster on one machine, built from network namespaces.
#[derive(Debug, Parser)]
#[command(name = "tabby-lab", version)]
struct Cli {
    /// Prefix of every namespace the lab makes (`<prefix>-node-1`...), so
    /// that several labs can run side by side. Read from the state file
    /// when there is one.
    #[arg(long, global = true, env = "TABBY_LAB_PREFIX")]
    prefix: Option<String>,
    /// The lab's state directory [default: /run/<prefix>-lab].
    #[arg(long, global = true, env = "TABBY_LAB_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Where the `tabby`, `tabby-node` and `tabbyctl` binaries are
    /// [default: beside tabby-lab, else ../release].
    #[arg(long, global = true, env = "TABBY_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the lab: underlay, nodes with their agents, pods.
    Up {
        /// Number of nodes [default: 3, with --kubernetes 2 workers].
        #[arg(long)]
        nodes: Option<usize>,
        /// Pods per node (namespace lab).
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// A real Kubernetes cluster: control plane, containerd and a kubelet per node.
        #[arg(long)]
        kubernetes: bool,
        /// The cluster's pod network (with --kubernetes).
        #[arg(long, value_enum, default_value = "tabby", requires = "kubernetes")]
        cni: kube::CniMode,
        /// Every agent's service proxy mode (namespace lab).
        #[arg(long, default_value = "iptables", value_parser = ["iptables", "nftables"])]
        proxy_mode: String,
        /// Underlay subnets (namespace lab): with 2, nodes alternate between
        /// 10.98.0.0/24 and 10.98.1.0/24, routed by the underlay namespace.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        subnets: u8,
        /// The default pool's encapsulation (namespace lab); ipip needs a
        /// kernel with ipip.
        #[arg(long, value_enum, default_value_t = Encap::None)]
        encap: Encap,
        /// The default pool's natOutgoing (namespace lab): masquerade pod
        /// traffic that leaves the pools and the nodes, as Calico's default pool.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        nat_outgoing: bool,
    },
    /// Run the lab's tabbyctl against its datastore, e.g. `tabbyctl pool update
    /// default-ipv4-ippool --vxlan-mode Always`.
    Tabbyctl {
        /// tabbyctl's arguments (without --datastore).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the cluster's kubectl with the lab's admin kubeconfig (--kubernetes).
    Kubectl {
        /// kubectl's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Show each node's BGP sessions, routes and Tabby nat rules, the IPAM blocks and the pods.
    Status,
    /// Run a command in a pod, a node (node-1) or the external client (external).
    Exec {
        /// Pod name, node name, `external`, `internet` or `underlay`.
        target: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Add or delete a pod.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Store Kubernetes objects (Services, EndpointSlices...) for the node agents.
    Apply {
        /// A multi-document YAML file, `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Remove stored Kubernetes objects.
    Delete {
        /// A multi-document YAML file, `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Stop (SIGKILL, as a crash) or start a node's `tabby-node`.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Remove every namespace, process and file the lab made.
    Down,
    /// The pods' HTTP echo server (run by the lab inside each pod).
    #[command(hide = true)]
    EchoServer {
        /// The pod name reported as `Hostname:`.
        #[arg(long)]
        name: String,
        /// TCP port.
        #[arg(long, default_value_t = pods::ECHO_PORT)]
        port: u16,
        /// The lab the server belongs to (shown in `ps`).
        #[arg(long)]
        lab: Option<String>,
    },
    /// Relay 127.0.0.1 on the host to the apiserver in the control-plane namespace.
    #[command(hide = true)]
    Forward {
        /// Where to listen (the host's network namespace).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The namespace to connect from, e.g. /run/netns/tabby-control-plane.
        #[arg(long)]
        netns: PathBuf,
        /// Where to connect to.
        #[arg(long)]
        to: std::net::SocketAddr,
    },
    /// GET a URL and print the body (fails on errors and non-2xx answers).
    #[command(hide = true)]
    HttpGet {
        /// `http://host[:port][/path]` (IPv6 in brackets: `http://[::1]:8080/`).
        url: String,
        /// Deadline of each request, connecting included.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Make this many requests, each on a new connection, printing every body.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

#[derive(Debug, Subcommand)]
enum PodCommand {
    /// Add a pod on a node (with the labels app=echo, tabby.dev/node=NODE unless --labels).
    Add {
        /// The node, e.g. node-1.
        node: String,
        /// The pod's name.
        name: String,
        /// Labels, `k=v,k2=v2`; `tabby.dev/node` is always added.
        #[arg(long)]
        labels: Option<String>,
    },
    /// Delete a pod (CNI DEL, then its namespace).
    Del {
        /// The pod's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Kill a node's agent with SIGKILL, as a crash would; its routes stay in the kernel.
    Kill {
        /// The node, e.g. node-2.
        node: String,
    },
    /// Start a node's agent again (it cleans up stale routes on start).
    Start {
        /// The node, e.g. node-2.
        node: String,
    },
}

/// What every command needs: names, state directory, binaries.
#[derive(Debug)]
pub struct Lab {
    /// Namespace names from the prefix.
    pub names: Names,
    /// The state directory.
    pub dir: StateDir,
    /// Where `tabby`, `tabby-node` and `tabbyctl` are.
    pub bin_dir: PathBuf,
    /// This executable (the echo server runs it).
    pub self_exe: PathBuf,
}

impl Lab {
    /// Resolves prefix, state directory and binaries from the flags and,
    /// for a lab that is up, its state file.
    fn resolve(cli: &Cli) -> anyhow::Result<(Lab, Option<LabState>)> {
        let self_exe = std::env::current_exe().context("locating tabby-lab itself")?;
        let prefix = cli.prefix.clone().unwrap_or_else(|| "tabby".to_string());
        let dir = StateDir::new(
            cli.state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("/run/{prefix}-lab"))),
        );
        let state = match &cli.command {
            Command::Down | Command::Up { .. } => None,
            _ => LabState::load(&dir)?,
        };
        let prefix = state.as_ref().map(|s| s.prefix.clone()).unwrap_or(prefix);
        let bin_dir = cli
            .bin_dir
            .clone()
            .or_else(|| state.as_ref().map(|s| s.bin_dir.clone()))
            .unwrap_or_else(|| default_bin_dir(&self_exe));
        Ok((
            Lab {
                names: Names::new(&prefix)?,
                dir,
                bin_dir,
                self_exe,
            },
            state,
        ))
    }

    /// The state of a lab that is up, or an error saying there is none.
    fn require(&self, state: Option<LabState>) -> anyhow::Result<LabState> {
        state.with_context(|| {
            format!(
                "no lab is up with state in {} (tabby-lab up, or pass --state-dir)",
                self.dir.root().display()
            )
        })
    }
}

/// The directory of `tabby-lab` when the plugin is beside it, else the
/// sibling `release` directory (a debug tabby-lab with release plugins).
fn default_bin_dir(self_exe: &Path) -> PathBuf {
    let here = self_exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    if here.join("tabby").is_file() {
        return here;
    }
    let release = here.parent().map(|p| p.join("release"));
    match release {
        Some(r) if r.join("tabby").is_file() => r,
        _ => here,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tabby-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::EchoServer { name, port, .. } => {
            return tabby_lab_pods::echo::serve(name, *port).map(|()| ExitCode::SUCCESS)
        }
        Command::HttpGet {
            url,
            timeout_ms,
            count,
        } => {
            let code = tabby_lab_pods::http_get(url, Duration::from_millis(*timeout_ms), *count)?;
            return Ok(ExitCode::from(code));
        }
        Command::Forward { listen, netns, to } => {
            return kube::forward::serve(*listen, netns, *to).map(|()| ExitCode::SUCCESS)
        }
        _ => {}
    }
    let (lab, state) = Lab::resolve(&cli)?;
    match cli.command {
        Command::Up {
            nodes,
            pods_per_node,
            kubernetes: false,
            proxy_mode,
            subnets,
            encap,
            nat_outgoing,
            ..
        } => {
            let opts = up::Options {
                nodes: nodes.unwrap_or(3),
                pods_per_node,
                proxy_mode,
                subnets,
                encap,
                nat_outgoing,
            };
            up::up(&lab, &opts)?
        }
        Command::Up {
            nodes,
            kubernetes: true,
            cni,
            ..
        } => {
            let opts = kube::up::Options {
                nodes: nodes.unwrap_or(2),
                cni,
            };
            kube::up::up(&lab, &opts)?
        }
        Command::Kubectl { args } => {
            let state = lab.require(state)?;
            let status = kube::status::kubectl(&lab, &state, &args)?;
            return Ok(exit_code(status));
        }
        Command::Tabbyctl { args } => {
            let state = lab.require(state)?;
            return Ok(exit_code(status::tabbyctl(&lab, &state, &args)?));
        }
        Command::Status => {
            let state = lab.require(state)?;
            match state.kubernetes.is_some() {
                true => kube::status::status(&lab, &state)?,
                false => status::status(&lab, &state)?,
            }
        }
        Command::Exec { target, command } => {
            let code = match state.as_ref().filter(|s| s.kubernetes.is_some()) {
                Some(state) => kube::status::exec(&lab, state, &target, &command)?,
                None => status::exec(&lab, state.as_ref(), &target, &command)?,
            };
            return Ok(exit_code(code));
        }
        Command::Pod(cmd) => pod(&lab, cmd)?,
        Command::Agent(cmd) => agent_cmd(&lab, cmd)?,
        Command::Apply { file } => apply(&lab, &file, true)?,
        Command::Delete { file } => apply(&lab, &file, false)?,
        Command::Down => down::down(&lab)?,
        Command::EchoServer { .. } | Command::HttpGet { .. } | Command::Forward { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses namespace-lab commands in a Kubernetes lab.
fn namespace_lab_only(state: &LabState, command: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        state.kubernetes.is_none(),
        "`tabby-lab {command}` is for the namespace lab; in a Kubernetes lab use `tabby-lab kubectl`"
    );
    Ok(())
}

/// `pod add` / `pod del`, under the lab's lock, then the EndpointSlices.
fn pod(lab: &Lab, cmd: PodCommand) -> anyhow::Result<()> {
    let _lock = lab.dir.lock()?;
    let mut state = lab.require(LabState::load(&lab.dir)?)?;
    namespace_lab_only(&state, "pod")?;
    match cmd {
        PodCommand::Add { node, name, labels } => {
            let mut all = labels
                .as_deref()
                .map(pods::parse_labels)
                .transpose()?
                .unwrap_or_else(|| pods::default_labels(&node));
            all.insert("tabby.dev/node".to_string(), node.clone());
            let ip = pods::add(lab, &mut state, &node, &name, all)?;
            println!("pod {name} {ip} on {node}");
        }
        PodCommand::Del { name } => {
            pods::remove(lab, &mut state, &name)?;
            println!("pod {name} deleted");
        }
    }
    resources::sync_endpoint_slices(&lab.dir.resources(), &state)?;
    Ok(())
}

/// `agent kill` / `agent start`, under the lab's lock.
fn agent_cmd(lab: &Lab, cmd: AgentCommand) -> anyhow::Result<()> {
    let _lock = lab.dir.lock()?;
    let mut state = lab.require(LabState::load(&lab.dir)?)?;
    namespace_lab_only(&state, "agent")?;
    match cmd {
        AgentCommand::Kill { node } => {
            let n = state
                .node_mut(&node)
                .with_context(|| format!("no node {node} in the lab"))?;
            let proc = n
                .agent
                .take()
                .filter(|p| p.alive())
                .with_context(|| format!("{node}'s agent is not running"))?;
            process::kill_now(&proc)?;
            println!("{node}: agent (pid {}) killed with SIGKILL", proc.pid);
        }
        AgentCommand::Start { node } => {
            let n = state
                .node(&node)
                .cloned()
                .with_context(|| format!("no node {node} in the lab"))?;
            if n.agent.as_ref().is_some_and(|p| p.alive()) {
                anyhow::bail!("{node}'s agent is already running");
            }
            let started = agent::start(&n, &lab.dir, &lab.bin_dir, &state.proxy_mode)?;
            println!(
                "{node}: {}",
                started.describe(&lab.bin_dir.join("tabby-node"), &lab.dir.agent_log(&node))
            );
            if let Some(n) = state.node_mut(&node) {
                n.agent = started.process().cloned();
            }
        }
    }
    state.save(&lab.dir)
}

/// `apply -f` (or `delete -f` when `apply` is false), then the EndpointSlices.
fn apply(lab: &Lab, file: &Path, apply: bool) -> anyhow::Result<()> {
    let _lock = lab.dir.lock()?;
    let state = lab.require(LabState::load(&lab.dir)?)?;
    if state.kubernetes.is_some() {
        // A real cluster: the objects go to the apiserver.
        let verb = if apply { "apply" } else { "delete" };
        let args = [verb.into(), "-f".into(), file.as_os_str().to_owned()];
        let status = kube::status::kubectl(lab, &state, &args)?;
        anyhow::ensure!(status.success(), "kubectl {verb} failed ({status})");
        return Ok(());
    }
    let objects = resources::read_objects(file)?;
    let dir = lab.dir.resources();
    if apply {
        for key in resources::apply(&dir, &objects)? {
            println!(
                "{} {}/{} configured",
                key.kind.to_ascii_lowercase(),
                key.namespace,
                key.name
            );
        }
    } else {
        for (key, existed) in resources::delete(&dir, &objects)? {
            let what = if existed { "deleted" } else { "not found" };
            println!(
                "{} {}/{} {what}",
                key.kind.to_ascii_lowercase(),
                key.namespace,
                key.name
            );
        }
    }
    let slices = resources::sync_endpoint_slices(&dir, &state)?;
    println!("{slices} EndpointSlices derived from the lab's pods");
    programmed::wait(&state, &objects, apply);
    Ok(())
}

/// The exit code of a finished child: its own, or 128 + the signal.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
