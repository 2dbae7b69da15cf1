//! The kernel side of routing: one thread owns the netlink sockets and turns
//! each new desired route set into batches of replace/delete requests.
//!
//! ```text
//!  agent task ──Vec<Route> (latest wins)──▶ route thread ──rtnetlink──▶ kernel
//! ```
//!
//! The thread remembers what it applied, so a change costs only its own
//! netlink calls; it re-reads the kernel (our protocol's routes, and the
//! destinations other protocols own) on start and every `RESYNC`, which
//! also removes stale routes a previous run left behind. A route the kernel
//! refuses is logged once and not tried again until it changes ([`Refused`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tabby_dataplane::{Family, Netlink, Route, RouteBatch, RouteKind};
use tracing::{debug, info, warn};

use crate::desired::{diff, RTPROT_TABBY};

/// How often the kernel is re-read in full.
pub const RESYNC: Duration = Duration::from_secs(30);

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

/// Handle of the route thread; dropping it stops the thread.
pub struct RouteProgrammer {
    tx: Option<Sender<Vec<Route>>>,
    thread: Option<JoinHandle<()>>,
    stats: std::sync::Arc<std::sync::Mutex<RouteStats>>,
}

impl RouteProgrammer {
    /// Starts the thread with a netlink socket in the current thread's netns.
    /// For `startup_grace` after the start, learned routes a previous run left
    /// are kept even when nothing wants them yet, so that a restart does not
    /// cut cross-node traffic until the BGP sessions are back (like BGP
    /// graceful restart); blackholes and changed routes are applied at once.
    pub fn start(startup_grace: Duration) -> crate::error::Result<Self> {
        let nl = Netlink::host()?;
        let batch = RouteBatch::open()?;
        let (tx, rx) = mpsc::channel();
        let stats = std::sync::Arc::new(std::sync::Mutex::new(RouteStats::default()));
        let s2 = std::sync::Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("tabby-routes".into())
            .spawn(move || run(nl, batch, rx, s2, startup_grace))
            .map_err(|e| crate::error::AgentError::Io {
                context: "start the route thread".into(),
                source: e,
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// Hands over the complete desired set of our routes.
    pub fn set(&self, routes: Vec<Route>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(routes);
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

struct Kernel {
    applied: BTreeMap<IpNetwork, Route>,
    foreign: BTreeSet<IpNetwork>,
}

/// Routes the kernel refused, by destination. An identical route is not
/// sent again (a peer's unusable route would otherwise fail, and be logged,
/// on every pass); a changed one, or one no longer wanted, is forgotten.
#[derive(Debug, Default)]
pub struct Refused(BTreeMap<IpNetwork, Route>);

impl Refused {
    /// Removes from `replace` the routes refused before exactly as they are,
    /// and forgets refusals `want` no longer asks for as they were.
    pub fn skip(&mut self, replace: &mut Vec<Route>, want: &[Route]) {
        if self.0.is_empty() {
            return;
        }
        let wanted: BTreeMap<&IpNetwork, &Route> = want.iter().map(|r| (&r.dst, r)).collect();
        self.0.retain(|dst, r| wanted.get(dst) == Some(&&*r));
        replace.retain(|r| self.0.get(&r.dst) != Some(r));
    }

    /// Records the routes of `replace` that are among `failed`.
    pub fn record<E>(&mut self, replace: &[Route], failed: &[(Route, E)]) {
        for (route, _) in failed {
            if replace.contains(route) {
                self.0.insert(route.dst, route.clone());
            }
        }
    }
}

fn read_kernel(nl: &Netlink) -> tabby_dataplane::Result<Kernel> {
    let mut applied = BTreeMap::new();
    let mut foreign = BTreeSet::new();
    for fam in [Family::V4, Family::V6] {
        for r in nl.routes(fam)? {
            if r.protocol == RTPROT_TABBY {
                applied.insert(r.dst, r);
            } else if r.dst.prefix() > 0 {
                foreign.insert(r.dst);
            }
        }
    }
    Ok(Kernel { applied, foreign })
}

fn run(
    nl: Netlink,
    mut batch: RouteBatch,
    rx: Receiver<Vec<Route>>,
    stats: std::sync::Arc<std::sync::Mutex<RouteStats>>,
    startup_grace: Duration,
) {
    let mut kernel: Option<Kernel> = None;
    let mut desired: Option<Vec<Route>> = None;
    let mut last_full = Instant::now();
    let grace_ends = Instant::now() + startup_grace;
    // Learned routes a previous run left: kept through the grace unless
    // this run wants them gone by replacing them.
    let mut inherited: Option<BTreeSet<IpNetwork>> = None;
    let mut refused = Refused::default();
    loop {
        let now = Instant::now();
        let wait = if now < grace_ends {
            (grace_ends - now).min(RESYNC)
        } else {
            RESYNC
        };
        match rx.recv_timeout(wait) {
            Ok(mut d) => {
                // Coalesce: only the newest set matters.
                while let Ok(newer) = rx.try_recv() {
                    d = newer;
                }
                desired = Some(d);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if kernel.is_none() || last_full.elapsed() >= RESYNC {
            match read_kernel(&nl) {
                Ok(k) => {
                    kernel = Some(k);
                    last_full = Instant::now();
                }
                Err(e) => {
                    warn!(error = %e, "reading the kernel's routes failed; retrying later");
                    continue;
                }
            }
        }
        let (Some(k), Some(want)) = (kernel.as_mut(), desired.as_ref()) else {
            continue;
        };
        let inherited = inherited.get_or_insert_with(|| {
            k.applied
                .values()
                .filter(|r| r.kind != RouteKind::Blackhole)
                .map(|r| r.dst)
                .collect()
        });
        if Instant::now() >= grace_ends {
            inherited.clear();
        }
        apply(&mut batch, k, want, &stats, inherited, &mut refused);
    }
}

fn apply(
    batch: &mut RouteBatch,
    k: &mut Kernel,
    want: &[Route],
    stats: &std::sync::Mutex<RouteStats>,
    inherited: &mut BTreeSet<IpNetwork>,
    refused: &mut Refused,
) {
    let (mut replace, mut delete) = diff(&k.applied, want, &k.foreign);
    refused.skip(&mut replace, want);
    for r in &replace {
        inherited.remove(&r.dst);
    }
    // Inherited learned routes wait out the grace; routes this run installed
    // (and every blackhole) follow the desired set at once.
    delete.retain(|r| !inherited.contains(&r.dst));
    if replace.is_empty() && delete.is_empty() {
        return;
    }
    let failed = batch.apply(&delete, &replace);
    for (route, error) in &failed {
        warn!(%route, %error, "route change failed; not retried until the route changes");
    }
    refused.record(&replace, &failed);
    let failed_dst: BTreeSet<IpNetwork> = failed.iter().map(|(r, _)| r.dst).collect();
    for r in delete.iter().filter(|r| !failed_dst.contains(&r.dst)) {
        k.applied.remove(&r.dst);
    }
    for r in replace.iter().filter(|r| !failed_dst.contains(&r.dst)) {
        k.applied.insert(r.dst, r.clone());
    }
    let (ok_d, ok_r) = (
        delete
            .iter()
            .filter(|r| !failed_dst.contains(&r.dst))
            .count() as u64,
        replace
            .iter()
            .filter(|r| !failed_dst.contains(&r.dst))
            .count() as u64,
    );
    if ok_r + ok_d < 50 {
        debug!(replaced = ok_r, deleted = ok_d, "routes synced");
    } else {
        info!(replaced = ok_r, deleted = ok_d, "routes synced");
    }
    if let Ok(mut s) = stats.lock() {
        s.replaced += ok_r;
        s.deleted += ok_d;
        s.errors += failed.len() as u64;
        s.installed = k.applied.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, via: &str) -> Route {
        Route::new(dst.parse().unwrap()).via(via.parse().unwrap())
    }

    #[test]
    fn a_refused_route_is_skipped_until_it_changes_or_goes() {
        let mut refused = Refused::default();
        let bad = route("10.77.0.0/24", "10.55.0.1");
        let good = route("10.78.0.0/24", "10.98.0.1");
        refused.record(
            &[bad.clone(), good.clone()],
            &[(bad.clone(), "ENETUNREACH")],
        );
        let want = vec![bad.clone(), good.clone()];
        let mut replace = want.clone();
        refused.skip(&mut replace, &want);
        assert_eq!(replace, vec![good.clone()]);
        // Changed: tried again.
        let changed = vec![route("10.77.0.0/24", "10.55.0.2")];
        let mut replace = changed.clone();
        refused.skip(&mut replace, &changed);
        assert_eq!(replace, changed);
        // The old refusal is forgotten: the first route may come back.
        let bad = vec![bad];
        let mut replace = bad.clone();
        refused.skip(&mut replace, &bad);
        assert_eq!(replace, bad);
    }
}
