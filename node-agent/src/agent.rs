//! The agent's main loop: one task owns the state; the datastore poller,
//! the BGP speaker and the route thread talk to it.
//!
//! ```text
//!   datastore ──(poll every 500 ms, blocking pool)──┐
//!                                                   ▼
//!   BGP speaker ──SpeakerEvent (mpsc)──────────▶ agent loop ──Vec<Route>──▶ route thread ──▶ kernel
//!        ▲                                          │
//!        └──── add/remove peer, announce/withdraw ──┘
//!   status socket / health HTTP ◀── shared snapshot (Arc<Mutex<Shared>>)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnetwork::IpNetwork;
use tabby_dataplane::Netlink;
use tabby_ipam::Datastore;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::desired::{desired_peers, kernel_routes, local_blocks, local_prefixes, PeerSpec};
use crate::error::{AgentError, Result};
use crate::policy::ImportPolicy;
use crate::register::{load_view, register_node};
use crate::routes::RouteProgrammer;
use crate::service_proxy::node_facts;
use crate::status::{NodeStatus, PeerRow};
use tabby_proxy::model::NodeFacts;
use tabby_proxy::proxier::ProxyEvent;

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

/// Learned routes: prefix -> peer -> next hop. The best path is the one
/// from the lowest peer address (deterministic on every node).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rib {
    routes: BTreeMap<IpNetwork, BTreeMap<IpAddr, IpAddr>>,
}

impl Rib {
    /// Applies one event; returns whether the best paths may have changed.
    pub fn apply(&mut self, ev: &BgpEvent) -> bool {
        match ev {
            BgpEvent::Learned {
                peer,
                prefixes,
                next_hop,
            } => {
                for p in prefixes {
                    self.routes.entry(*p).or_default().insert(*peer, *next_hop);
                }
                !prefixes.is_empty()
            }
            BgpEvent::Withdrawn { peer, prefixes } => {
                let mut changed = false;
                for p in prefixes {
                    if let Some(paths) = self.routes.get_mut(p) {
                        changed |= paths.remove(peer).is_some();
                        if paths.is_empty() {
                            self.routes.remove(p);
                        }
                    }
                }
                changed
            }
            BgpEvent::PeerDown { peer } => {
                let before = self.routes.len();
                let mut changed = false;
                self.routes.retain(|_, paths| {
                    changed |= paths.remove(peer).is_some();
                    !paths.is_empty()
                });
                changed || before != self.routes.len()
            }
        }
    }

    /// The best next hop per prefix.
    pub fn best(&self) -> BTreeMap<IpNetwork, IpAddr> {
        self.best_where(|_, _| true)
    }

    /// The best next hop per prefix among the paths `accept(prefix, peer)`
    /// lets through (the import policy).
    pub fn best_where(
        &self,
        accept: impl Fn(&IpNetwork, IpAddr) -> bool,
    ) -> BTreeMap<IpNetwork, IpAddr> {
        self.routes
            .iter()
            .filter_map(|(p, paths)| {
                paths
                    .iter()
                    .find(|(peer, _)| accept(p, **peer))
                    .map(|(_, nh)| (*p, *nh))
            })
            .collect()
    }

    /// How many prefixes are known.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// What the status socket and health endpoint read.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    /// The `node status` answer.
    pub status: NodeStatus,
    /// The first reconcile completed.
    pub ready: bool,
    /// When the loop last ran a reconcile.
    pub last_pass: Option<Instant>,
    /// Learned prefixes.
    pub learned: usize,
    /// Originated prefixes.
    pub originated: usize,
    /// Kernel route counters.
    pub routes: crate::routes::RouteStats,
}

/// The agent's state, owned by its loop.
pub struct Agent<B: BgpControl> {
    cfg: AgentConfig,
    ds: Arc<dyn Datastore>,
    bgp: B,
    routes: RouteProgrammer,
    uplink: u32,
    peers: BTreeMap<IpAddr, PeerSpec>,
    originated: BTreeSet<IpNetwork>,
    blocks: BTreeSet<IpNetwork>,
    rib: Rib,
    import: ImportPolicy,
    uplink_nets: Vec<IpNetwork>,
    shared: Arc<Mutex<Shared>>,
    proxy: Option<mpsc::Sender<ProxyEvent>>,
    facts: Option<NodeFacts>,
}

/// The index of the uplink: the configured interface, else the one holding `bgp_address`.
pub fn resolve_uplink(cfg: &AgentConfig) -> Result<u32> {
    let nl = Netlink::host()?;
    if let Some(name) = &cfg.uplink {
        return nl
            .link(name)?
            .map(|l| l.index)
            .ok_or_else(|| AgentError::Config(format!("uplink {name} does not exist")));
    }
    for link in nl.links()? {
        if nl
            .addresses(link.index)?
            .iter()
            .any(|a| a.ip() == cfg.bgp_address)
        {
            return Ok(link.index);
        }
    }
    Err(AgentError::Config(format!(
        "no interface holds bgp_address {}; set uplink",
        cfg.bgp_address
    )))
}

impl<B: BgpControl> Agent<B> {
    /// Registers the node and prepares the route thread; `bgp` is a started speaker.
    pub fn new(cfg: AgentConfig, bgp: B, shared: Arc<Mutex<Shared>>) -> Result<Self> {
        let ds: Arc<dyn Datastore> = Arc::from(cfg.datastore.open()?);
        let node = register_node(&ds, &cfg)?;
        info!(node = %node.name, address = ?node.address, "registered");
        let uplink = resolve_uplink(&cfg)?;
        let uplink_nets = Netlink::host()?.addresses(uplink)?;
        let routes = RouteProgrammer::start(std::time::Duration::from_secs(u64::from(
            cfg.hold_time.max(3),
        )))?;
        Ok(Self {
            cfg,
            ds,
            bgp,
            routes,
            uplink,
            peers: BTreeMap::new(),
            originated: BTreeSet::new(),
            blocks: BTreeSet::new(),
            rib: Rib::default(),
            import: ImportPolicy::default(),
            uplink_nets,
            shared,
            proxy: None,
            facts: None,
        })
    }

    /// Feeds node facts to the service proxy from now on.
    pub fn set_proxy(&mut self, tx: mpsc::Sender<ProxyEvent>) {
        self.proxy = Some(tx);
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
        loop {
            tokio::select! {
                _ = tick.tick() => self.reconcile(&mut events).await,
                Some(ev) = events.recv() => {
                    let mut changed = self.rib.apply(&ev);
                    // Drain what else is queued before touching the kernel once.
                    while let Ok(ev) = events.try_recv() {
                        changed |= self.rib.apply(&ev);
                    }
                    if changed {
                        self.push_routes();
                    }
                }
                () = &mut shutdown => break,
            }
        }
        info!("shutting down");
        self.bgp
    }

    /// Ends the session with `addr` while still draining BGP events: the
    /// session may be waiting to hand over an event before it can stop.
    async fn remove_peer(&mut self, addr: IpAddr, events: &mut mpsc::Receiver<BgpEvent>) {
        let Agent { bgp, rib, .. } = self;
        let removal = bgp.remove_peer(addr);
        tokio::pin!(removal);
        loop {
            tokio::select! {
                () = &mut removal => break,
                Some(ev) = events.recv() => { rib.apply(&ev); }
            }
        }
    }

    async fn reconcile(&mut self, events: &mut mpsc::Receiver<BgpEvent>) {
        let ds = Arc::clone(&self.ds);
        let view = match tokio::task::spawn_blocking(move || load_view(&ds)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                warn!(error = %e, "reading the datastore failed");
                return;
            }
            Err(e) => {
                warn!(error = %e, "datastore reader panicked");
                return;
            }
        };
        let me = self.cfg.node_name.clone();
        let want: BTreeMap<IpAddr, PeerSpec> = desired_peers(&view, &me, self.cfg.bgp_address)
            .into_iter()
            .map(|p| (p.addr, p))
            .collect();
        for addr in self
            .peers
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect::<Vec<_>>()
        {
            info!(peer = %addr, "removing peer");
            self.remove_peer(addr, events).await;
            self.peers.remove(&addr);
            self.rib.apply(&BgpEvent::PeerDown { peer: addr });
        }
        for (addr, spec) in &want {
            if self.peers.get(addr) != Some(spec) {
                info!(peer = %addr, peer_type = %spec.peer_type, asn = spec.asn, "adding peer");
                if self.peers.contains_key(addr) {
                    self.remove_peer(*addr, events).await;
                }
                self.bgp.add_peer(spec);
                self.peers.insert(*addr, spec.clone());
            }
        }
        let peer_types = self.peers.iter().map(|(a, s)| (*a, s.peer_type)).collect();
        self.import = ImportPolicy::new(&view, &me, &peer_types, &self.uplink_nets);
        let prefixes = local_prefixes(&view, &me);
        for p in self.originated.difference(&prefixes) {
            info!(prefix = %p, "withdrawing");
            self.bgp.withdraw(*p);
        }
        for p in prefixes.difference(&self.originated) {
            info!(prefix = %p, "announcing");
            self.bgp.announce(*p);
        }
        self.originated = prefixes;
        self.blocks = local_blocks(&view, &me);
        self.push_routes();
        if let Some(tx) = &self.proxy {
            let facts = node_facts(&self.cfg, &view);
            // Never wait on the proxy (its syncs block on iptables-restore):
            // when its queue is full, the next pass tries again.
            if self.facts.as_ref() != Some(&facts)
                && tx
                    .try_send(ProxyEvent::Node(Box::new(facts.clone())))
                    .is_ok()
            {
                self.facts = Some(facts);
            }
        }
        let rows = self.bgp.status();
        if let Ok(mut s) = self.shared.lock() {
            s.status = NodeStatus {
                node: me,
                asn: self.cfg.as_number.unwrap_or(view.bgp.as_number),
                address: self.cfg.bgp_address.to_string(),
                peers: rows,
            };
            s.ready = true;
            s.last_pass = Some(Instant::now());
            s.learned = self.rib.len();
            s.originated = self.originated.len();
            s.routes = self.routes.stats();
        }
    }

    fn push_routes(&self) {
        let best = self.rib.best_where(|p, peer| self.import.accepts(peer, p));
        self.routes.set(kernel_routes(
            &self.blocks,
            &best,
            self.cfg.bgp_address,
            self.uplink,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_rib_keeps_one_best_path_and_forgets_a_peer_that_went_down() {
        let mut rib = Rib::default();
        assert!(rib.apply(&BgpEvent::Learned {
            peer: ip("10.0.0.3"),
            prefixes: vec![net("10.244.1.0/26")],
            next_hop: ip("10.0.0.3")
        }));
        rib.apply(&BgpEvent::Learned {
            peer: ip("10.0.0.2"),
            prefixes: vec![net("10.244.1.0/26")],
            next_hop: ip("10.0.0.9"),
        });
        assert_eq!(
            rib.best()[&net("10.244.1.0/26")],
            ip("10.0.0.9"),
            "the lowest peer address wins"
        );
        assert!(rib.apply(&BgpEvent::PeerDown {
            peer: ip("10.0.0.2")
        }));
        assert_eq!(rib.best()[&net("10.244.1.0/26")], ip("10.0.0.3"));
        assert!(rib.apply(&BgpEvent::Withdrawn {
            peer: ip("10.0.0.3"),
            prefixes: vec![net("10.244.1.0/26")]
        }));
        assert!(rib.is_empty());
        assert!(!rib.apply(&BgpEvent::PeerDown {
            peer: ip("10.0.0.3")
        }));
    }
}
