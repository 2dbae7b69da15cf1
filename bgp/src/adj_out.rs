//! Building the UPDATEs sent to one peer (its Adj-RIB-Out).
//!
//! Pure functions: given local routes and the session's parameters, they
//! pack as many prefixes as fit in each 4096-octet UPDATE.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::codec::{nlri_len, HEADER_LEN, MAX_MESSAGE_LEN};
use super::message::{Origin, PathAttributes, Update};

/// Local routes: prefix to the next hop asked for (`None`: ourselves).
pub type LocalRib = BTreeMap<Ipv4Network, Option<Ipv4Addr>>;

/// What decides the attributes of the routes sent to one peer.
#[derive(Debug, Clone, Copy)]
pub struct OutPolicy {
    /// Our AS.
    pub local_asn: u32,
    /// The peer's AS.
    pub peer_asn: u32,
    /// Our address on the session, the next hop when we are it.
    pub local_addr: Ipv4Addr,
    /// Always use `local_addr` as next hop.
    pub next_hop_self: bool,
}

impl OutPolicy {
    fn ebgp(&self) -> bool {
        self.local_asn != self.peer_asn
    }

    /// The attributes of a local route with requested next hop `next_hop`:
    /// iBGP carries an empty AS_PATH and LOCAL_PREF 100; eBGP prepends our
    /// AS and always sets next hop self.
    pub fn attributes(&self, next_hop: Option<Ipv4Addr>) -> PathAttributes {
        let next_hop = match next_hop {
            Some(nh) if !self.ebgp() && !self.next_hop_self => nh,
            _ => self.local_addr,
        };
        PathAttributes {
            origin: Origin::Igp,
            as_path: if self.ebgp() {
                vec![self.local_asn]
            } else {
                Vec::new()
            },
            next_hop,
            local_pref: (!self.ebgp()).then_some(100),
            med: None,
        }
    }
}

/// Room for prefixes in an UPDATE after header, lengths and attributes.
fn room(attrs: Option<&PathAttributes>) -> usize {
    // ORIGIN 4, AS_PATH 5 + 4/AS, NEXT_HOP 7, LOCAL_PREF 7, MED 7, AS4_PATH
    // as large again as AS_PATH: a bound, not an exact size.
    let attr_len = attrs.map_or(0, |a| 40 + 8 * a.as_path.len());
    MAX_MESSAGE_LEN - HEADER_LEN - 4 - attr_len
}

/// UPDATEs announcing `routes`, grouped by next hop.
pub fn announcements<'a>(
    policy: &OutPolicy,
    routes: impl IntoIterator<Item = (&'a Ipv4Network, &'a Option<Ipv4Addr>)>,
) -> Vec<Update> {
    // Group by next hop so that each group shares one set of attributes.
    let mut groups: BTreeMap<Option<Ipv4Addr>, Vec<Ipv4Network>> = BTreeMap::new();
    for (prefix, next_hop) in routes {
        groups.entry(*next_hop).or_default().push(*prefix);
    }
    let mut updates = Vec::new();
    for (next_hop, prefixes) in groups {
        let attrs = policy.attributes(next_hop);
        for nlri in pack(&prefixes, room(Some(&attrs))) {
            updates.push(Update {
                withdrawn: Vec::new(),
                attributes: Some(attrs.clone()),
                nlri,
            });
        }
    }
    updates
}

/// UPDATEs withdrawing `prefixes`.
pub fn withdrawals(prefixes: &[Ipv4Network]) -> Vec<Update> {
    pack(prefixes, room(None))
        .into_iter()
        .map(|withdrawn| Update {
            withdrawn,
            attributes: None,
            nlri: Vec::new(),
        })
        .collect()
}

/// Splits `prefixes` into chunks whose NLRI encoding fits in `room` octets.
fn pack(prefixes: &[Ipv4Network], room: usize) -> Vec<Vec<Ipv4Network>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for p in prefixes {
        let len = nlri_len(p);
        if used + len > room && !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
            used = 0;
        }
        current.push(*p);
        used += len;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use crate::message::Message;
    use bytes::BytesMut;

    fn policy(peer_asn: u32) -> OutPolicy {
        OutPolicy {
            local_asn: 64512,
            peer_asn,
            local_addr: Ipv4Addr::new(10, 0, 0, 1),
            next_hop_self: false,
        }
    }

    #[test]
    fn ibgp_keeps_the_requested_next_hop_and_sets_local_pref() {
        let a = policy(64512).attributes(Some(Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(a.next_hop, Ipv4Addr::new(10, 0, 0, 9));
        assert!(a.as_path.is_empty());
        assert_eq!(a.local_pref, Some(100));
    }

    #[test]
    fn ebgp_prepends_our_as_and_uses_next_hop_self() {
        let a = policy(65001).attributes(Some(Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(a.next_hop, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(a.as_path, vec![64512]);
        assert_eq!(a.local_pref, None);
    }

    #[test]
    fn a_hundred_thousand_prefixes_pack_into_updates_that_fit_4096_octets() {
        let rib: LocalRib = (0..100_000u32)
            .map(|i| {
                (
                    Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap(),
                    None,
                )
            })
            .collect();
        let updates = announcements(&policy(65001), &rib);
        assert!(updates.len() < 130, "{} updates", updates.len());
        assert_eq!(updates.iter().map(|u| u.nlri.len()).sum::<usize>(), 100_000);
        let mut buf = BytesMut::new();
        for u in updates
            .into_iter()
            .chain(withdrawals(&rib.keys().copied().collect::<Vec<_>>()))
        {
            buf.clear();
            encode(&Message::Update(u), false, &mut buf).unwrap();
            assert!(buf.len() <= 4096);
        }
    }
}
