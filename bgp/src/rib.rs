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

/// One path: the peer, the next hop it gave, whether it is left over from
/// a session that went down gracefully, and whether the consumer's import
/// policy lets it be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Path<A> {
    peer: A,
    next_hop: A,
    stale: bool,
    accepted: bool,
}

/// Learned routes. The best path of a prefix is the accepted one from the
/// lowest peer address (deterministic on every node), stale or not: a stale
/// path still forwards (the restarting peer kept its forwarding state), so
/// it is used until it is replaced or purged. Rejected paths are kept (in
/// the side table) so that a change of the import policy
/// ([`Rib::refilter`]) needs no route refresh.
#[derive(Debug, Clone)]
pub struct Rib<P, A> {
    /// The best path of each prefix that has an accepted one.
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
        self.learn_where(peer, prefixes, next_hop, |_| true)
    }

    /// [`Rib::learn`], with the paths of the prefixes `accept` refuses kept
    /// but never best (an import policy).
    pub fn learn_where(
        &mut self,
        peer: A,
        prefixes: &[P],
        next_hop: A,
        accept: impl Fn(&P) -> bool,
    ) -> Vec<P> {
        let mut changed = Vec::new();
        for p in prefixes {
            let path = Path {
                peer,
                next_hop,
                stale: false,
                accepted: accept(p),
            };
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
        self.paths_mut()
            .filter(|p| p.peer == peer)
            .for_each(|p| p.stale = true);
    }

    /// `peer` re-sent its routes (or ran out of time): its stale paths go.
    pub fn purge_stale(&mut self, peer: A) -> Vec<P> {
        self.remove_where(peer, |p| p.stale)
    }

    /// Judges every path again with `accept(prefix, peer)` (the import
    /// policy changed); returns the prefixes whose best next hop moved.
    pub fn refilter(&mut self, accept: impl Fn(&P, A) -> bool) -> Vec<P> {
        let mut prefixes: Vec<P> = self.best.keys().copied().collect();
        prefixes.extend(self.others.keys().copied());
        prefixes.sort_unstable();
        prefixes.dedup();
        let mut changed = Vec::new();
        for prefix in prefixes {
            let before = self.best(&prefix);
            let mut paths = self.others.remove(&prefix).unwrap_or_default();
            if let Some(b) = self.best.remove(&prefix) {
                paths.insert(b.peer, b);
            }
            for path in paths.values_mut() {
                path.accepted = accept(&prefix, path.peer);
            }
            self.others.insert(prefix, paths);
            self.promote(prefix);
            if self.best(&prefix) != before {
                changed.push(prefix);
            }
        }
        changed
    }

    fn paths_mut(&mut self) -> impl Iterator<Item = &mut Path<A>> {
        (self.best.values_mut()).chain(self.others.values_mut().flat_map(|m| m.values_mut()))
    }

    /// Sets (or with `None` removes) the path of `prefix` from `peer`,
    /// keeping the best path the lowest accepted one.
    fn set(&mut self, prefix: P, peer: A, path: Option<Path<A>>, changed: &mut Vec<P>) {
        let before = self.best(&prefix);
        if self.best.get(&prefix).is_some_and(|b| b.peer == peer) {
            self.best.remove(&prefix);
        } else if let Some(m) = self.others.get_mut(&prefix) {
            m.remove(&peer);
            if m.is_empty() {
                self.others.remove(&prefix);
            }
        }
        if let Some(path) = path {
            match self.best.get(&prefix).copied() {
                Some(b) if !path.accepted || b.peer < peer => {
                    self.others.entry(prefix).or_default().insert(peer, path);
                }
                Some(b) => {
                    self.others.entry(prefix).or_default().insert(b.peer, b);
                    self.best.insert(prefix, path);
                }
                // None is best: either no path is accepted, or the best was
                // this peer's, lower than every other accepted one.
                None if path.accepted => {
                    self.best.insert(prefix, path);
                }
                None => {
                    self.others.entry(prefix).or_default().insert(peer, path);
                }
            }
        }
        if !self.best.contains_key(&prefix) {
            self.promote(prefix);
        }
        if self.best(&prefix) != before {
            changed.push(prefix);
        }
    }

    /// Makes the lowest accepted path of the side table best, if it is
    /// lower than the best one (or there is none).
    fn promote(&mut self, prefix: P) {
        let Some(m) = self.others.get_mut(&prefix) else {
            return;
        };
        let lowest = m.values().find(|p| p.accepted).copied();
        if let Some(next) =
            lowest.filter(|n| self.best.get(&prefix).is_none_or(|b| n.peer < b.peer))
        {
            m.remove(&next.peer);
            if let Some(old) = self.best.insert(prefix, next) {
                m.insert(old.peer, old);
            }
        }
        if m.is_empty() {
            self.others.remove(&prefix);
        }
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

    /// The best next hop of `prefix` (none when no path is accepted).
    pub fn best(&self, prefix: &P) -> Option<A> {
        self.best.get(prefix).map(|p| p.next_hop)
    }

    /// Every prefix with an accepted path, with its best next hop, in no
    /// particular order.
    pub fn best_paths(&self) -> impl Iterator<Item = (P, A)> + '_ {
        self.best.iter().map(|(prefix, p)| (*prefix, p.next_hop))
    }

    /// How many prefixes have an accepted path.
    pub fn len(&self) -> usize {
        self.best.len()
    }

    /// Whether no prefix has an accepted path.
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

    #[test]
    fn rejected_paths_are_never_best_and_a_new_policy_moves_the_best_paths() {
        let mut rib = Rib::default();
        let block = net("10.244.1.0/26");
        let (router, node) = (ip("10.0.0.1"), ip("10.0.0.5"));
        let only_node = |_: &Ipv4Network, peer: Ipv4Addr| peer == node;
        // The lower address is rejected: the higher one is best.
        assert!(rib
            .learn_where(router, &[block], router, |p| only_node(p, router))
            .is_empty());
        assert_eq!(rib.best(&block), None, "a rejected path alone is no route");
        assert_eq!(
            rib.learn_where(node, &[block], node, |p| only_node(p, node)),
            [block]
        );
        assert_eq!(rib.best(&block), Some(node));
        // A change of the rejected path changes nothing; of the accepted, it moves.
        assert!(rib
            .learn_where(router, &[block], ip("10.0.0.9"), |p| only_node(p, router))
            .is_empty());
        assert_eq!(
            rib.learn_where(node, &[block], ip("10.0.0.6"), |p| only_node(p, node)),
            [block]
        );
        assert_eq!(rib.best(&block), Some(ip("10.0.0.6")));
        // Everything accepted: the lower address takes over, and back.
        assert_eq!(rib.refilter(|_, _| true), [block]);
        assert_eq!(rib.best(&block), Some(ip("10.0.0.9")));
        assert!(rib.refilter(|_, _| true).is_empty());
        assert_eq!(rib.refilter(only_node), [block]);
        assert_eq!(rib.best(&block), Some(ip("10.0.0.6")));
        // The accepted path goes: the rejected one is still no route.
        assert_eq!(rib.peer_down(node), [block]);
        assert_eq!((rib.best(&block), rib.len()), (None, 0));
        assert!(rib.withdraw(router, &[block]).is_empty());
        assert!(rib.others.is_empty(), "nothing left behind");
    }
}
