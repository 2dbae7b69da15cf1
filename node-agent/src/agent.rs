//! The agent's main loop: one task owns the state; the datastore poller,
//! the BGP speaker and the route thread talk to it.
//!
//! ```text
//!   datastore D ──(poll every 500 ms, blocking pool)──┐  or, with cluster = "kubernetes":
//!   crate::cluster::kubernetes watches ──views (watch)─┤  each change at once, the tick re-plans
//!                                                     ▼
//!   BGP speaker ──BgpEvent (mpsc)──▶ agent loop ──route changes (bounded)──▶ route thread ──▶ kernel
//!        ▲                             │  │  │ writes                         │ reads (resync)
//!        │                             │  │  └──▶ RouteSource (Rib, blocks) ◀─┘
//!        └─ add/remove peer, announce/withdraw └──ProxyEvent::Node──▶ service proxy
//!   status socket / health HTTP ◀── shared snapshot (Arc<Mutex<Shared>>)
//! ```
//!
//! Each pass over the datastore is planned by pure functions
//! ([`crate::plan`]); BGP events change the [`Rib`], and
//! only the prefixes whose best path moved reach the route thread.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnetwork::IpNetwork;
use tabby_bgp::rib::Rib;
use tabby_dataplane::Netlink;
use tabby_errors::chain;
use tabby_ipam::datastore::Datastore;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cluster::{self, ViewRx, Watched};
use crate::config::AgentConfig;
use crate::desired::{
    desired_peers, local_blocks, local_prefixes, node_facts, ClusterView, PeerSpec,
};
use crate::encap::{EncapRoutes, EncapStatus, Encapsulation};
use crate::error::{AgentError, Result};
use crate::nat_outgoing::{plan::plan as nat_plan, KernelNat, NatOutgoing};
use crate::plan::{plan_peers, plan_prefixes, PeerPlan};
use crate::policy::ImportPolicy;
use crate::register::{load_view, register_node};
use crate::routes::{RouteProgrammer, RouteSource};
use crate::status::{NodeStatus, PeerRow};
use tabby_proxy::model::NodeFacts;
use tabby_proxy::proxier::ProxyEvent;

pub use crate::shared::Shared;

/// BGP events handled before the kernel hears of their changes.
const DRAIN: usize = 8;

/// What happened in BGP, as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BgpEvent {
    /// `peer` advertised `prefixes` with next hop `next_hop`.
    Learned {
        /// The peer.
        peer: IpAddr,
        /// The prefixes.
        prefixes: Vec<IpNetwork>,
        /// Their next hop.
        next_hop: IpAddr,
    },
    /// `peer` withdrew `prefixes`.
    Withdrawn {
        /// The peer.
        peer: IpAddr,
        /// The prefixes.
        prefixes: Vec<IpNetwork>,
    },
    /// The session with `peer` went down: forget its routes.
    PeerDown {
        /// The peer.
        peer: IpAddr,
    },
    /// The session with `peer` went down but the peer is restarting
    /// (graceful restart): keep its routes, marked stale.
    Stale {
        /// The peer.
        peer: IpAddr,
    },
    /// `peer` is back and has re-sent its table (or the restart timed
    /// out): forget its routes still marked stale.
    PurgeStale {
        /// The peer.
        peer: IpAddr,
    },
}

impl BgpEvent {
    /// Applies the event to `rib`, whose paths `import` judges; returns the
    /// prefixes whose best path moved.
    pub fn apply_to(
        &self,
        rib: &mut Rib<IpNetwork, IpAddr>,
        import: &ImportPolicy,
    ) -> Vec<IpNetwork> {
        match self {
            BgpEvent::Learned {
                peer,
                prefixes,
                next_hop,
            } => rib.learn_where(*peer, prefixes, *next_hop, |p| import.accepts(*peer, p)),
            BgpEvent::Withdrawn { peer, prefixes } => rib.withdraw(*peer, prefixes),
            BgpEvent::PeerDown { peer } => rib.peer_down(*peer),
            BgpEvent::Stale { peer } => {
                rib.mark_stale(*peer);
                Vec::new()
            }
            BgpEvent::PurgeStale { peer } => rib.purge_stale(*peer),
        }
    }
}

/// What the agent asks of a BGP speaker.
pub trait BgpControl: Send {
    /// Starts a session with `peer` (idempotent).
    fn add_peer(&mut self, peer: &PeerSpec);
    /// Ends the session with `addr`.
    fn remove_peer(&mut self, addr: IpAddr) -> impl std::future::Future<Output = ()> + Send;
    /// Originates `prefix` with this node as next hop.
    fn announce(&mut self, prefix: IpNetwork);
    /// Stops originating `prefix`.
    fn withdraw(&mut self, prefix: IpNetwork);
    /// One row per peer for `tabbyctl node status`.
    fn status(&self) -> Vec<PeerRow>;
}

/// The agent's state, owned by its loop, over any datastore backend.
pub struct Agent<D: Datastore, B: BgpControl> {
    cfg: AgentConfig,
    ds: Arc<D>,
    bgp: B,
    routes: RouteProgrammer,
    routes_ready: bool,
    /// Learned routes and local blocks, read by the route thread too.
    source: Arc<Mutex<RouteSource>>,
    peers: BTreeMap<IpAddr, PeerSpec>,
    originated: BTreeSet<IpNetwork>,
    /// Which learned paths may be used (judged as they are learned, and
    /// all again when it changes).
    import: ImportPolicy,
    /// The subnets of the uplink (the underlay the import policy guards).
    uplink_nets: Vec<IpNetwork>,
    shared: Arc<Mutex<Shared>>,
    proxy: Option<mpsc::Sender<ProxyEvent>>,
    facts: Option<NodeFacts>,
    /// Views from a watch (`cluster = "kubernetes"`); `None`: poll `ds`.
    views: Option<ViewRx>,
    /// Tunnel devices, addresses and the MTU file (blocking: used off the workers).
    encap: Arc<Mutex<Encapsulation>>,
    encap_status: EncapStatus,
    /// natOutgoing's chain and sets (blocking: used off the workers).
    nat: Arc<Mutex<NatOutgoing<KernelNat>>>,
    /// The last natOutgoing failure, logged once until it changes.
    nat_error: Option<String>,
}

/// The index of the uplink: the configured interface, else the one holding `bgp_address`.
pub fn resolve_uplink(cfg: &AgentConfig) -> Result<u32> {
    let nl = Netlink::host().map_err(AgentError::Uplink)?;
    if let Some(name) = &cfg.uplink {
        return nl
            .link(name)
            .map_err(AgentError::Uplink)?
            .map(|l| l.index)
            .ok_or_else(|| AgentError::Config(format!("uplink {name} does not exist")));
    }
    for link in nl.links().map_err(AgentError::Uplink)? {
        let addrs = nl.addresses(link.index).map_err(AgentError::Uplink)?;
        if addrs.iter().any(|a| a.ip() == cfg.bgp_address) {
            return Ok(link.index);
        }
    }
    Err(AgentError::Config(format!(
        "no interface holds bgp_address {}; set uplink",
        cfg.bgp_address
    )))
}

impl<D: Datastore + 'static, B: BgpControl> Agent<D, B> {
    /// Registers the node in `ds` and prepares the route thread; `bgp` is a
    /// started speaker. Blocks: call it off the async workers.
    pub fn new(cfg: AgentConfig, ds: Arc<D>, bgp: B, shared: Arc<Mutex<Shared>>) -> Result<Self> {
        let uplink = resolve_uplink(&cfg)?;
        let uplink_nets =
            (Netlink::host().and_then(|nl| nl.addresses(uplink))).map_err(AgentError::Uplink)?;
        let underlay = uplink_nets
            .iter()
            .find(|n| n.ip() == cfg.bgp_address && n.is_ipv4())
            .copied();
        let node = register_node(ds.as_ref(), &cfg, underlay)?;
        info!(node = %node.name, address = ?node.address, subnet = ?node.ipv4_address, datastore = %ds.describe(), "registered");
        let source = Arc::new(Mutex::new(RouteSource::new(cfg.bgp_address, uplink)));
        let grace = std::time::Duration::from_secs(u64::from(cfg.hold_time.max(3)));
        let routes = RouteProgrammer::start(grace, Arc::clone(&source))?;
        let encap = Encapsulation::new(
            &cfg.node_name,
            cfg.bgp_address,
            uplink,
            cfg.mtu_file.clone(),
        );
        let backend = crate::service_proxy::iptables_backend(&cfg.proxy);
        info!(
            backend = backend.name(),
            "natOutgoing uses the proxy's iptables flavour"
        );
        Ok(Self {
            nat: Arc::new(Mutex::new(NatOutgoing::new(KernelNat::host(backend)))),
            nat_error: None,
            encap: Arc::new(Mutex::new(encap)),
            encap_status: EncapStatus::default(),
            cfg,
            ds,
            bgp,
            routes,
            routes_ready: false,
            source,
            peers: BTreeMap::new(),
            originated: BTreeSet::new(),
            import: ImportPolicy::default(),
            uplink_nets,
            shared,
            proxy: None,
            facts: None,
            views: None,
        })
    }

    /// Feeds node facts to the service proxy from now on.
    pub fn set_proxy(&mut self, tx: mpsc::Sender<ProxyEvent>) {
        self.proxy = Some(tx);
    }

    /// Takes the cluster view from a watch from now on instead of polling
    /// the datastore: each new view is acted on at once.
    pub fn set_views(&mut self, views: ViewRx) {
        self.views = Some(views);
    }

    /// Runs until `shutdown` resolves; gives the speaker back for a clean close.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<BgpEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> B {
        let mut tick = tokio::time::interval(self.cfg.poll_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tokio::pin!(shutdown);
        let mut changes = self.views.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => self.reconcile(&mut events).await,
                ok = cluster::changed(&mut changes) => match ok {
                    true => self.reconcile(&mut events).await,
                    false => {
                        warn!("the cluster watch ended; keeping its last view");
                        changes = None;
                    }
                },
                Some(ev) = events.recv() => {
                    let mut batch = vec![ev];
                    // Take what else is queued before touching the kernel once.
                    while batch.len() < DRAIN {
                        let Ok(ev) = events.try_recv() else { break };
                        batch.push(ev);
                    }
                    let changed = self.learn(&batch);
                    self.program(changed).await;
                }
                () = &mut shutdown => break,
            }
        }
        info!("shutting down");
        self.bgp
    }

    /// Applies BGP events to the RIB; returns the prefixes whose best path moved.
    fn learn(&self, events: &[BgpEvent]) -> Vec<IpNetwork> {
        let Ok(mut source) = self.source.lock() else {
            return Vec::new();
        };
        events
            .iter()
            .flat_map(|ev| ev.apply_to(&mut source.rib, &self.import))
            .collect()
    }

    /// Hands the kernel routes of `prefixes` (in any order, repeats allowed) to the route thread.
    async fn program(&mut self, prefixes: Vec<IpNetwork>) {
        let changes = match self.source.lock() {
            Ok(source) => source.changes(prefixes),
            Err(_) => return,
        };
        self.routes.apply(changes).await;
    }

    /// Ends the session with `addr` while still draining BGP events (the
    /// session may be waiting to hand over an event before it can stop);
    /// returns the prefixes those events changed.
    async fn remove_peer(
        &mut self,
        addr: IpAddr,
        events: &mut mpsc::Receiver<BgpEvent>,
    ) -> Vec<IpNetwork> {
        let mut drained = Vec::new();
        {
            let removal = self.bgp.remove_peer(addr);
            tokio::pin!(removal);
            loop {
                tokio::select! {
                    () = &mut removal => break,
                    Some(ev) = events.recv() => drained.push(ev),
                }
            }
        }
        self.learn(&drained)
    }

    /// The view to act on: the watch's latest, else read from the datastore.
    async fn read_view(&mut self) -> Option<Arc<ClusterView>> {
        if let Some(views) = &self.views {
            let watched = views.borrow().clone();
            return match watched {
                Watched::Synced(view) => Some(view),
                Watched::Pending(kinds) => {
                    if let Ok(mut s) = self.shared.lock() {
                        s.waiting_for = kinds;
                        s.last_pass = Some(Instant::now());
                    }
                    None
                }
            };
        }
        let ds = Arc::clone(&self.ds);
        match tokio::task::spawn_blocking(move || load_view(&ds)).await {
            Ok(Ok(v)) => Some(Arc::new(v)),
            Ok(Err(e)) => {
                warn!(error = %chain(&e), "reading the datastore failed");
                None
            }
            Err(e) => {
                warn!(error = %chain(&e), "datastore reader panicked");
                None
            }
        }
    }

    async fn reconcile(&mut self, events: &mut mpsc::Receiver<BgpEvent>) {
        let Some(view) = self.read_view().await else {
            return;
        };
        let encap_routes = self.sync_encap(&view).await;
        self.sync_nat(&view).await;
        let me = self.cfg.node_name.clone();
        // Originate first: a session that comes up in this pass sends them at once.
        let prefixes = local_prefixes(&view, &me);
        let (announce, withdraw) = plan_prefixes(&self.originated, &prefixes);
        for p in withdraw {
            info!(prefix = %p, "withdrawing");
            self.bgp.withdraw(p);
        }
        for p in announce {
            info!(prefix = %p, "announcing");
            self.bgp.announce(p);
        }
        self.originated = prefixes;
        let want: BTreeMap<IpAddr, PeerSpec> = desired_peers(&view, &me, self.cfg.bgp_address)
            .into_iter()
            .map(|p| (p.addr, p))
            .collect();
        let mut changed = self
            .change_peers(plan_peers(&self.peers, &want), events)
            .await;
        let peer_types = self.peers.iter().map(|(a, s)| (*a, s.peer_type)).collect();
        let import = ImportPolicy::new(&view, &me, &peer_types, &self.uplink_nets);
        if import != self.import {
            self.import = import;
            if let Ok(mut source) = self.source.lock() {
                let import = &self.import;
                changed.extend(source.rib.refilter(|p, peer| import.accepts(peer, p)));
            }
        }
        let blocks = local_blocks(&view, &me);
        if let Ok(mut source) = self.source.lock() {
            changed.extend(source.blocks.symmetric_difference(&blocks).copied());
            source.blocks = blocks;
            if let Some(encap) = encap_routes {
                changed.extend(source.set_encap(encap));
            }
        }
        self.program(changed).await;
        if !self.routes_ready {
            self.routes.ready().await;
            self.routes_ready = true;
        }
        self.send_facts(&view);
        self.publish(&view, me);
    }

    /// One encapsulation pass off the workers; `None` when it could not run.
    async fn sync_encap(&mut self, view: &Arc<ClusterView>) -> Option<EncapRoutes> {
        let (encap, ds, view) = (
            Arc::clone(&self.encap),
            Arc::clone(&self.ds),
            Arc::clone(view),
        );
        let pass = move || encap.lock().ok().map(|mut e| e.sync(&ds, &view));
        match tokio::task::spawn_blocking(pass).await {
            Ok(Some((routes, status))) => {
                self.encap_status = status;
                Some(routes)
            }
            Ok(None) => None,
            Err(e) => {
                warn!(error = %chain(&e), "encapsulation pass panicked");
                None
            }
        }
    }

    /// One natOutgoing pass off the workers (acts only when the pools or
    /// nodes moved, or the last pass failed); a failure is logged with its
    /// chain when it first shows and kept in the status errors.
    async fn sync_nat(&mut self, view: &ClusterView) {
        let (nat, want) = (Arc::clone(&self.nat), nat_plan(view));
        let pass = move || nat.lock().ok().map(|mut n| n.sync(&want));
        let failed = match tokio::task::spawn_blocking(pass).await {
            Ok(Some(Ok(_))) | Ok(None) => None,
            Ok(Some(Err(e))) => Some(format!("natOutgoing: {}", chain(&e))),
            Err(e) => Some(format!("natOutgoing pass panicked: {}", chain(&e))),
        };
        if failed.is_some() && failed != self.nat_error {
            warn!(
                error = failed.as_deref().unwrap_or_default(),
                "natOutgoing failed"
            );
        } else if failed.is_none() && self.nat_error.is_some() {
            info!("natOutgoing recovered");
        }
        let errors = &mut self.encap_status.errors;
        errors.retain(|e| !e.starts_with("natOutgoing"));
        errors.extend(failed.clone());
        self.nat_error = failed;
    }

    /// Carries out a peer plan; returns the prefixes whose paths it changed.
    async fn change_peers(
        &mut self,
        plan: PeerPlan,
        events: &mut mpsc::Receiver<BgpEvent>,
    ) -> Vec<IpNetwork> {
        let mut changed = Vec::new();
        for addr in plan.remove {
            info!(peer = %addr, "removing peer");
            changed.extend(self.remove_peer(addr, events).await);
            self.peers.remove(&addr);
            changed.extend(self.learn(&[BgpEvent::PeerDown { peer: addr }]));
        }
        for spec in plan.replace.into_iter().chain(plan.add) {
            info!(peer = %spec.addr, peer_type = %spec.peer_type, asn = spec.asn, "adding peer");
            if self.peers.contains_key(&spec.addr) {
                changed.extend(self.remove_peer(spec.addr, events).await);
            }
            self.bgp.add_peer(&spec);
            self.peers.insert(spec.addr, spec);
        }
        changed
    }

    /// Sends changed node facts to the service proxy, never waiting on it
    /// (its syncs block on iptables-restore): when its queue is full, the
    /// next pass tries again.
    fn send_facts(&mut self, view: &ClusterView) {
        let Some(tx) = &self.proxy else { return };
        let facts = node_facts(
            view,
            &self.cfg.node_name,
            self.cfg.bgp_address,
            self.cfg.proxy.cluster_cidr,
        );
        if self.facts.as_ref() != Some(&facts)
            && tx
                .try_send(ProxyEvent::Node(Box::new(facts.clone())))
                .is_ok()
        {
            self.facts = Some(facts);
        }
    }

    fn publish(&self, view: &ClusterView, me: String) {
        let rows = crate::status::with_configured(self.bgp.status(), self.peers.values());
        if let Ok(mut s) = self.shared.lock() {
            s.status = NodeStatus {
                node: me,
                asn: self.cfg.as_number.unwrap_or(view.bgp.as_number),
                address: self.cfg.bgp_address.to_string(),
                peers: rows,
                encap: self.encap_status.clone(),
            };
            s.encap_errors = self.encap_status.errors.clone();
            s.ready = true;
            s.waiting_for.clear();
            s.last_pass = Some(Instant::now());
            s.learned = self.source.lock().map(|r| r.rib.len()).unwrap_or(0);
            s.originated = self.originated.len();
            s.routes = self.routes.stats();
        }
    }
}
