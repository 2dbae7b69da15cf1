//! `tabbyctl`: show and repair Tabby's IPAM (calicoctl's `ipam` and
//! `ippool` commands, over the same datastore as the CNI plugin).

mod bgp;
mod ipam;
mod node;
mod pool;
mod service;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tabby_ipam::{Datastore, DatastoreConfig, Ipam};

/// The datastore `tabbyctl` works on.
pub type Store = Box<dyn Datastore>;

/// Show and repair Tabby's IP address management.
#[derive(Debug, Parser)]
#[command(name = "tabbyctl", version)]
struct Cli {
    /// The datastore: a directory (file backend), or `kubernetes` (the
    /// Kubernetes API, through --kubeconfig / KUBECONFIG / in-cluster).
    #[arg(long, global = true, env = "TABBY_DATASTORE", default_value = tabby_ipam::DEFAULT_PATH)]
    datastore: PathBuf,
    /// The kubeconfig of `--datastore kubernetes`.
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// IP address management: show usage, check consistency, release addresses.
    #[command(subcommand)]
    Ipam(ipam::IpamCommand),
    /// IP pools: create, list, delete.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// BGP peers and cluster BGP settings.
    #[command(subcommand)]
    Bgp(bgp::BgpCommand),
    /// This node's agent.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Services as the agents' proxies see them.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print Tabby's CRDs (the content of deploy/crds.yaml).
    Crds,
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Services with their cluster IPs, ports and ready endpoints per node.
    List {
        /// The directory of Service and EndpointSlice YAML the agents read.
        #[arg(long, env = "TABBY_RESOURCES", default_value = service::DEFAULT_RESOURCES)]
        resources: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// BGP sessions of the local tabby-node, as `calicoctl node status`.
    Status {
        /// The agent's status socket.
        #[arg(long, env = "TABBY_NODE_SOCKET", default_value = node::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Node(NodeCommand::Status { socket }) = &cli.command {
        return node::status(socket);
    }
    if let Command::Service(ServiceCommand::List { resources }) = &cli.command {
        return service::list(resources);
    }
    if let Command::Crds = &cli.command {
        print!("{}", tabby_ipam::kubernetes::crd::crds_yaml());
        return Ok(());
    }
    let creates_store = matches!(
        cli.command,
        Command::Pool(pool::PoolCommand::Create(_))
            | Command::Bgp(bgp::BgpCommand::Config(_))
            | Command::Bgp(bgp::BgpCommand::Peer(bgp::PeerCommand::Create(_)))
            | Command::Bgp(bgp::BgpCommand::Filter(bgp::FilterCommand::Create(_)))
    );
    let ipam = open(&cli.datastore, cli.kubeconfig.clone(), creates_store)?;
    match cli.command {
        Command::Ipam(cmd) => ipam::run(&ipam, cmd),
        Command::Pool(cmd) => pool::run(&ipam, cmd),
        Command::Bgp(cmd) => bgp::run(ipam.datastore(), cmd),
        Command::Node(_) | Command::Service(_) | Command::Crds => {
            unreachable!("handled before the datastore is opened")
        }
    }
}

/// Opens the datastore; only `pool create` may create a file datastore's
/// directory, so a mistyped path is an error rather than an empty cluster.
fn open(path: &PathBuf, kubeconfig: Option<PathBuf>, create: bool) -> anyhow::Result<Ipam<Store>> {
    if path.as_os_str() == "kubernetes" {
        let config = DatastoreConfig::kubernetes(kubeconfig);
        let ds = config.open().context("opening the Kubernetes datastore")?;
        return Ok(Ipam::new(ds));
    }
    if !create && !path.is_dir() {
        anyhow::bail!(
            "no datastore at {}: create a pool with `tabbyctl pool create`, or pass --datastore / TABBY_DATASTORE",
            path.display()
        );
    }
    let ds = DatastoreConfig::file(path)
        .open()
        .with_context(|| format!("opening datastore {}", path.display()))?;
    Ok(Ipam::new(ds))
}
