//! Starting the embedded service proxy: the file source of Services and
//! EndpointSlices, the [`Proxier`] on its own thread (its syncs run
//! `iptables-restore` and block), and the health-check node ports.
//!
//! ```text
//!  FileClusterState ──ProxyEvent (… SourceSynced)──┐
//!  agent loop (node facts) ─────────────────────────┤ (mpsc)
//!                                                   ▼
//!   proxy thread: Proxier::run_observed (first sync once all synced) ──iptables-restore──▶ kernel
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

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use tabby_proxy::cluster_state::{ClusterState, FileClusterState};
use tabby_proxy::conntrack::ConntrackCli;
use tabby_proxy::healthcheck::HealthCheckServer;
use tabby_proxy::iptables::{detect_backend, Backend, Iptables};
use tabby_proxy::model::NodeFacts;
use tabby_proxy::proxier::{Proxier, ProxyEvent, SourceId, SyncConfig};
use tabby_proxy::rules::ProxyOptions;

/// Starts the proxy with its metrics in `registry`; returns where node facts changes go.
pub fn start(cfg: &AgentConfig, registry: &mut Registry) -> Result<mpsc::Sender<ProxyEvent>> {
    let pc = &cfg.proxy;
    let backend = match pc.backend.as_str() {
        "legacy" => Backend::Legacy,
        "nft" => Backend::Nft,
        _ => detect_backend(None),
    };
    info!(backend = backend.name(), resources = %pc.resources_dir.display(), "service proxy starting");
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
    // The first sync waits for the resource files and the node's facts:
    // until then the previous run's rules keep serving.
    let proxier = Proxier::new(
        facts,
        opts,
        sync,
        Iptables::new(backend),
        ConntrackCli::default(),
    )
    .wait_for([SourceId::Services, SourceId::EndpointSlices, SourceId::Node]);
    proxier.metrics().register(registry);
    let (tx, rx) = mpsc::channel(4096);
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
                proxier.run_observed(rx, move |p: &Proxier<Iptables, ConntrackCli>| {
                    let _in_main = main.enter();
                    health.update(p.health_checks());
                }),
            );
        })
        .map_err(|source| AgentError::Io {
            context: "start the service proxy thread".into(),
            source,
        })?;
    let source = FileClusterState {
        dir: pc.resources_dir.clone(),
        interval: Duration::from_millis(pc.resources_poll_ms.max(20)),
    };
    tokio::spawn(source.run(tx.clone()));
    Ok(tx)
}
