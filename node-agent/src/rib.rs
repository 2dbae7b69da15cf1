//! Learned routes, with the stale marks of BGP graceful restart (RFC 4724):
//! a pure table that turns each [`BgpEvent`] into the prefixes whose best
//! next hop changed, which is all the kernel has to hear about.
//!
//! Most prefixes have one path (a node's block, learned from that node), so
//! the best path of each prefix sits in a hash map and only the others in
//! an ordered side table: 100,000 learned prefixes take about 7 MB.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;

use crate::agent::BgpEvent;

/// One path: the peer, the next hop it gave, and whether it is left over
/// from a session that went down gracefully (kept until the peer is back
/// and has re-sent it, or until the restart ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Path {
    peer: IpAddr,
    next_hop: IpAddr,
    stale: bool,
}

/// The lowest address, to start a range scan of one prefix.
const LOWEST: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// Learned routes. The best path of a prefix is the one from the lowest
/// peer address (deterministic on every node), stale or not: a stale path
/// still forwards (the restarting peer kept its forwarding state), so it is
/// used until it is replaced or purged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rib {
    best: HashMap<IpNetwork, Path>,
    /// The other paths, by (prefix, peer).
    others: BTreeMap<(IpNetwork, IpAddr), Path>,
}

impl Rib {
    /// Applies one event; returns the prefixes whose best next hop changed
    /// (appeared, moved or vanished), in no particular order.
    pub fn apply(&mut self, ev: &BgpEvent) -> Vec<IpNetwork> {
        let mut changed = Vec::new();
        match ev {
            BgpEvent::Learned {
                peer,
                prefixes,
                next_hop,
            } => {
                let path = Path {
                    peer: *peer,
                    next_hop: *next_hop,
                    stale: false,
                };
                for p in prefixes {
                    self.set(*p, *peer, Some(path), &mut changed);
                }
            }
            BgpEvent::Withdrawn { peer, prefixes } => {
                for p in prefixes {
                    self.set(*p, *peer, None, &mut changed);
                }
            }
            BgpEvent::PeerDown { peer } => self.remove_where(*peer, |_| true, &mut changed),
            BgpEvent::Stale { peer } => {
                let paths = self.best.values_mut().chain(self.others.values_mut());
                paths
                    .filter(|p| p.peer == *peer)
                    .for_each(|p| p.stale = true);
            }
            BgpEvent::PurgeStale { peer } => self.remove_where(*peer, |p| p.stale, &mut changed),
        }
        changed
    }

    /// Sets (or with `None` removes) the path of `prefix` from `peer`.
    fn set(
        &mut self,
        prefix: IpNetwork,
        peer: IpAddr,
        path: Option<Path>,
        changed: &mut Vec<IpNetwork>,
    ) {
        let best = self.best.get(&prefix).copied();
        match (best, path) {
            (Some(b), Some(path)) if b.peer == peer => {
                self.best.insert(prefix, path);
            }
            (Some(b), None) if b.peer == peer => self.promote(prefix),
            (Some(b), Some(path)) if peer < b.peer => {
                self.others.insert((prefix, b.peer), b);
                self.best.insert(prefix, path);
            }
            (Some(_), Some(path)) => {
                self.others.insert((prefix, peer), path);
            }
            (Some(_), None) => {
                self.others.remove(&(prefix, peer));
            }
            (None, Some(path)) => {
                self.best.insert(prefix, path);
            }
            (None, None) => {}
        }
        if self.best(&prefix) != best.map(|p| p.next_hop) {
            changed.push(prefix);
        }
    }

    /// Replaces the best path of `prefix` by the lowest of the others, if any.
    fn promote(&mut self, prefix: IpNetwork) {
        let next = self
            .others
            .range((prefix, LOWEST)..)
            .next()
            .filter(|((p, _), _)| *p == prefix)
            .map(|(k, _)| *k);
        match next.and_then(|k| self.others.remove(&k)) {
            Some(path) => self.best.insert(prefix, path),
            None => self.best.remove(&prefix),
        };
    }

    /// Removes the paths of `peer` that `which` selects.
    fn remove_where(
        &mut self,
        peer: IpAddr,
        which: impl Fn(&Path) -> bool,
        changed: &mut Vec<IpNetwork>,
    ) {
        let mine = |p: &Path| p.peer == peer && which(p);
        let mut gone: Vec<IpNetwork> = (self.best.iter())
            .filter(|(_, p)| mine(p))
            .map(|(prefix, _)| *prefix)
            .collect();
        gone.extend(
            (self.others.iter())
                .filter(|(_, p)| mine(p))
                .map(|((prefix, _), _)| *prefix),
        );
        for prefix in gone {
            self.set(prefix, peer, None, changed);
        }
    }

    /// The best next hop of `prefix`.
    pub fn best(&self, prefix: &IpNetwork) -> Option<IpAddr> {
        self.best.get(prefix).map(|p| p.next_hop)
    }

    /// Every prefix with its best next hop, in no particular order.
    pub fn best_paths(&self) -> impl Iterator<Item = (IpNetwork, IpAddr)> + '_ {
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

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn learned(peer: &str, prefixes: &[&str], next_hop: &str) -> BgpEvent {
        BgpEvent::Learned {
            peer: ip(peer),
            prefixes: prefixes.iter().map(|p| net(p)).collect(),
            next_hop: ip(next_hop),
        }
    }

    #[test]
    fn the_rib_keeps_one_best_path_and_forgets_a_peer_that_went_down() {
        let mut rib = Rib::default();
        let block = net("10.244.1.0/26");
        assert_eq!(
            rib.apply(&learned("10.0.0.3", &["10.244.1.0/26"], "10.0.0.3")),
            [block]
        );
        assert_eq!(
            rib.apply(&learned("10.0.0.2", &["10.244.1.0/26"], "10.0.0.9")),
            [block],
            "the lowest peer address wins"
        );
        assert_eq!(rib.best(&block), Some(ip("10.0.0.9")));
        assert!(
            rib.apply(&learned("10.0.0.3", &["10.244.1.0/26"], "10.0.0.4"))
                .is_empty(),
            "a change of a path that is not the best changes nothing"
        );
        assert_eq!(
            rib.apply(&BgpEvent::PeerDown {
                peer: ip("10.0.0.2")
            }),
            [block]
        );
        assert_eq!(
            rib.best(&block),
            Some(ip("10.0.0.4")),
            "the next best takes over"
        );
        assert_eq!(rib.len(), 1);
        let withdrawn = BgpEvent::Withdrawn {
            peer: ip("10.0.0.3"),
            prefixes: vec![block],
        };
        assert_eq!(rib.apply(&withdrawn), [block]);
        assert!(rib.is_empty());
        assert!(rib
            .apply(&BgpEvent::PeerDown {
                peer: ip("10.0.0.3")
            })
            .is_empty());
        assert_eq!(rib, Rib::default(), "nothing left behind");
    }

    #[test]
    fn stale_paths_keep_forwarding_until_the_peer_is_back_and_purges_what_it_did_not_resend() {
        let mut rib = Rib::default();
        rib.apply(&learned(
            "10.0.0.2",
            &["10.244.1.0/26", "10.244.2.0/26"],
            "10.0.0.2",
        ));
        rib.apply(&learned(
            "10.0.0.3",
            &["10.244.3.0/26", "10.244.2.0/26"],
            "10.0.0.3",
        ));
        // The session with 10.0.0.2 goes down gracefully: nothing moves.
        assert!(rib
            .apply(&BgpEvent::Stale {
                peer: ip("10.0.0.2")
            })
            .is_empty());
        assert_eq!(rib.best(&net("10.244.1.0/26")), Some(ip("10.0.0.2")));
        // It is back and re-sends one prefix, unchanged: still nothing moves.
        assert!(rib
            .apply(&learned("10.0.0.2", &["10.244.1.0/26"], "10.0.0.2"))
            .is_empty());
        // End-of-RIB: what it did not re-send goes (the other path takes
        // over); what it re-sent and other peers' paths stay.
        assert_eq!(
            rib.apply(&BgpEvent::PurgeStale {
                peer: ip("10.0.0.2")
            }),
            [net("10.244.2.0/26")]
        );
        let mut best: Vec<_> = rib.best_paths().collect();
        best.sort();
        assert_eq!(
            best,
            [
                (net("10.244.1.0/26"), ip("10.0.0.2")),
                (net("10.244.2.0/26"), ip("10.0.0.3")),
                (net("10.244.3.0/26"), ip("10.0.0.3"))
            ]
        );
    }
}
