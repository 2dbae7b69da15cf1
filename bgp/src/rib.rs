//! A Loc-RIB for the consumer of a [`Speaker`](crate::Speaker): the paths
//! each peer gave for each prefix, the best one per prefix, and the stale
//! marks of graceful restart (RFC 4724). Pure: each change returns the
//! prefixes whose best next hop moved, which is all a route programmer has
//! to hear about.
//!
//! Generic over the prefix and address types (`Ipv4Network`/`Ipv4Addr`
//! here, `IpNetwork`/`IpAddr` in the node agent). Most prefixes have one
//! path (a node's block, learned from that node), so the best path of each
//! prefix sits in a hash map and only the others in an ordered side table:
//! 100,000 learned IPv4 prefixes take about 7 MB.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// One path: the peer, the next hop it gave, and whether it is left over
/// from a session that went down gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Path<A> {
    peer: A,
    next_hop: A,
    stale: bool,
}

/// Learned routes. The best path of a prefix is the one from the lowest
/// peer address (deterministic on every node), stale or not: a stale path
/// still forwards (the restarting peer kept its forwarding state), so it is
/// used until it is replaced or purged.
#[derive(Debug, Clone)]
pub struct Rib<P, A> {
    best: HashMap<P, Path<A>>,
    /// The other paths of a prefix, by peer.
    others: BTreeMap<P, BTreeMap<A, Path<A>>>,
}

impl<P, A> Default for Rib<P, A> {
    fn default() -> Self {
        Rib {
            best: HashMap::new(),
            others: BTreeMap::new(),
        }
    }
}

impl<P: Copy + Ord + Hash, A: Copy + Ord> Rib<P, A> {
    /// `peer` announced `prefixes` via `next_hop` (replacing its earlier
    /// paths, stale ones too); returns the prefixes whose best next hop moved.
    pub fn learn(&mut self, peer: A, prefixes: &[P], next_hop: A) -> Vec<P> {
        let path = Path {
            peer,
            next_hop,
            stale: false,
        };
        let mut changed = Vec::new();
        for p in prefixes {
            self.set(*p, peer, Some(path), &mut changed);
        }
        changed
    }

    /// `peer` withdrew `prefixes`.
    pub fn withdraw(&mut self, peer: A, prefixes: &[P]) -> Vec<P> {
        let mut changed = Vec::new();
        for p in prefixes {
            self.set(*p, peer, None, &mut changed);
        }
        changed
    }

    /// The session with `peer` ended: its paths go.
    pub fn peer_down(&mut self, peer: A) -> Vec<P> {
        self.remove_where(peer, |_| true)
    }

    /// The session with `peer` ended gracefully: its paths stay, marked stale.
    pub fn mark_stale(&mut self, peer: A) {
        let paths =
            (self.best.values_mut()).chain(self.others.values_mut().flat_map(|m| m.values_mut()));
        paths
            .filter(|p| p.peer == peer)
            .for_each(|p| p.stale = true);
    }

    /// `peer` re-sent its routes (or ran out of time): its stale paths go.
    pub fn purge_stale(&mut self, peer: A) -> Vec<P> {
        self.remove_where(peer, |p| p.stale)
    }

    /// Sets (or with `None` removes) the path of `prefix` from `peer`.
    fn set(&mut self, prefix: P, peer: A, path: Option<Path<A>>, changed: &mut Vec<P>) {
        let before = self.best.get(&prefix).copied();
        match (before, path) {
            (Some(b), Some(path)) if b.peer == peer => {
                self.best.insert(prefix, path);
            }
            (Some(b), None) if b.peer == peer => self.promote(prefix),
            (Some(b), Some(path)) if peer < b.peer => {
                self.others.entry(prefix).or_default().insert(b.peer, b);
                self.best.insert(prefix, path);
            }
            (Some(_), Some(path)) => {
                self.others.entry(prefix).or_default().insert(peer, path);
            }
            (Some(_), None) => {
                if let Some(m) = self.others.get_mut(&prefix) {
                    m.remove(&peer);
                    if m.is_empty() {
                        self.others.remove(&prefix);
                    }
                }
            }
            (None, Some(path)) => {
                self.best.insert(prefix, path);
            }
            (None, None) => {}
        }
        if self.best(&prefix) != before.map(|p| p.next_hop) {
            changed.push(prefix);
        }
    }

    /// Replaces the best path of `prefix` by the lowest of the others, if any.
    fn promote(&mut self, prefix: P) {
        let next = self.others.get_mut(&prefix).and_then(|m| m.pop_first());
        if self.others.get(&prefix).is_some_and(|m| m.is_empty()) {
            self.others.remove(&prefix);
        }
        match next {
            Some((_, path)) => self.best.insert(prefix, path),
            None => self.best.remove(&prefix),
        };
    }

    /// Removes the paths of `peer` that `which` selects.
    fn remove_where(&mut self, peer: A, which: impl Fn(&Path<A>) -> bool) -> Vec<P> {
        let mine = |p: &Path<A>| p.peer == peer && which(p);
        let mut gone: Vec<P> = (self.best.iter())
            .filter(|(_, p)| mine(p))
            .map(|(prefix, _)| *prefix)
            .collect();
        gone.extend(
            (self.others.iter())
                .filter(|(_, m)| m.get(&peer).is_some_and(mine))
                .map(|(prefix, _)| *prefix),
        );
        let mut changed = Vec::new();
        for prefix in gone {
            self.set(prefix, peer, None, &mut changed);
        }
        changed
    }

    /// The best next hop of `prefix`.
    pub fn best(&self, prefix: &P) -> Option<A> {
        self.best.get(prefix).map(|p| p.next_hop)
    }

    /// Every prefix with its best next hop, in no particular order.
    pub fn best_paths(&self) -> impl Iterator<Item = (P, A)> + '_ {
        self.best.iter().map(|(prefix, p)| (*prefix, p.next_hop))
    }

    /// How many prefixes are known.
    pub fn len(&self) -> usize {
        self.best.len()
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.best.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnetwork::Ipv4Network;
    use std::net::Ipv4Addr;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_rib_keeps_one_best_path_and_forgets_a_peer_that_went_down() {
        let mut rib = Rib::default();
        let block = net("10.244.1.0/26");
        assert_eq!(rib.learn(ip("10.0.0.3"), &[block], ip("10.0.0.3")), [block]);
        assert_eq!(
            rib.learn(ip("10.0.0.2"), &[block], ip("10.0.0.9")),
            [block],
            "the lowest peer address wins"
        );
        assert_eq!(rib.best(&block), Some(ip("10.0.0.9")));
        assert!(
            rib.learn(ip("10.0.0.3"), &[block], ip("10.0.0.4"))
                .is_empty(),
            "a change of a path that is not the best changes nothing"
        );
        assert_eq!(rib.peer_down(ip("10.0.0.2")), [block]);
        assert_eq!(
            rib.best(&block),
            Some(ip("10.0.0.4")),
            "the next best takes over"
        );
        assert_eq!(rib.len(), 1);
        assert_eq!(rib.withdraw(ip("10.0.0.3"), &[block]), [block]);
        assert!(rib.is_empty());
        assert!(rib.peer_down(ip("10.0.0.3")).is_empty());
        assert!(rib.others.is_empty(), "nothing left behind");
    }

    #[test]
    fn stale_paths_keep_forwarding_until_the_peer_is_back_and_purges_what_it_did_not_resend() {
        let mut rib = Rib::default();
        let (a, b, c) = (
            net("10.244.1.0/26"),
            net("10.244.2.0/26"),
            net("10.244.3.0/26"),
        );
        rib.learn(ip("10.0.0.2"), &[a, b], ip("10.0.0.2"));
        rib.learn(ip("10.0.0.3"), &[c, b], ip("10.0.0.3"));
        // The session with 10.0.0.2 goes down gracefully: nothing moves.
        rib.mark_stale(ip("10.0.0.2"));
        assert_eq!(rib.best(&a), Some(ip("10.0.0.2")));
        // It is back and re-sends one prefix, unchanged: still nothing moves.
        assert!(rib.learn(ip("10.0.0.2"), &[a], ip("10.0.0.2")).is_empty());
        // End-of-RIB: what it did not re-send goes (the other path takes
        // over); what it re-sent and other peers' paths stay.
        assert_eq!(rib.purge_stale(ip("10.0.0.2")), [b]);
        let mut best: Vec<_> = rib.best_paths().collect();
        best.sort();
        assert_eq!(
            best,
            [
                (a, ip("10.0.0.2")),
                (b, ip("10.0.0.3")),
                (c, ip("10.0.0.3"))
            ]
        );
        assert!(rib.purge_stale(ip("10.0.0.2")).is_empty());
    }
}
