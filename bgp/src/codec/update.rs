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

/// The path attributes of one UPDATE as they are read, before the checks.
#[derive(Default)]
struct Read {
    seen: Seen,
    origin: Option<Origin>,
    as_path: Option<Vec<u32>>,
    as4_path: Option<Vec<u32>>,
    next_hop: Option<std::net::Ipv4Addr>,
    local_pref: Option<u32>,
    med: Option<u32>,
    nlri: Vec<Ipv4Network>,
    withdrawn: Vec<Ipv4Network>,
}

fn networks<'a>(
    addrs: impl IntoIterator<Item = &'a Ipv4UnicastAddress>,
) -> Result<Vec<Ipv4Network>, Notification> {
    addrs.into_iter().map(to_network).collect()
}

fn flat_path(p: &pa::AsPath) -> Vec<u32> {
    match p {
        pa::AsPath::As2PathSegments(s) => s
            .iter()
            .flat_map(|s| s.as_numbers().iter().map(|&a| u32::from(a)))
            .collect(),
        pa::AsPath::As4PathSegments(s) => s
            .iter()
            .flat_map(|s| s.as_numbers().iter().copied())
            .collect(),
    }
}

impl Read {
    /// Takes one attribute (duplicates were stripped before: RFC 7606 §3 g).
    fn attribute(&mut self, value: &pa::PathAttributeValue) -> Result<(), Notification> {
        let type_code = match value {
            pa::PathAttributeValue::Origin(o) => {
                self.origin = Some(match o {
                    pa::Origin::IGP => Origin::Igp,
                    pa::Origin::EGP => Origin::Egp,
                    pa::Origin::Incomplete => Origin::Incomplete,
                });
                1
            }
            pa::PathAttributeValue::AsPath(p) => {
                self.as_path = Some(flat_path(p));
                2
            }
            pa::PathAttributeValue::NextHop(n) => {
                self.next_hop = Some(n.next_hop());
                3
            }
            pa::PathAttributeValue::MultiExitDiscriminator(m) => {
                self.med = Some(m.metric());
                4
            }
            pa::PathAttributeValue::LocalPreference(l) => {
                self.local_pref = Some(l.metric());
                5
            }
            pa::PathAttributeValue::MpReach(pa::MpReach::Ipv4Unicast {
                next_hop: nh,
                nlri: mp,
                ..
            }) => {
                if let (IpAddr::V4(nh), None) = (nh, self.next_hop) {
                    self.next_hop = Some(*nh);
                }
                self.nlri.extend(networks(mp)?);
                14
            }
            pa::PathAttributeValue::MpUnreach(pa::MpUnreach::Ipv4Unicast { nlri: mp }) => {
                self.withdrawn.extend(networks(mp)?);
                15
            }
            pa::PathAttributeValue::As4Path(p) => {
                let path = p.segments().iter();
                self.as4_path = Some(path.flat_map(|s| s.as_numbers().iter().copied()).collect());
                17
            }
            _ => return Ok(()),
        };
        // RFC 7606 §3 g: the first occurrence counts (the validator strips
        // the others before netgauze sees them).
        self.seen.insert(type_code);
        Ok(())
    }

    /// The attributes the announced routes share, after the checks.
    fn finish(mut self, asn4: bool, classic_nlri: bool) -> Result<Update, Notification> {
        let missing = |type_code: u8| {
            Notification::with_data(
                code::UPDATE,
                code::MISSING_WELL_KNOWN_ATTRIBUTE,
                [type_code],
            )
        };
        if classic_nlri {
            if let Some(t) = [1u8, 2, 3].into_iter().find(|t| !self.seen.has(*t)) {
                return Err(missing(t));
            }
        }
        if let (false, Some(path), Some(path4)) = (asn4, self.as_path.as_mut(), self.as4_path) {
            // RFC 6793 §4.2.3: keep the leading ASes AS_PATH has beyond AS4_PATH.
            if path.len() >= path4.len() {
                path.truncate(path.len() - path4.len());
                path.extend(path4);
            }
        }
        let attributes = match (self.origin, self.as_path, self.next_hop) {
            (Some(origin), Some(as_path), Some(next_hop)) => Some(PathAttributes {
                origin,
                as_path,
                next_hop,
                local_pref: self.local_pref,
                med: self.med,
            }),
            _ if self.nlri.is_empty() => None,
            // Announcements carried only in MP_REACH_NLRI still need ORIGIN and AS_PATH.
            (None, _, _) => return Err(missing(1)),
            (_, None, _) => return Err(missing(2)),
            _ => return Err(missing(3)),
        };
        Ok(Update {
            withdrawn: self.withdrawn,
            attributes,
            nlri: self.nlri,
        })
    }
}

pub(super) fn update_from_wire(
    update: &BgpUpdateMessage,
    asn4: bool,
) -> Result<Update, Notification> {
    let mut read = Read {
        withdrawn: networks(update.withdraw_routes())?,
        nlri: networks(update.nlri())?,
        ..Read::default()
    };
    let classic_nlri = !read.nlri.is_empty();
    for attr in update.path_attributes() {
        read.attribute(attr.value())?;
    }
    read.finish(asn4, classic_nlri)
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

/// AS_PATH, and AS4_PATH on a 2-octet session whose path has 4-octet ASes.
fn as_paths(as_path: &[u32], asn4: bool) -> Result<Vec<pa::PathAttribute>, EncodeError> {
    let seq = pa::AsPathSegmentType::AsSequence;
    let width = if asn4 { 4 } else { 2 };
    let extended = as_path.len() * width + 2 * as_path.len().div_ceil(255) > 255;
    let path = if asn4 {
        pa::AsPath::As4PathSegments(
            segments(as_path)
                .map(|s| pa::As4PathSegment::new(seq, s))
                .collect(),
        )
    } else {
        let two: Vec<u16> = as_path
            .iter()
            .map(|&asn| u16::try_from(asn).unwrap_or(AS_TRANS))
            .collect();
        pa::AsPath::As2PathSegments(
            segments(&two)
                .map(|s| pa::As2PathSegment::new(seq, s))
                .collect(),
        )
    };
    let mut out = vec![attribute(
        pa::PathAttributeValue::AsPath(path),
        false,
        true,
        extended,
    )?];
    if !asn4 && as_path.iter().any(|&asn| asn > u32::from(u16::MAX)) {
        let extended = as_path.len() * 4 + 2 * as_path.len().div_ceil(255) > 255;
        let path4 = pa::As4Path::new(
            segments(as_path)
                .map(|s| pa::As4PathSegment::new(seq, s))
                .collect::<Vec<_>>(),
        );
        out.push(attribute(
            pa::PathAttributeValue::As4Path(path4),
            true,
            true,
            extended,
        )?);
    }
    Ok(out)
}

/// The path attributes of `a`, in type-code order (AS4_PATH last).
fn attributes_to_wire(
    a: &PathAttributes,
    asn4: bool,
) -> Result<Vec<pa::PathAttribute>, EncodeError> {
    let origin = match a.origin {
        Origin::Igp => pa::Origin::IGP,
        Origin::Egp => pa::Origin::EGP,
        Origin::Incomplete => pa::Origin::Incomplete,
    };
    let mut paths = as_paths(&a.as_path, asn4)?;
    let as4 = (paths.len() > 1).then(|| paths.remove(1));
    let mut attrs = vec![attribute(
        pa::PathAttributeValue::Origin(origin),
        false,
        true,
        false,
    )?];
    attrs.extend(paths);
    attrs.push(attribute(
        pa::PathAttributeValue::NextHop(pa::NextHop::new(a.next_hop)),
        false,
        true,
        false,
    )?);
    if let Some(med) = a.med {
        let med =
            pa::PathAttributeValue::MultiExitDiscriminator(pa::MultiExitDiscriminator::new(med));
        attrs.push(attribute(med, true, false, false)?);
    }
    if let Some(pref) = a.local_pref {
        let pref = pa::PathAttributeValue::LocalPreference(pa::LocalPreference::new(pref));
        attrs.push(attribute(pref, false, true, false)?);
    }
    attrs.extend(as4);
    Ok(attrs)
}

pub(super) fn update_to_wire(update: &Update, asn4: bool) -> Result<BgpUpdateMessage, EncodeError> {
    let prefixes = |nets: &[Ipv4Network]| {
        nets.iter()
            .map(to_wire_prefix)
            .collect::<Result<Vec<_>, _>>()
    };
    let attrs = match &update.attributes {
        Some(a) => attributes_to_wire(a, asn4)?,
        None => Vec::new(),
    };
    Ok(BgpUpdateMessage::new(
        prefixes(&update.withdrawn)?,
        attrs,
        prefixes(&update.nlri)?,
    ))
}
