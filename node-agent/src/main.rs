//! `tabby-node --config FILE`: the per-node agent;
//! `tabby-node install-cni`: the plugin onto the host (the init container).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tabby_bgp::{Speaker, SpeakerConfig};
use tabby_errors::chain;
use tabby_ipam::Datastore;
use tabby_node::agent::Agent;
use tabby_node::cluster::kubernetes::ClusterWatch;
use tabby_node::config::{AgentConfig, ClusterSource};
use tabby_node::install_cni::cli::{InstallCniArgs, TokenArgs};
use tabby_node::shared::Shared;
use tabby_node::speaker_control::{forward_events, SpeakerControl};
use tabby_node::{health, metrics, service_proxy, status};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

/// Tabby's node agent: BGP, routes and the service proxy of one node.
#[derive(Debug, Parser)]
#[command(name = "tabby-node", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The configuration file (TOML); the flags below override it.
    #[arg(long, env = "TABBY_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The address BGP binds to and advertises as next hop.
    #[arg(long, env = "TABBY_BGP_ADDRESS")]
    bgp_address: Option<IpAddr>,
    /// This node's AS number.
    #[arg(long)]
    as_number: Option<u32>,
    /// The datastore directory.
    #[arg(long)]
    datastore: Option<PathBuf>,
    /// Keep this plugin kubeconfig's token fresh (what install-cni wrote).
    #[arg(long, env = "TABBY_PLUGIN_KUBECONFIG")]
    plugin_kubeconfig: Option<PathBuf>,
    /// The plugin's ServiceAccount, for the refresh.
    #[command(flatten)]
    token: TokenArgs,
    /// Log filter (error, warn, info, debug, or a tracing directive).
    #[arg(long, env = "TABBY_LOG", default_value = "info", global = true)]
    log_level: String,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Copy the plugin into the host's CNI bin dir and write its conflist and kubeconfig.
    InstallCni(InstallCniArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            error!(error = %chain(&e), "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command.clone() {
        Some(Command::InstallCni(install)) => {
            runtime.block_on(tabby_node::install_cni::cli::run(install))
        }
        None => runtime.block_on(run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration file with the flags' overrides.
fn config(args: &Args) -> anyhow::Result<AgentConfig> {
    let text = |s: String| toml::Value::String(s);
    let mut overrides: Vec<(&str, toml::Value)> = Vec::new();
    if let Some(n) = &args.node_name {
        overrides.push(("node_name", text(n.clone())));
    }
    if let Some(a) = args.bgp_address {
        overrides.push(("bgp_address", text(a.to_string())));
    }
    if let Some(a) = args.as_number {
        overrides.push(("as_number", toml::Value::Integer(i64::from(a))));
    }
    if let Some(d) = &args.datastore {
        overrides.push(("datastore", text(d.display().to_string())));
    }
    Ok(AgentConfig::load_with(args.config.as_deref(), &overrides)?)
}

/// The backend `[datastore]` names, chosen at run time (file or kubernetes).
type AnyDatastore = Arc<dyn Datastore>;

/// Opens the datastore (the one place that picks its backend) and reads
/// the cluster's AS number.
async fn open_datastore(cfg: &AgentConfig) -> anyhow::Result<(Arc<AnyDatastore>, u32)> {
    let datastore = cfg.datastore.clone();
    tokio::task::spawn_blocking(move || {
        let ds: AnyDatastore = Arc::from(datastore.open().context("open the datastore")?);
        let asn = tabby_ipam::resources::bgp_config(&ds)
            .context("read the cluster's BGP configuration")?
            .as_number;
        anyhow::Ok((Arc::new(ds), asn))
    })
    .await?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    let IpAddr::V4(router_id) = cfg.bgp_address else {
        bail!("bgp_address must be IPv4 for now")
    };
    let (ds, cluster_asn) = open_datastore(&cfg).await?;
    let token_task = match &args.plugin_kubeconfig {
        Some(path) => {
            let (client, plugin) = args.token.plugin_kubeconfig(path.clone()).await?;
            Some(tokio::spawn(plugin.keep_fresh(client)))
        }
        None => None,
    };
    let asn = cfg.as_number.unwrap_or(cluster_asn);
    let (speaker, speaker_events) = Speaker::start(SpeakerConfig {
        router_id,
        asn,
        listen_addr: router_id,
        listen_port: cfg.bgp_port,
    })
    .await
    .context("start the BGP speaker")?;
    // Small: each event holds one UPDATE's prefixes; a full queue slows the sessions.
    let (tx, events) = tokio::sync::mpsc::channel(64);
    tokio::spawn(forward_events(speaker_events, tx));

    let shared = Arc::new(Mutex::new(Shared::default()));
    let bgp = SpeakerControl::new(speaker, &cfg);
    // Registration and the first netlink calls block: keep them off the async workers.
    let (c, s) = (cfg.clone(), Arc::clone(&shared));
    let mut agent = tokio::task::spawn_blocking(move || Agent::new(c, ds, bgp, s)).await??;
    if cfg.cluster() == ClusterSource::Kubernetes {
        let scope = cfg.kube_scope().map(str::to_string);
        let watch = ClusterWatch::connect(cfg.kubeconfig(), scope).await?;
        agent.set_views(watch.start());
    }
    let mut registry = metrics::registry(Arc::clone(&shared));
    if cfg.proxy.enabled {
        let source = service_proxy::Source::from_config(&cfg).await?;
        // Backend detection runs iptables-save: off the async workers.
        let tx = tokio::task::block_in_place(|| service_proxy::start(&cfg, &mut registry, source))?;
        agent.set_proxy(tx);
    }

    let s = Arc::clone(&shared);
    let status_task = tokio::spawn(status::serve(
        cfg.status_socket.clone(),
        Arc::new(move || s.lock().map(|g| g.status.clone()).unwrap_or_default()),
    ));
    let listener = tokio::net::TcpListener::bind(cfg.health_listen)
        .await
        .with_context(|| format!("listen on {}", cfg.health_listen))?;
    let health_task = tokio::spawn(health::serve(
        listener,
        Arc::clone(&shared),
        Arc::new(registry),
        cfg.poll_interval(),
    ));
    info!(node = %cfg.node_name, address = %cfg.bgp_address, asn, "tabby-node running");

    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT"),
        }
    };
    let bgp = agent.run(events, shutdown).await;
    bgp.shutdown().await;
    status_task.abort();
    health_task.abort();
    if let Some(task) = token_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&cfg.status_socket);
    info!("stopped");
    Ok(())
}
