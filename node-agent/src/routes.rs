//! The kernel side of routing: one thread owns a netlink socket and turns
//! each new desired route set into replace/delete calls.
//!
//! ```text
//!  agent task ──Vec<Route> (latest wins)──▶ route thread ──rtnetlink──▶ kernel
//! ```
//!
//! The thread remembers what it applied, so a change costs only its own
//! netlink calls; it re-reads the kernel (our protocol's routes, and the
//! destinations other protocols own) on start and every `RESYNC`, which
//! also removes stale routes a previous run left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tabby_dataplane::{Family, Netlink, Route};
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
    pub fn start() -> crate::error::Result<Self> {
        let nl = Netlink::host()?;
        let (tx, rx) = mpsc::channel();
        let stats = std::sync::Arc::new(std::sync::Mutex::new(RouteStats::default()));
        let s2 = std::sync::Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("tabby-routes".into())
            .spawn(move || run(nl, rx, s2))
            .map_err(|e| crate::error::AgentError::Io { context: "start the route thread".into(), source: e })?;
        Ok(Self { tx: Some(tx), thread: Some(thread), stats })
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

fn run(nl: Netlink, rx: Receiver<Vec<Route>>, stats: std::sync::Arc<std::sync::Mutex<RouteStats>>) {
    let mut kernel: Option<Kernel> = None;
    let mut desired: Option<Vec<Route>> = None;
    let mut last_full = Instant::now();
    loop {
        match rx.recv_timeout(RESYNC) {
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
        let (Some(k), Some(want)) = (kernel.as_mut(), desired.as_ref()) else { continue };
        apply(&nl, k, want, &stats);
    }
}

fn apply(nl: &Netlink, k: &mut Kernel, want: &[Route], stats: &std::sync::Mutex<RouteStats>) {
    let current: Vec<Route> = k.applied.values().cloned().collect();
    let (replace, delete) = diff(&current, want, &k.foreign);
    if replace.is_empty() && delete.is_empty() {
        return;
    }
    let (mut ok_r, mut ok_d, mut errors) = (0u64, 0u64, 0u64);
    for r in &delete {
        match nl.delete_route(r) {
            Ok(_) => {
                k.applied.remove(&r.dst);
                ok_d += 1;
            }
            Err(e) => {
                errors += 1;
                warn!(route = %r, error = %e, "delete route");
            }
        }
    }
    for r in &replace {
        match nl.replace_route(r) {
            Ok(()) => {
                k.applied.insert(r.dst, r.clone());
                ok_r += 1;
            }
            Err(e) => {
                errors += 1;
                warn!(route = %r, error = %e, "replace route");
            }
        }
    }
    if ok_r + ok_d < 50 {
        debug!(replaced = ok_r, deleted = ok_d, "routes synced");
    } else {
        info!(replaced = ok_r, deleted = ok_d, "routes synced");
    }
    if let Ok(mut s) = stats.lock() {
        s.replaced += ok_r;
        s.deleted += ok_d;
        s.errors += errors;
        s.installed = k.applied.len() as u64;
    }
}
