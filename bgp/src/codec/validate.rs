//! UPDATE error handling by RFC 7606, on the raw body before netgauze
//! parses it.
//!
//! RFC 4271 §6.3 resets the session for every malformed attribute. RFC 7606
//! keeps the session where the NLRI can still be located:
//!
//! - **session reset** when they cannot: Withdrawn Routes or Total Path
//!   Attribute Length past the message (3/1), a syntactically wrong NLRI or
//!   withdrawn field (3/10), a repeated MP_REACH_NLRI or MP_UNREACH_NLRI
//!   (3/1, §3 g), an MP_REACH_NLRI whose next hop length hides its NLRI (3/9,
//!   §7.11);
//! - **treat-as-withdraw** (every route of the UPDATE is withdrawn) for the
//!   errors of ORIGIN, AS_PATH, NEXT_HOP, MULTI_EXIT_DISC and LOCAL_PREF
//!   (§3 e, §7.1-7.5): flags in conflict (3/4), a wrong length (3/5), an
//!   undefined ORIGIN (3/6), a malformed AS_PATH (3/11); a missing well-known
//!   attribute (3/3, §3 d); an attribute that overruns the attribute section
//!   (§4, reported as 3/5);
//! - **attribute discard** for ATOMIC_AGGREGATE, AGGREGATOR, AS4_AGGREGATOR
//!   and AS4_PATH of the wrong shape (§7.6, §7.7, RFC 6793 §6), and for every
//!   repetition of an attribute but the first (§3 g).
//!
//! The strongest approach wins (§3 h). The NOTIFICATION RFC 4271 would have
//! sent is kept for the log. A NEXT_HOP that is well formed but no usable
//! address is the FSM's business (a semantic error, RFC 4271 §6.3).

use std::net::Ipv4Addr;
use std::ops::Range;

use ipnetwork::Ipv4Network;

use super::{ErrorHandling, UpdateError};
use crate::message::{code, Notification};

/// Attribute type codes.
const ORIGIN: u8 = 1;
const AS_PATH: u8 = 2;
const NEXT_HOP: u8 = 3;
const MED: u8 = 4;
const LOCAL_PREF: u8 = 5;
const ATOMIC_AGGREGATE: u8 = 6;
const AGGREGATOR: u8 = 7;
const MP_REACH: u8 = 14;
const MP_UNREACH: u8 = 15;
const AS4_PATH: u8 = 17;
const AS4_AGGREGATOR: u8 = 18;

/// Attribute flag bits.
const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const EXTENDED: u8 = 0x10;

/// What to do with an UPDATE body.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Parse it, without the attributes at `strip` (offsets in the body).
    Parse {
        strip: Vec<Range<usize>>,
        error: Option<UpdateError>,
    },
    /// Withdraw every prefix it names.
    Withdraw {
        prefixes: Vec<Ipv4Network>,
        error: Notification,
    },
    /// Reset the session with this NOTIFICATION.
    Reset(Notification),
}

/// Calls `each` for every prefix of an NLRI-encoded field; false if the
/// field is syntactically wrong.
pub(super) fn walk_prefixes(mut bytes: &[u8], mut each: impl FnMut(Ipv4Network)) -> bool {
    while let Some((&len, rest)) = bytes.split_first() {
        let octets = usize::from(len).div_ceil(8);
        if len > 32 || rest.len() < octets {
            return false;
        }
        let mut addr = [0u8; 4];
        addr[..octets].copy_from_slice(&rest[..octets]);
        if let Ok(net) = Ipv4Network::new(Ipv4Addr::from(addr), len) {
            each(Ipv4Network::new(net.network(), len).unwrap_or(net));
        }
        bytes = &rest[octets..];
    }
    true
}

fn update_error(subcode: u8, data: &[u8]) -> Notification {
    Notification::with_data(code::UPDATE, subcode, data)
}

/// The outcome of checking one attribute.
enum Check {
    Ok,
    Withdraw(Notification),
    Discard(Notification),
    Reset(Notification),
}

/// The scan's findings, strongest error kept.
#[derive(Default)]
struct Findings<'a> {
    seen: [u32; 8],
    strip: Vec<Range<usize>>,
    withdraw: Option<Notification>,
    discard: Option<Notification>,
    reset: Option<Notification>,
    mp_reach: Option<&'a [u8]>,
    mp_unreach: Option<&'a [u8]>,
}

impl Findings<'_> {
    /// Records attribute `type_code`; false if it was already seen.
    fn first_time(&mut self, type_code: u8) -> bool {
        let (word, bit) = (usize::from(type_code / 32), 1u32 << (type_code % 32));
        let fresh = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        fresh
    }

    fn has(&self, type_code: u8) -> bool {
        self.seen[usize::from(type_code / 32)] & (1u32 << (type_code % 32)) != 0
    }

    fn withdraw(&mut self, n: Notification) {
        self.withdraw.get_or_insert(n);
    }
}

/// Checks an UPDATE body (the message without its 19-octet header).
pub(super) fn check_update(body: &[u8], asn4: bool) -> Verdict {
    let malformed_list = || {
        Verdict::Reset(Notification::new(
            code::UPDATE,
            code::MALFORMED_ATTRIBUTE_LIST,
        ))
    };
    let invalid_network =
        || Verdict::Reset(Notification::new(code::UPDATE, code::INVALID_NETWORK_FIELD));
    let Some(wlen) = body
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return malformed_list();
    };
    let Some(alen) = body
        .get(2 + wlen..4 + wlen)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return malformed_list();
    };
    let attrs_start = 4 + wlen;
    if attrs_start + alen > body.len() {
        return malformed_list();
    }
    let withdrawn = &body[2..2 + wlen];
    let nlri = &body[attrs_start + alen..];
    if !walk_prefixes(withdrawn, |_| {}) || !walk_prefixes(nlri, |_| {}) {
        return invalid_network();
    }
    let mut found = Findings::default();
    scan_attributes(
        &body[attrs_start..attrs_start + alen],
        attrs_start,
        asn4,
        &mut found,
    );
    if found.reset.is_none() && found.withdraw.is_none() {
        check_mandatory(!nlri.is_empty(), &mut found);
    }
    if let Some(n) = found.reset {
        return Verdict::Reset(n);
    }
    if let Some(error) = found.withdraw {
        let mut prefixes = Vec::new();
        for field in [
            Some(withdrawn),
            found.mp_unreach,
            Some(nlri),
            found.mp_reach,
        ] {
            walk_prefixes(field.unwrap_or_default(), |p| prefixes.push(p));
        }
        return Verdict::Withdraw { prefixes, error };
    }
    let error = found.discard.map(|notification| UpdateError {
        handling: ErrorHandling::AttributeDiscard,
        notification,
    });
    Verdict::Parse {
        strip: found.strip,
        error,
    }
}

/// Walks the attribute section; `offset` is its position in the body.
fn scan_attributes<'a>(attrs: &'a [u8], offset: usize, asn4: bool, found: &mut Findings<'a>) {
    let mut pos = 0;
    while pos < attrs.len() {
        let rest = &attrs[pos..];
        let header = if rest[0] & EXTENDED != 0 { 4 } else { 3 };
        let len = match rest.get(2..header) {
            Some([l]) => usize::from(*l),
            Some([hi, lo]) => usize::from(u16::from_be_bytes([*hi, *lo])),
            _ => usize::MAX,
        };
        if len == usize::MAX || header + len > rest.len() {
            // RFC 7606 §4: the attribute overruns the section.
            found.withdraw(update_error(code::ATTRIBUTE_LENGTH_ERROR, rest));
            return;
        }
        let (flags, type_code) = (rest[0], rest[1]);
        let whole = &rest[..header + len];
        let value = &rest[header..header + len];
        let range = offset + pos..offset + pos + header + len;
        pos += header + len;
        if !found.first_time(type_code) {
            if type_code == MP_REACH || type_code == MP_UNREACH {
                found.reset.get_or_insert(Notification::new(
                    code::UPDATE,
                    code::MALFORMED_ATTRIBUTE_LIST,
                ));
            } else {
                found.strip.push(range);
            }
            continue;
        }
        match check_attribute(type_code, flags, value, whole, asn4, found) {
            Check::Ok => {}
            Check::Withdraw(n) => found.withdraw(n),
            Check::Discard(n) => {
                found.strip.push(range);
                found.discard.get_or_insert(n);
            }
            Check::Reset(n) => {
                found.reset.get_or_insert(n);
            }
        }
    }
}

/// Checks one attribute the speaker knows; others pass through.
fn check_attribute<'a>(
    type_code: u8,
    flags: u8,
    value: &'a [u8],
    whole: &'a [u8],
    asn4: bool,
    found: &mut Findings<'a>,
) -> Check {
    let well_known = flags & (OPTIONAL | TRANSITIVE) == TRANSITIVE;
    let length = |want: usize| {
        (value.len() != want).then(|| update_error(code::ATTRIBUTE_LENGTH_ERROR, whole))
    };
    let withdraw = |n: Option<Notification>| n.map_or(Check::Ok, Check::Withdraw);
    let discard = |n: Option<Notification>| n.map_or(Check::Ok, Check::Discard);
    let flags_error = || Check::Withdraw(update_error(code::ATTRIBUTE_FLAGS_ERROR, whole));
    match type_code {
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF if !well_known => flags_error(),
        MED if flags & (OPTIONAL | TRANSITIVE) != OPTIONAL => flags_error(),
        ORIGIN => withdraw(
            length(1).or_else(|| (value[0] > 2).then(|| update_error(code::INVALID_ORIGIN, whole))),
        ),
        AS_PATH => withdraw(
            (!as_path_ok(value, if asn4 { 4 } else { 2 }))
                .then(|| Notification::new(code::UPDATE, code::MALFORMED_AS_PATH)),
        ),
        NEXT_HOP | MED | LOCAL_PREF => withdraw(length(4)),
        ATOMIC_AGGREGATE => discard(length(0)),
        AGGREGATOR => discard(length(if asn4 { 8 } else { 6 })),
        AS4_AGGREGATOR => discard(length(8)),
        AS4_PATH => discard(
            (!as_path_ok(value, 4)).then(|| update_error(code::OPTIONAL_ATTRIBUTE_ERROR, whole)),
        ),
        MP_REACH => check_mp_reach(value, whole, found),
        MP_UNREACH => match value {
            [0, 1, 1, nlri @ ..] if walk_prefixes(nlri, |_| {}) => {
                found.mp_unreach = Some(nlri);
                Check::Ok
            }
            [0, 1, 1, ..] | [] | [_] | [_, _] => {
                Check::Reset(update_error(code::OPTIONAL_ATTRIBUTE_ERROR, whole))
            }
            _ => Check::Ok,
        },
        _ => Check::Ok,
    }
}

/// MP_REACH_NLRI for IPv4 unicast: a 4-octet next hop, then the NLRI.
fn check_mp_reach<'a>(value: &'a [u8], whole: &[u8], found: &mut Findings<'a>) -> Check {
    let reset = || Check::Reset(update_error(code::OPTIONAL_ATTRIBUTE_ERROR, whole));
    let Some(&[a0, a1, safi, nh_len]) = value.get(..4) else {
        return reset();
    };
    let nh_len = usize::from(nh_len);
    if value.len() < 5 + nh_len {
        return reset();
    }
    if (u16::from_be_bytes([a0, a1]), safi) != (1, 1) {
        return Check::Ok;
    }
    let nlri = &value[5 + nh_len..];
    if nh_len != 4 || !walk_prefixes(nlri, |_| {}) {
        return reset();
    }
    found.mp_reach = Some(nlri);
    Check::Ok
}

/// RFC 7606 §7.2: known segment types, no empty segment, no overrun, no
/// trailing octet.
fn as_path_ok(mut value: &[u8], width: usize) -> bool {
    while !value.is_empty() {
        let [kind, count, rest @ ..] = value else {
            return false;
        };
        let len = usize::from(*count) * width;
        if !(1..=4).contains(kind) || *count == 0 || rest.len() < len {
            return false;
        }
        value = &rest[len..];
    }
    true
}

/// RFC 7606 §3 d: routes need ORIGIN and AS_PATH, and NLRI outside
/// MP_REACH_NLRI needs NEXT_HOP.
fn check_mandatory(classic_nlri: bool, found: &mut Findings<'_>) {
    let mp_nlri = found.mp_reach.is_some_and(|n| !n.is_empty());
    if !classic_nlri && !mp_nlri {
        return;
    }
    let missing = [ORIGIN, AS_PATH, NEXT_HOP]
        .into_iter()
        .filter(|&c| c != NEXT_HOP || classic_nlri)
        .find(|&c| !found.has(c));
    if let Some(c) = missing {
        found.withdraw(update_error(code::MISSING_WELL_KNOWN_ATTRIBUTE, &[c]));
    }
}
