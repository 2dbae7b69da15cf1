//! UPDATE conversion: netgauze's path attributes and NLRI to Tabby's
//! [`Update`] and back, with the checks netgauze leaves to the speaker.

use std::net::IpAddr;

use ipnet::Ipv4Net;
use ipnetwork::Ipv4Network;
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress};
use netgauze_bgp_pkt::path_attribute as pa;
use netgauze_bgp_pkt::update::BgpUpdateMessage;

use super::EncodeError;
use crate::message::{code, Notification, Origin, PathAttributes, Update, AS_TRANS};

/// Which attribute kinds were seen, to find duplicates and missing ones.
#[derive(Default)]
struct Seen(u32);

impl Seen {
    /// Records attribute `type_code`; false if it was already seen.
    fn insert(&mut self, type_code: u8) -> bool {
        let bit = 1u32 << (type_code % 32);
        let fresh = self.0 & bit == 0;
        self.0 |= bit;
        fresh
    }
    fn has(&self, type_code: u8) -> bool {
        self.0 & (1u32 << (type_code % 32)) != 0
    }
}

fn to_network(addr: &Ipv4UnicastAddress) -> Result<Ipv4Network, Notification> {
    let net = addr.network().address();
    Ipv4Network::new(net.network(), net.prefix_len())
        .map_err(|_| Notification::new(code::UPDATE, code::INVALID_NETWORK_FIELD))
}

pub(super) fn update_from_wire(
    update: &BgpUpdateMessage,
    asn4: bool,
) -> Result<Update, Notification> {
    let mut withdrawn = update
        .withdraw_routes()
        .iter()
        .map(to_network)
        .collect::<Result<Vec<_>, _>>()?;
    let mut nlri = update
        .nlri()
        .iter()
        .map(to_network)
        .collect::<Result<Vec<_>, _>>()?;
    let classic_nlri = !nlri.is_empty();
    let mut seen = Seen::default();
    let (mut origin, mut next_hop, mut local_pref, mut med) = (None, None, None, None);
    let mut as_path: Option<Vec<u32>> = None;
    let mut as4_path: Option<Vec<u32>> = None;
    for attr in update.path_attributes() {
        let type_code = match attr.value() {
            pa::PathAttributeValue::Origin(o) => {
                origin = Some(match o {
                    pa::Origin::IGP => Origin::Igp,
                    pa::Origin::EGP => Origin::Egp,
                    pa::Origin::Incomplete => Origin::Incomplete,
                });
                1
            }
            pa::PathAttributeValue::AsPath(p) => {
                as_path = Some(match p {
                    pa::AsPath::As2PathSegments(s) => s
                        .iter()
                        .flat_map(|s| s.as_numbers().iter().map(|&a| u32::from(a)))
                        .collect(),
                    pa::AsPath::As4PathSegments(s) => s
                        .iter()
                        .flat_map(|s| s.as_numbers().iter().copied())
                        .collect(),
                });
                2
            }
            pa::PathAttributeValue::NextHop(n) => {
                next_hop = Some(n.next_hop());
                3
            }
            pa::PathAttributeValue::MultiExitDiscriminator(m) => {
                med = Some(m.metric());
                4
            }
            pa::PathAttributeValue::LocalPreference(l) => {
                local_pref = Some(l.metric());
                5
            }
            pa::PathAttributeValue::MpReach(pa::MpReach::Ipv4Unicast {
                next_hop: nh,
                nlri: mp,
                ..
            }) => {
                if let (IpAddr::V4(nh), None) = (nh, next_hop) {
                    next_hop = Some(*nh);
                }
                nlri.extend(mp.iter().map(to_network).collect::<Result<Vec<_>, _>>()?);
                14
            }
            pa::PathAttributeValue::MpUnreach(pa::MpUnreach::Ipv4Unicast { nlri: mp }) => {
                withdrawn.extend(mp.iter().map(to_network).collect::<Result<Vec<_>, _>>()?);
                15
            }
            pa::PathAttributeValue::As4Path(p) => {
                as4_path = Some(
                    p.segments()
                        .iter()
                        .flat_map(|s| s.as_numbers().iter().copied())
                        .collect(),
                );
                17
            }
            _ => continue,
        };
        // RFC 7606 §3 g: the first occurrence counts (the validator strips
        // the others before netgauze sees them).
        seen.insert(type_code);
    }
    if classic_nlri {
        for type_code in [1u8, 2, 3] {
            if !seen.has(type_code) {
                return Err(Notification::with_data(
                    code::UPDATE,
                    code::MISSING_WELL_KNOWN_ATTRIBUTE,
                    [type_code],
                ));
            }
        }
    }
    if let (false, Some(path), Some(path4)) = (asn4, as_path.as_mut(), as4_path) {
        // RFC 6793 §4.2.3: keep the leading ASes AS_PATH has beyond AS4_PATH.
        if path.len() >= path4.len() {
            path.truncate(path.len() - path4.len());
            path.extend(path4);
        }
    }
    let attributes = match (origin, as_path, next_hop) {
        (Some(origin), Some(as_path), Some(next_hop)) => Some(PathAttributes {
            origin,
            as_path,
            next_hop,
            local_pref,
            med,
        }),
        _ if nlri.is_empty() => None,
        // Announcements carried only in MP_REACH_NLRI still need ORIGIN and AS_PATH.
        (o, p, _) => {
            let missing = if o.is_none() {
                1
            } else if p.is_none() {
                2
            } else {
                3
            };
            return Err(Notification::with_data(
                code::UPDATE,
                code::MISSING_WELL_KNOWN_ATTRIBUTE,
                [missing],
            ));
        }
    };
    Ok(Update {
        withdrawn,
        attributes,
        nlri,
    })
}

fn to_wire_prefix(net: &Ipv4Network) -> Result<Ipv4UnicastAddress, EncodeError> {
    let wire =
        Ipv4Net::new(net.network(), net.prefix()).map_err(|_| EncodeError::NotUnicast(*net))?;
    let unicast = Ipv4Unicast::from_net(wire).map_err(|_| EncodeError::NotUnicast(*net))?;
    Ok(Ipv4UnicastAddress::new_no_path_id(unicast))
}

/// A path attribute; well-known ones are transitive, optional ones as asked.
fn attribute(
    value: pa::PathAttributeValue,
    optional: bool,
    transitive: bool,
    extended: bool,
) -> Result<pa::PathAttribute, EncodeError> {
    pa::PathAttribute::from(optional, transitive, false, extended, value).map_err(|(_, e)| {
        EncodeError::Write {
            kind: "UPDATE",
            detail: format!("{e:?}"),
        }
    })
}

/// Splits an AS path into AS_SEQUENCE segments of at most 255 ASes.
fn segments<T: Copy>(path: &[T]) -> impl Iterator<Item = &[T]> {
    path.chunks(255)
}

pub(super) fn update_to_wire(update: &Update, asn4: bool) -> Result<BgpUpdateMessage, EncodeError> {
    let withdrawn = update
        .withdrawn
        .iter()
        .map(to_wire_prefix)
        .collect::<Result<Vec<_>, _>>()?;
    let nlri = update
        .nlri
        .iter()
        .map(to_wire_prefix)
        .collect::<Result<Vec<_>, _>>()?;
    let mut attrs = Vec::new();
    if let Some(a) = &update.attributes {
        let origin = match a.origin {
            Origin::Igp => pa::Origin::IGP,
            Origin::Egp => pa::Origin::EGP,
            Origin::Incomplete => pa::Origin::Incomplete,
        };
        attrs.push(attribute(
            pa::PathAttributeValue::Origin(origin),
            false,
            true,
            false,
        )?);
        let seq = pa::AsPathSegmentType::AsSequence;
        let width = if asn4 { 4 } else { 2 };
        let extended = a.as_path.len() * width + 2 * a.as_path.len().div_ceil(255) > 255;
        let path = if asn4 {
            pa::AsPath::As4PathSegments(
                segments(&a.as_path)
                    .map(|s| pa::As4PathSegment::new(seq, s))
                    .collect(),
            )
        } else {
            let two: Vec<u16> = a
                .as_path
                .iter()
                .map(|&asn| u16::try_from(asn).unwrap_or(AS_TRANS))
                .collect();
            pa::AsPath::As2PathSegments(
                segments(&two)
                    .map(|s| pa::As2PathSegment::new(seq, s))
                    .collect(),
            )
        };
        attrs.push(attribute(
            pa::PathAttributeValue::AsPath(path),
            false,
            true,
            extended,
        )?);
        attrs.push(attribute(
            pa::PathAttributeValue::NextHop(pa::NextHop::new(a.next_hop)),
            false,
            true,
            false,
        )?);
        if let Some(med) = a.med {
            let med = pa::PathAttributeValue::MultiExitDiscriminator(
                pa::MultiExitDiscriminator::new(med),
            );
            attrs.push(attribute(med, true, false, false)?);
        }
        if let Some(pref) = a.local_pref {
            let pref = pa::PathAttributeValue::LocalPreference(pa::LocalPreference::new(pref));
            attrs.push(attribute(pref, false, true, false)?);
        }
        if !asn4 && a.as_path.iter().any(|&asn| asn > u32::from(u16::MAX)) {
            let extended = a.as_path.len() * 4 + 2 * a.as_path.len().div_ceil(255) > 255;
            let path4 = pa::As4Path::new(
                segments(&a.as_path)
                    .map(|s| pa::As4PathSegment::new(seq, s))
                    .collect::<Vec<_>>(),
            );
            attrs.push(attribute(
                pa::PathAttributeValue::As4Path(path4),
                true,
                true,
                extended,
            )?);
        }
    }
    Ok(BgpUpdateMessage::new(withdrawn, attrs, nlri))
}
