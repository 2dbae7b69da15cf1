//! Starting the embedded service proxy: the source of Services and
//! EndpointSlices (files, or the Kubernetes API with `[proxy] source =
//! "kubernetes"`), the [`Proxier`] on its own thread (its syncs run
//! `iptables-restore` or `nft -f` and block), and the health-check node
//! ports. `[proxy] mode` picks the backend; nothing else here knows it.
//!
//! ```text
//!  File/KubeClusterState ──ProxyEvent (… SourceSynced)──┐
//!  agent loop (node facts) ─────────────────────────┤ (mpsc)
//!                                                   ▼
//!   proxy thread: Proxier::run_observed (first sync once all synced) ──Backend::apply──▶ kernel
//!                                 │ after each sync
//!                                 ├──▶ HealthCheckServer (tasks on the main runtime)
//!                                 └──▶ its ProxyMetrics, registered in the agent's Registry (/metrics)
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tabby_errors::chain;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{AgentConfig, ProxyConfig, ProxySource};
use crate::error::{AgentError, Result};
use tabby_proxy::cluster_state::{ClusterState, FileClusterState, KubeClusterState};
use tabby_proxy::conntrack::ConntrackCli;
use tabby_proxy::healthcheck::HealthCheckServer;
use tabby_proxy::iptables::{detect_backend, Backend as IptablesBackend, Iptables};
use tabby_proxy::model::NodeFacts;
use tabby_proxy::nftables::{NftCli, Nftables};
use tabby_proxy::proxier::{Proxier, ProxyEvent, SourceId, SyncConfig};
use tabby_proxy::rules::ProxyOptions;
use tabby_proxy::{Backend, Mode};

/// The first sync waits for the resource files and the node's facts: until
/// then the previous run's rules keep serving.
const FIRST_SYNC_WAITS_FOR: [SourceId; 3] =
    [SourceId::Services, SourceId::EndpointSlices, SourceId::Node];

/// Where Services and EndpointSlices come from, ready to run.
#[derive(Debug)]
pub enum Source {
    /// YAML files in `[proxy] resources_dir`.
    Files(FileClusterState),
    /// The Kubernetes API.
    Kubernetes(KubeClusterState),
}

impl Source {
    /// The configured source; connects the Kubernetes one (with the
    /// `[datastore]` kubeconfig when it is `type = "kubernetes"`).
    pub async fn from_config(cfg: &AgentConfig) -> Result<Self> {
        let pc = &cfg.proxy;
        Ok(match pc.source {
            ProxySource::Files => Self::Files(FileClusterState {
                dir: pc.resources_dir.clone(),
                interval: Duration::from_millis(pc.resources_poll_ms.max(20)),
            }),
            ProxySource::Kubernetes => Self::Kubernetes(
                KubeClusterState::connect(cfg.kubeconfig())
                    .await
                    .map_err(AgentError::KubeSource)?,
            ),
        })
    }

    fn spawn(self, tx: mpsc::Sender<ProxyEvent>) {
        match self {
            Self::Files(s) => {
                info!(resources = %s.dir.display(), "service proxy source: files");
                tokio::spawn(s.run(tx));
            }
            Self::Kubernetes(s) => {
                info!("service proxy source: the Kubernetes API");
                tokio::spawn(s.run(tx));
            }
        }
    }
}

/// The iptables flavour of `[proxy] backend`: `legacy`, `nft`, else the one
/// already holding more rules (natOutgoing uses the same one).
pub fn iptables_backend(pc: &ProxyConfig) -> IptablesBackend {
    match pc.backend.as_str() {
        "legacy" => IptablesBackend::Legacy,
        "nft" => IptablesBackend::Nft,
        _ => detect_backend(None),
    }
}

/// Starts the proxy with its metrics in `registry` on `source`; returns
/// where node facts changes go.
pub fn start(
    cfg: &AgentConfig,
    registry: &mut Registry,
    source: Source,
) -> Result<mpsc::Sender<ProxyEvent>> {
    let pc = &cfg.proxy;
    let opts = ProxyOptions {
        masquerade_mark: pc.masquerade_mark,
        ..ProxyOptions::default()
    };
    let sync = SyncConfig {
        min_sync_period: Duration::from_millis(pc.min_sync_period_ms),
        max_sync_period: Duration::from_millis(pc.max_sync_period_ms),
        ..SyncConfig::default()
    };
    let facts = NodeFacts {
        name: cfg.node_name.clone(),
        ..NodeFacts::default()
    };
    let (tx, rx) = mpsc::channel(4096);
    match Mode::from_name(&pc.mode).unwrap_or_default() {
        Mode::Iptables => {
            let backend = iptables_backend(pc);
            info!(
                mode = "iptables",
                backend = backend.name(),
                "service proxy starting"
            );
            let proxier = Proxier::new(
                facts,
                opts,
                sync,
                Iptables::new(backend),
                ConntrackCli::default(),
            )
            .wait_for(FIRST_SYNC_WAITS_FOR);
            proxier.metrics().register(registry);
            spawn(proxier, rx)?;
        }
        Mode::Nftables => {
            info!(mode = "nftables", "service proxy starting");
            let proxier = Proxier::new(
                facts,
                opts,
                sync,
                Nftables::new(NftCli::default()),
                ConntrackCli::default(),
            )
            .wait_for(FIRST_SYNC_WAITS_FOR);
            proxier.metrics().register(registry);
            spawn(proxier, rx)?;
        }
    }
    source.spawn(tx.clone());
    Ok(tx)
}

/// Runs `proxier` on a thread of its own; after each sync it publishes the
/// health checks (its metrics are shared handles, already registered).
fn spawn<B>(proxier: Proxier<B, ConntrackCli>, rx: mpsc::Receiver<ProxyEvent>) -> Result<()>
where
    B: Backend + Send + 'static,
    B::Plan: Send,
{
    let main = tokio::runtime::Handle::current();
    let mut health = {
        let _in_main = main.enter();
        HealthCheckServer::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    };
    std::thread::Builder::new()
        .name("tabby-proxy".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %chain(&e), "service proxy runtime");
                    return;
                }
            };
            rt.block_on(
                proxier.run_observed(rx, move |p: &Proxier<B, ConntrackCli>| {
                    let _in_main = main.enter();
                    health.update(p.health_checks());
                }),
            );
        })
        .map(drop)
        .map_err(|source| AgentError::Io {
            context: "start the service proxy thread".into(),
            source,
        })
}
