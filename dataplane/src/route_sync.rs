//! Owning the routes of one protocol number, pure: what the kernel must do
//! for a daemon's route changes, and the repair of a dump against what the
//! daemon wants (as BIRD's kernel protocol compares its scans with its
//! table). The caller applies the [`KernelOps`] (with a
//! [`RouteBatch`](crate::RouteBatch)).
//!
//! - Routes of other protocols (pod routes of the CNI plugin, say) are
//!   never replaced: their destinations are *foreign*.
//! - The routes of ours a previous run left, except blackholes, are
//!   *inherited*: while a grace lasts they stay even when nothing wants
//!   them (the daemon's peers are not back yet), unless this run replaces
//!   or deletes them itself.
//! - A route the kernel refused is *refused*: it is not sent again (a
//!   peer's unusable route would otherwise fail, and be logged, on every
//!   resync) until the daemon wants something else for its destination.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::netlink::{Route, RouteKind};

/// One change of the routes a daemon wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// Add the route, or replace the one with its destination.
    Upsert(Route),
    /// Remove our route to this destination.
    Delete(IpNetwork),
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

/// What the daemon wants, as the repair reads it.
pub trait Desired {
    /// The route wanted to `dst`.
    fn route(&self, dst: IpNetwork) -> Option<Route>;
    /// Every wanted route.
    fn routes(&self) -> Box<dyn Iterator<Item = Route> + '_>;
}

/// A kernel route of ours, without its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    gateway: Option<IpAddr>,
    oif: Option<u32>,
    kind: RouteKind,
}

impl Seen {
    fn route(&self, dst: IpNetwork, protocol: u8) -> Route {
        let mut r = Route::new(dst).with_protocol(protocol);
        (r.gateway, r.oif, r.kind) = (self.gateway, self.oif, self.kind);
        r
    }

    /// Whether it is `want` (the kernel fills in an oif left open).
    fn is(&self, want: &Route) -> bool {
        self.gateway == want.gateway
            && self.kind == want.kind
            && (want.oif.is_none() || self.oif == want.oif)
    }
}

/// The kernel's routes of one protocol, sorted, and the destinations of
/// the others, as one dump found them (compact: no whole [`Route`]s).
#[derive(Debug, Default)]
pub struct KernelRoutes {
    protocol: u8,
    ours: Vec<(IpNetwork, Seen)>,
    foreign: BTreeSet<IpNetwork>,
}

/// A dump of the kernel's routes, handing each to the callback.
pub type KernelRead<'a, E> = &'a mut dyn FnMut(&mut dyn FnMut(Route)) -> Result<(), E>;

impl KernelRoutes {
    /// Reads a dump with `read`, sorting out the routes of `protocol`.
    pub fn read<E>(protocol: u8, read: KernelRead<'_, E>) -> Result<Self, E> {
        let mut k = KernelRoutes {
            protocol,
            ..KernelRoutes::default()
        };
        read(&mut |r: Route| {
            if r.protocol == protocol {
                let seen = Seen {
                    gateway: r.gateway,
                    oif: r.oif,
                    kind: r.kind,
                };
                k.ours.push((r.dst, seen));
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

/// The state of a daemon's route owner: foreign destinations, inherited
/// routes, and the routes the kernel refused.
#[derive(Debug)]
pub struct OwnedRoutes {
    protocol: u8,
    foreign: BTreeSet<IpNetwork>,
    inherited: BTreeSet<IpNetwork>,
    /// Refused routes, by destination, exactly as they were sent.
    refused: BTreeMap<IpNetwork, Route>,
}

impl OwnedRoutes {
    /// Owns the routes of `protocol`, learning the kernel at start.
    pub fn start(kernel: KernelRoutes) -> Self {
        OwnedRoutes {
            protocol: kernel.protocol,
            foreign: kernel.foreign,
            inherited: (kernel.ours.into_iter())
                .filter(|(_, r)| r.kind != RouteKind::Blackhole)
                .map(|(dst, _)| dst)
                .collect(),
            refused: BTreeMap::new(),
        }
    }

    /// What the kernel must do for the daemon's changes.
    pub fn change(&mut self, changes: Vec<RouteChange>) -> KernelOps {
        let mut ops = KernelOps::default();
        for change in changes {
            match change {
                RouteChange::Upsert(r) => {
                    self.inherited.remove(&r.dst);
                    if !self.foreign.contains(&r.dst) && !self.was_refused(&r) {
                        ops.replace.push(r);
                    }
                }
                RouteChange::Delete(dst) if !self.inherited.contains(&dst) => {
                    self.refused.remove(&dst);
                    ops.delete
                        .push(Route::matching(dst).with_protocol(self.protocol));
                }
                RouteChange::Delete(_) => {}
            }
        }
        ops
    }

    /// Compares a dump with what `want` says: replaces what differs or is
    /// missing, deletes our routes nobody wants (inherited ones only once
    /// `grace` is over). Refused routes are not sent again.
    pub fn resync(&mut self, grace: bool, kernel: KernelRoutes, want: &dyn Desired) -> KernelOps {
        let mut ops = KernelOps::default();
        self.refused
            .retain(|dst, r| want.route(*dst).as_ref() == Some(&*r));
        for (dst, seen) in &kernel.ours {
            match want.route(*dst) {
                Some(w) if seen.is(&w) || self.was_refused(&w) => {}
                Some(w) if !kernel.foreign.contains(dst) => ops.replace.push(w),
                Some(_) => {}
                None if grace && self.inherited.contains(dst) => {}
                None => ops.delete.push(seen.route(*dst, self.protocol)),
            }
        }
        let missing = want.routes().filter(|r| {
            !kernel.has_ours(&r.dst) && !kernel.foreign.contains(&r.dst) && !self.was_refused(r)
        });
        ops.replace.extend(missing);
        self.foreign = kernel.foreign;
        if !grace {
            self.inherited = BTreeSet::new();
        }
        ops
    }

    /// Notes which of `ops` the kernel refused: they are not tried again
    /// until the daemon wants another route to their destination.
    pub fn record(&mut self, ops: &KernelOps, failed: &BTreeSet<IpNetwork>) {
        for r in &ops.replace {
            if failed.contains(&r.dst) {
                self.refused.insert(r.dst, r.clone());
            } else {
                self.refused.remove(&r.dst);
            }
        }
    }

    /// Whether the kernel refused exactly this route before.
    fn was_refused(&self, r: &Route) -> bool {
        self.refused.get(&r.dst) == Some(r)
    }

    /// How many of ours are believed to be in the kernel, of `wanted`.
    pub fn installed(&self, wanted: usize) -> u64 {
        (wanted.saturating_sub(self.refused.len()) + self.inherited.len()) as u64
    }
}

#[cfg(test)]
mod tests;
