//! Slots of the endpoint maps: each dispatch chain (`service-…`, `local-…`)
//! owns a range `K..K+cap` of numgen values, and its rule
//! `dnat ip to numgen random mod N offset K map @endpoints-S` picks one of
//! the first N. The range stays with the chain while its endpoints change,
//! so replacing, adding or removing an endpoint rewrites a few map elements
//! (and the rule only when N changes), never the other services.
//!
//! The endpoint elements are spread over [`SHARDS`] maps by range: the
//! kernel checks every element of a data map against every rule that uses
//! the map (when the rule is added, and when an element is), so one map for
//! every service would make a full sync quadratic in the services (measured:
//! 3,000 services, 1.3 s of kernel time for that check alone); 256 maps cut
//! it 256 times, and more maps would slow the kernel's lookup of a set by
//! name, which walks the table's list of sets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::LazyLock;

use crate::model::Protocol;
use crate::rules::PortKey;

/// The number of endpoint maps of each protocol (TCP, UDP, SCTP): one
/// declaration per protocol, as nft 1.0.6 rejects a map whose `typeof`
/// names `th dport` in a rule after `meta l4proto tcp` when it reads the
/// ruleset back.
pub const SHARDS: [u32; 3] = [256, 64, 16];

/// The smallest range: most services have few endpoints, and a range this
/// size leaves room to grow without moving.
const MIN_CAP: u32 = 16;

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

fn index(proto: Protocol) -> usize {
    match proto {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Sctp => 2,
    }
}

struct Shards {
    names: [Vec<String>; 3],
    types: [String; 3],
}

static SHARD_NAMES: LazyLock<Shards> = LazyLock::new(|| Shards {
    names: PROTOCOLS.map(|p| {
        (0..SHARDS[index(p)])
            .map(|s| format!("endpoints-{}-{s:03}", p.as_str()))
            .collect()
    }),
    types: PROTOCOLS.map(|p| {
        format!(
            "typeof numgen random mod 1 : ip daddr . {} dport",
            p.as_str()
        )
    }),
});

/// The endpoint map `shard` of `proto` (`endpoints-tcp-000` …).
pub fn shard_name(proto: Protocol, shard: u32) -> &'static str {
    let i = index(proto);
    &SHARD_NAMES.names[i][(shard % SHARDS[i]) as usize]
}

/// Every endpoint map, with its declaration.
pub fn shard_sets() -> impl Iterator<Item = (&'static str, &'static str)> {
    let s: &'static Shards = &SHARD_NAMES;
    s.names
        .iter()
        .zip(&s.types)
        .flat_map(|(names, ty)| names.iter().map(move |n| (n.as_str(), ty.as_str())))
}

/// The map holding `proto`'s range that starts at `base`.
pub fn shard_of(proto: Protocol, base: u32) -> &'static str {
    shard_name(proto, base / MIN_CAP)
}

/// Which dispatch chain of a service port a range belongs to.
pub type SlotKey = (PortKey, bool);

/// The ranges handed out: each dispatch chain's, and the free ones by size;
/// and the order of each chain's endpoints in its range.
#[derive(Debug, Default)]
pub struct Slots {
    next: u32,
    taken: HashMap<SlotKey, (u32, u32)>,
    free: BTreeMap<u32, Vec<u32>>,
    order: HashMap<SlotKey, Vec<SocketAddrV4>>,
}

impl Slots {
    /// The first slot of `key`'s range, holding at least `n` endpoints: its
    /// current range if large enough, else a new one (the old one is freed).
    pub fn range(&mut self, key: &SlotKey, n: usize) -> u32 {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if let Some(&(base, cap)) = self.taken.get(key) {
            if n <= cap {
                return base;
            }
            self.free.entry(cap).or_default().push(base);
        }
        let cap = n.max(MIN_CAP).next_power_of_two();
        let base = match self.free.get_mut(&cap).and_then(Vec::pop) {
            Some(base) => base,
            None => {
                let base = self.next;
                self.next = self.next.saturating_add(cap);
                base
            }
        };
        self.taken.insert(key.clone(), (base, cap));
        base
    }

    /// `eps` in the order of `key`'s slots: an endpoint keeps the slot it
    /// had, a new one takes a freed slot, and when fewer are left the last
    /// ones move into the holes. So replacing one endpoint rewrites one
    /// slot, not every slot after it. The first order is `eps`'.
    pub fn arrange(&mut self, key: &SlotKey, eps: Vec<SocketAddrV4>) -> Vec<SocketAddrV4> {
        let want: HashSet<SocketAddrV4> = eps.iter().copied().collect();
        let out = match self.order.get(key) {
            Some(prev) if want.len() == eps.len() => {
                let mut slots: Vec<Option<SocketAddrV4>> = prev
                    .iter()
                    .map(|a| want.contains(a).then_some(*a))
                    .collect();
                let kept: HashSet<SocketAddrV4> = slots.iter().flatten().copied().collect();
                let mut new = eps.into_iter().filter(|a| !kept.contains(a));
                for slot in slots.iter_mut().filter(|s| s.is_none()) {
                    *slot = new.next();
                }
                slots.extend(new.map(Some));
                compact(slots)
            }
            _ => eps,
        };
        self.order.insert(key.clone(), out.clone());
        out
    }

    /// Frees the ranges of the service ports `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&PortKey) -> bool) {
        self.order.retain(|(port, _), _| keep(port));
        let free = &mut self.free;
        self.taken.retain(|(port, _), (base, cap)| {
            let kept = keep(port);
            if !kept {
                free.entry(*cap).or_default().push(*base);
            }
            kept
        });
    }
}

/// Fills the holes of `slots` with the last endpoints, keeping the rest in place.
fn compact(mut slots: Vec<Option<SocketAddrV4>>) -> Vec<SocketAddrV4> {
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            while slots.last().is_some_and(Option::is_none) {
                slots.pop();
            }
            if i < slots.len() {
                slots.swap_remove(i);
            }
        }
        i += 1;
    }
    slots.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u8) -> SocketAddrV4 {
        SocketAddrV4::new([10, 0, 0, i].into(), 80)
    }

    #[test]
    fn endpoints_keep_their_slots_and_the_last_ones_fill_the_holes() {
        let mut s = Slots::default();
        let key: SlotKey = (
            (
                crate::model::ServiceKey {
                    namespace: "ns".into(),
                    name: "a".into(),
                },
                String::new(),
                Protocol::Tcp,
            ),
            false,
        );
        let first: Vec<_> = (1..=4).map(ep).collect();
        assert_eq!(s.arrange(&key, first.clone()), first);
        let replaced = vec![ep(1), ep(2), ep(4), ep(9)];
        assert_eq!(
            s.arrange(&key, replaced),
            [ep(1), ep(2), ep(9), ep(4)],
            "9 takes 3's slot"
        );
        assert_eq!(
            s.arrange(&key, vec![ep(2), ep(4), ep(9)]),
            [ep(4), ep(2), ep(9)],
            "the last (4) moves into 1's slot"
        );
        assert_eq!(
            s.arrange(&key, vec![ep(2), ep(9), ep(4), ep(5)]),
            [ep(4), ep(2), ep(9), ep(5)]
        );
        assert_eq!(s.arrange(&key, vec![ep(5)]), [ep(5)]);
    }
}
