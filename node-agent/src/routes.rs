//! The kernel side of routing: one thread owns the netlink sockets and
//! applies the agent's route changes in batches.
//!
//! ```text
//!  agent task ──Changes(Vec<RouteChange>) / Ready (bounded)──▶ route thread ──RouteBatch──▶ kernel
//!                                                                │ ▲
//!                                   at start, on Ready, every RESYNC: dump the kernel, repair
//! ```
//!
//! The agent sends only what changed (a prefix's best path moved, a block
//! came or went), so that a change costs only its own netlink calls. The
//! desired set is never copied: it is a function of the [`RouteSource`]
//! (learned routes and local blocks) the agent changes and the thread reads
//! under a lock for its periodic resync against the kernel, which repairs
//! what someone else changed and removes stale routes a previous run left
//! behind (as BIRD's kernel protocol compares its scans with its one table).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tabby_dataplane::route_sync::{Desired, KernelOps, KernelRoutes, OwnedRoutes, RouteChange};
use tabby_dataplane::{Family, Netlink, Route, RouteBatch, RouteKind};
use tabby_errors::chain;
use tracing::{debug, info, warn};

use crate::desired::RTPROT_TABBY;
use crate::encap::EncapRoutes;
use crate::error::AgentError;
use crate::plan::desired_route;
use tabby_bgp::rib::Rib;

/// How often the kernel is re-read in full.
pub const RESYNC: Duration = Duration::from_secs(30);

/// Messages in flight to the route thread; the agent waits beyond that.
const QUEUE: usize = 2;

/// Counters of the route thread, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Routes replaced (added or changed) so far.
    pub replaced: u64,
    /// Routes deleted so far.
    pub deleted: u64,
    /// Netlink calls that failed.
    pub errors: u64,
    /// Routes currently installed by us.
    pub installed: u64,
    /// Full reads of the kernel compared with the source (at start, on
    /// Ready, every [`RESYNC`]).
    pub resyncs: u64,
}

enum Msg {
    Changes(Vec<RouteChange>),
    Ready,
}

/// What the kernel routes follow: the learned routes and the local
/// blocks. The agent changes it; the route thread reads it to repair.
#[derive(Debug, Clone)]
pub struct RouteSource {
    /// Learned routes.
    pub rib: Rib<IpNetwork, IpAddr>,
    /// This node's blocks (blackholes).
    pub blocks: BTreeSet<IpNetwork>,
    /// This node's address (a learned route via it is no route).
    pub my_addr: IpAddr,
    /// Where learned routes go out.
    pub uplink: u32,
    /// Tunnel routes and how learned routes are encapsulated.
    pub encap: EncapRoutes,
}

impl RouteSource {
    /// Nothing learned, no blocks yet.
    pub fn new(my_addr: IpAddr, uplink: u32) -> Self {
        RouteSource {
            rib: Rib::default(),
            blocks: BTreeSet::new(),
            my_addr,
            uplink,
            encap: EncapRoutes::default(),
        }
    }

    /// The route wanted for `prefix`: a local block's blackhole, else the
    /// tunnel route the datastore asks for, else what BGP learned
    /// (encapsulated when its pool says so).
    pub fn route(&self, prefix: IpNetwork) -> Option<Route> {
        let best = self.rib.best(&prefix);
        let native = desired_route(prefix, &self.blocks, best, self.my_addr, self.uplink)?;
        if native.kind != RouteKind::Unicast {
            return Some(native);
        }
        let nh = native.gateway?;
        Some(
            self.encap
                .learned(prefix, nh, self.uplink)
                .unwrap_or(native),
        )
    }

    fn wanted(&self, prefix: IpNetwork) -> Option<Route> {
        if self.blocks.contains(&prefix) {
            return self.route(prefix);
        }
        (self.encap.planned(prefix, self.uplink)).or_else(|| self.route(prefix))
    }

    /// Every wanted route.
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        let holes = self.blocks.iter().filter_map(|b| self.wanted(*b));
        let tunnels = (self.encap.routes.keys())
            .filter(|p| !self.blocks.contains(p))
            .filter_map(|p| self.wanted(*p));
        let learned = (self.rib.best_paths())
            .filter(|(p, _)| !self.blocks.contains(p) && !self.encap.routes.contains_key(p))
            .filter_map(|(p, _)| self.wanted(p));
        holes.chain(tunnels).chain(learned)
    }

    /// The changes of `prefixes` (any order, repeats allowed).
    pub fn changes(&self, mut prefixes: Vec<IpNetwork>) -> Vec<RouteChange> {
        prefixes.sort_unstable();
        prefixes.dedup();
        (prefixes.into_iter())
            .map(|p| match self.wanted(p) {
                Some(r) => RouteChange::Upsert(r),
                None => RouteChange::Delete(p),
            })
            .collect()
    }

    /// Replaces the encapsulation; returns the prefixes whose route may
    /// have moved (all tunnel routes before and after, and every learned
    /// prefix when the resolution or a device changed).
    pub fn set_encap(&mut self, encap: EncapRoutes) -> Vec<IpNetwork> {
        if encap == self.encap {
            return Vec::new();
        }
        let mut changed: Vec<IpNetwork> = (self.encap.routes.keys())
            .chain(encap.routes.keys())
            .copied()
            .collect();
        let same_resolution = (encap.resolver == self.encap.resolver)
            && (encap.vxlan, encap.ipip) == (self.encap.vxlan, self.encap.ipip);
        if !same_resolution {
            changed.extend(self.rib.best_paths().map(|(p, _)| p));
        }
        self.encap = encap;
        changed
    }
}

impl Desired for RouteSource {
    fn route(&self, dst: IpNetwork) -> Option<Route> {
        RouteSource::wanted(self, dst)
    }
    fn routes(&self) -> Box<dyn Iterator<Item = Route> + '_> {
        Box::new(RouteSource::routes(self))
    }
}

/// Handle of the route thread; dropping it stops the thread.
pub struct RouteProgrammer {
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<RouteStats>>,
}

impl RouteProgrammer {
    /// Starts the thread with a netlink socket in the current thread's
    /// netns, repairing the kernel against `source`. For `startup_grace`
    /// after the start, learned routes a previous run left are kept even
    /// when nothing wants them yet, so that a restart does not cut
    /// cross-node traffic until the BGP sessions are back (the restarting
    /// side of BGP graceful restart); blackholes and routes this run
    /// changed follow at once.
    pub fn start(
        startup_grace: Duration,
        source: Arc<Mutex<RouteSource>>,
    ) -> crate::error::Result<Self> {
        let nl = Netlink::host().map_err(AgentError::RouteSockets)?;
        let batch = RouteBatch::open().map_err(AgentError::RouteSockets)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let stats = Arc::new(Mutex::new(RouteStats::default()));
        let thread = Thread {
            nl,
            batch,
            stats: Arc::clone(&stats),
            source,
            table: None,
            grace_ends: Instant::now() + startup_grace,
            ready: false,
        };
        let thread = std::thread::Builder::new()
            .name("tabby-routes".into())
            .spawn(move || thread.run(rx))
            .map_err(|e| AgentError::Io {
                context: "start the route thread".into(),
                source: e,
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// Hands over changes; waits (off the async workers) while the thread
    /// is `QUEUE` messages behind, so that a burst of learned routes slows
    /// the BGP sessions down instead of piling up here.
    pub async fn apply(&self, changes: Vec<RouteChange>) {
        if !changes.is_empty() {
            self.send(Msg::Changes(changes)).await;
        }
    }

    /// Says the source is complete (the first datastore pass is done): from
    /// now on routes nobody wants are removed (after the grace for inherited ones).
    pub async fn ready(&self) {
        self.send(Msg::Ready).await;
    }

    async fn send(&self, msg: Msg) {
        let Some(tx) = &self.tx else { return };
        if let Err(TrySendError::Full(msg)) = tx.try_send(msg) {
            let tx = tx.clone();
            let _ = tokio::task::spawn_blocking(move || tx.send(msg)).await;
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> RouteStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

impl Drop for RouteProgrammer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The route thread's own state.
struct Thread {
    nl: Netlink,
    batch: RouteBatch,
    stats: Arc<Mutex<RouteStats>>,
    source: Arc<Mutex<RouteSource>>,
    /// Set by the first read of the kernel.
    table: Option<OwnedRoutes>,
    grace_ends: Instant,
    ready: bool,
}

impl Thread {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut due = Instant::now();
        loop {
            match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(Msg::Changes(changes)) => {
                    // Before the first read of the kernel, the resync installs them.
                    if let Some(table) = &mut self.table {
                        let ops = table.change(changes);
                        self.apply(ops);
                    }
                }
                Ok(Msg::Ready) => {
                    self.ready = true;
                    due = Instant::now();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= due {
                due = self.repair();
            }
        }
    }

    /// Reads the kernel (first to learn it, then to repair it); returns
    /// when to do it again.
    fn repair(&mut self) -> Instant {
        let now = Instant::now();
        let in_grace = now < self.grace_ends;
        let nl = &self.nl;
        let mut read = |f: &mut dyn FnMut(Route)| -> tabby_dataplane::Result<()> {
            nl.for_each_route(Family::V4, &mut *f)?;
            nl.for_each_route(Family::V6, &mut *f)
        };
        let kernel = match KernelRoutes::read(RTPROT_TABBY, &mut read) {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %chain(&e), "reading the kernel's routes failed; retrying");
                return now + Duration::from_secs(1);
            }
        };
        let Some(table) = &mut self.table else {
            self.table = Some(OwnedRoutes::start(kernel));
            return if self.ready { now } else { now + RESYNC };
        };
        if !self.ready {
            return now + RESYNC;
        }
        let ops = match self.source.lock() {
            Ok(source) => table.resync(in_grace, kernel, &*source),
            Err(_) => return now + RESYNC,
        };
        self.apply(ops);
        if let Ok(mut s) = self.stats.lock() {
            s.resyncs += 1;
        }
        if in_grace {
            self.grace_ends.min(now + RESYNC)
        } else {
            now + RESYNC
        }
    }

    fn apply(&mut self, ops: KernelOps) {
        let failed = if ops.replace.is_empty() && ops.delete.is_empty() {
            Vec::new()
        } else {
            self.batch.apply(&ops.delete, &ops.replace)
        };
        for (route, error) in &failed {
            warn!(%route, error = %chain(error), "route change failed");
        }
        let failed_dst: BTreeSet<IpNetwork> = failed.iter().map(|(r, _)| r.dst).collect();
        let Some(table) = &mut self.table else { return };
        table.record(&ops, &failed_dst);
        let ok = |rs: &[Route]| rs.iter().filter(|r| !failed_dst.contains(&r.dst)).count() as u64;
        let (ok_r, ok_d) = (ok(&ops.replace), ok(&ops.delete));
        if ok_r + ok_d >= 50 {
            info!(replaced = ok_r, deleted = ok_d, "routes synced");
        } else if ok_r + ok_d > 0 {
            debug!(replaced = ok_r, deleted = ok_d, "routes synced");
        }
        let wanted =
            (self.source.lock()).map(|s| s.rib.len() + s.blocks.len() + s.encap.routes.len());
        if let Ok(mut s) = self.stats.lock() {
            s.replaced += ok_r;
            s.deleted += ok_d;
            s.errors += failed.len() as u64;
            s.installed = table.installed(wanted.unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests;
