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
use tabby_dataplane::{Family, Netlink, Route, RouteBatch, RouteKind};
use tabby_errors::chain;
use tracing::{debug, info, warn};

use crate::desired::RTPROT_TABBY;
use crate::error::AgentError;
use crate::plan::{desired_route, route_changes};
use crate::rib::Rib;

/// How often the kernel is re-read in full.
pub const RESYNC: Duration = Duration::from_secs(30);

/// Messages in flight to the route thread; the agent waits beyond that.
const QUEUE: usize = 2;

/// One change of this node's kernel routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// Add the route, or replace the one with its destination.
    Upsert(Route),
    /// Remove our route to this destination.
    Delete(IpNetwork),
}

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
}

enum Msg {
    Changes(Vec<RouteChange>),
    Ready,
}

/// What the kernel should hear: routes to delete and to replace, each
/// destination at most once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelOps {
    /// Routes to delete.
    pub delete: Vec<Route>,
    /// Routes to add or replace.
    pub replace: Vec<Route>,
}

/// What the kernel routes follow: the learned routes and the local
/// blocks. The agent changes it; the route thread reads it to repair.
#[derive(Debug, Clone)]
pub struct RouteSource {
    /// Learned routes.
    pub rib: Rib,
    /// This node's blocks (blackholes).
    pub blocks: BTreeSet<IpNetwork>,
    /// This node's address (a learned route via it is no route).
    pub my_addr: IpAddr,
    /// Where learned routes go out.
    pub uplink: u32,
}

impl RouteSource {
    /// Nothing learned, no blocks yet.
    pub fn new(my_addr: IpAddr, uplink: u32) -> Self {
        RouteSource {
            rib: Rib::default(),
            blocks: BTreeSet::new(),
            my_addr,
            uplink,
        }
    }

    /// The route wanted for `prefix`.
    pub fn route(&self, prefix: IpNetwork) -> Option<Route> {
        let best = self.rib.best(&prefix);
        desired_route(prefix, &self.blocks, best, self.my_addr, self.uplink)
    }

    /// Every wanted route.
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        let holes = self.blocks.iter().filter_map(|b| self.route(*b));
        let learned = (self.rib.best_paths())
            .filter(|(p, _)| !self.blocks.contains(p))
            .filter_map(|(p, _)| self.route(p));
        holes.chain(learned)
    }

    /// The changes of `prefixes` (any order, repeats allowed).
    pub fn changes(&self, mut prefixes: Vec<IpNetwork>) -> Vec<RouteChange> {
        prefixes.sort_unstable();
        prefixes.dedup();
        let best = |p: &IpNetwork| self.rib.best(p);
        route_changes(&prefixes, &self.blocks, best, self.my_addr, self.uplink)
    }
}

/// A kernel route of ours, without its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    gateway: Option<IpAddr>,
    oif: Option<u32>,
    kind: RouteKind,
}

impl Seen {
    fn of(r: &Route) -> Self {
        Seen {
            gateway: r.gateway,
            oif: r.oif,
            kind: r.kind,
        }
    }

    fn route(&self, dst: IpNetwork) -> Route {
        let mut r = Route::new(dst).with_protocol(RTPROT_TABBY);
        (r.gateway, r.oif, r.kind) = (self.gateway, self.oif, self.kind);
        r
    }

    /// Whether it is `want` (the kernel fills in an oif we left open).
    fn is(&self, want: &Route) -> bool {
        self.gateway == want.gateway
            && self.kind == want.kind
            && (want.oif.is_none() || self.oif == want.oif)
    }
}

/// The kernel's routes of our protocol, sorted, and the destinations of
/// other protocols, as one dump found them.
#[derive(Debug, Default)]
pub struct KernelRoutes {
    ours: Vec<(IpNetwork, Seen)>,
    foreign: BTreeSet<IpNetwork>,
}

impl KernelRoutes {
    /// Reads them with `read`.
    pub fn read<E>(read: KernelRead<'_, E>) -> Result<Self, E> {
        let mut k = KernelRoutes::default();
        read(&mut |r: Route| {
            if r.protocol == RTPROT_TABBY {
                k.ours.push((r.dst, Seen::of(&r)));
            } else if r.dst.prefix() > 0 {
                k.foreign.insert(r.dst);
            }
        })?;
        k.ours.sort_unstable_by_key(|(dst, _)| *dst);
        Ok(k)
    }

    fn has_ours(&self, dst: &IpNetwork) -> bool {
        self.ours.binary_search_by_key(dst, |(d, _)| *d).is_ok()
    }
}

/// The route thread's state, pure: the destinations other protocols own
/// (pod routes: never replaced), the learned routes a previous run left
/// (kept through the start grace) and the routes the kernel refused.
#[derive(Debug, Default)]
pub struct RouteTable {
    foreign: BTreeSet<IpNetwork>,
    inherited: BTreeSet<IpNetwork>,
    failed: BTreeSet<IpNetwork>,
}

/// Reads the kernel's routes, handing each to the callback.
pub type KernelRead<'a, E> = &'a mut dyn FnMut(&mut dyn FnMut(Route)) -> Result<(), E>;

impl RouteTable {
    /// Learns the kernel at start: foreign destinations, and our learned
    /// routes (inherited: kept, unless replaced, while the grace lasts).
    pub fn start(&mut self, kernel: KernelRoutes) {
        self.foreign = kernel.foreign;
        self.inherited = (kernel.ours.into_iter())
            .filter(|(_, r)| r.kind != RouteKind::Blackhole)
            .map(|(dst, _)| dst)
            .collect();
    }

    /// What the kernel must do for the agent's changes.
    pub fn change(&mut self, changes: Vec<RouteChange>) -> KernelOps {
        let mut ops = KernelOps::default();
        for change in changes {
            match change {
                RouteChange::Upsert(r) => {
                    self.inherited.remove(&r.dst);
                    if !self.foreign.contains(&r.dst) {
                        ops.replace.push(r);
                    }
                }
                RouteChange::Delete(dst) if !self.inherited.contains(&dst) => {
                    self.failed.remove(&dst);
                    ops.delete
                        .push(Route::matching(dst).with_protocol(RTPROT_TABBY));
                }
                RouteChange::Delete(_) => {}
            }
        }
        ops
    }

    /// Compares the kernel with what `source` wants: replaces what differs
    /// or is missing, deletes our routes nobody wants (inherited ones only
    /// once `grace` is over).
    pub fn resync(&mut self, grace: bool, kernel: KernelRoutes, source: &RouteSource) -> KernelOps {
        let mut ops = KernelOps::default();
        for (dst, seen) in &kernel.ours {
            match source.route(*dst) {
                Some(want) if seen.is(&want) => {}
                Some(want) if !kernel.foreign.contains(dst) => ops.replace.push(want),
                Some(_) => {}
                None if grace && self.inherited.contains(dst) => {}
                None => ops.delete.push(seen.route(*dst)),
            }
        }
        let missing = source
            .routes()
            .filter(|r| !kernel.has_ours(&r.dst) && !kernel.foreign.contains(&r.dst));
        ops.replace.extend(missing);
        self.foreign = kernel.foreign;
        if !grace {
            self.inherited = BTreeSet::new();
        }
        ops
    }

    /// Notes which of `ops` the kernel refused (the next resync retries them).
    pub fn record(&mut self, ops: &KernelOps, failed: &BTreeSet<IpNetwork>) {
        for r in &ops.replace {
            if failed.contains(&r.dst) {
                self.failed.insert(r.dst);
            } else {
                self.failed.remove(&r.dst);
            }
        }
    }

    /// Our routes believed to be in the kernel, of `wanted`.
    pub fn installed(&self, wanted: usize) -> u64 {
        (wanted.saturating_sub(self.failed.len()) + self.inherited.len()) as u64
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
            table: RouteTable::default(),
            grace_ends: Instant::now() + startup_grace,
            started: false,
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
    table: RouteTable,
    grace_ends: Instant,
    started: bool,
    ready: bool,
}

impl Thread {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut due = Instant::now();
        loop {
            match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(Msg::Changes(changes)) => {
                    // Before the first read of the kernel, the resync installs them.
                    if self.started {
                        let ops = self.table.change(changes);
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
        let kernel = match KernelRoutes::read(&mut read) {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %chain(&e), "reading the kernel's routes failed; retrying");
                return now + Duration::from_secs(1);
            }
        };
        if !self.started {
            self.table.start(kernel);
            self.started = true;
            return if self.ready { now } else { now + RESYNC };
        }
        if !self.ready {
            return now + RESYNC;
        }
        let ops = match self.source.lock() {
            Ok(source) => self.table.resync(in_grace, kernel, &source),
            Err(_) => return now + RESYNC,
        };
        self.apply(ops);
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
        self.table.record(&ops, &failed_dst);
        let ok = |rs: &[Route]| rs.iter().filter(|r| !failed_dst.contains(&r.dst)).count() as u64;
        let (ok_r, ok_d) = (ok(&ops.replace), ok(&ops.delete));
        if ok_r + ok_d >= 50 {
            info!(replaced = ok_r, deleted = ok_d, "routes synced");
        } else if ok_r + ok_d > 0 {
            debug!(replaced = ok_r, deleted = ok_d, "routes synced");
        }
        let wanted = self.source.lock().map(|s| s.rib.len() + s.blocks.len());
        if let Ok(mut s) = self.stats.lock() {
            s.replaced += ok_r;
            s.deleted += ok_d;
            s.errors += failed.len() as u64;
            s.installed = self.table.installed(wanted.unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests;
