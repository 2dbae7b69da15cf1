//! Wire codec: Tabby's [`Message`] to and from bytes.
//!
//! The message bodies (OPEN with capabilities, UPDATE with path attributes
//! and 2- or 4-octet AS paths, ROUTE-REFRESH) are parsed and written by the
//! `netgauze-bgp-pkt` crate, which also maps its parse errors to RFC 4271 §6
//! NOTIFICATIONs. This module adds what that crate does not do:
//!
//! - framing on a TCP stream ([`check_header`], [`decode_from`]): netgauze
//!   accepts UPDATEs up to 65535 octets (RFC 8654) and has no per-type
//!   minimum lengths; a speaker without the extended-message capability must
//!   answer both with 1/2 Bad Message Length;
//! - NOTIFICATION bodies by hand: netgauze models them as a closed enum of
//!   IANA-registered subcodes and rejects any other, but a NOTIFICATION is
//!   never answered (RFC 4271 §6.4) so Tabby keeps the raw three fields;
//! - UPDATE error handling by RFC 7606 (`validate`): which errors still
//!   reset the session, which withdraw the UPDATE's routes, which drop one
//!   attribute; with the subcodes of RFC 4271 §6.3 (netgauze's own mapping
//!   gives 3/6 or 3/8 where 3/5 is due);
//! - merging AS4_PATH into AS_PATH on a 2-octet session (RFC 6793 §4.2.3).

use std::collections::HashMap;

use bytes::{Buf, BufMut, BytesMut};
use ipnetwork::Ipv4Network;
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily, GracefulRestartCapability,
    MultiProtocolExtensionsCapability, UnrecognizedCapability,
};
use netgauze_bgp_pkt::iana::RouteRefreshSubcode;
use netgauze_bgp_pkt::notification::BgpNotificationMessage;
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::route_refresh::BgpRouteRefreshMessage;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_iana::address_family::{AddressFamily, AddressType, SubsequentAddressFamily};
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use netgauze_parse_utils::WritablePdu;

use update::{update_from_wire, update_to_wire};
use validate::Verdict;

use super::message::{
    code, Capability, GrFamily, GracefulRestart, Message, Notification, Open, RouteRefresh, Update,
    AS_TRANS,
};

/// Length of the fixed header: marker, length, type.
pub const HEADER_LEN: usize = 19;
/// Largest message without the extended-message capability (RFC 4271 §4.1).
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Errors encoding a message.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The message would exceed 4096 octets.
    #[error("message of {0} octets exceeds 4096")]
    TooLong(usize),
    /// A prefix is not unicast (multicast, broadcast).
    #[error("prefix {0} is not a unicast network")]
    NotUnicast(Ipv4Network),
    /// An AFI/SAFI pair the codec crate does not know.
    #[error("unknown address family {afi}/{safi}")]
    AddressFamily {
        /// Address family.
        afi: u16,
        /// Subsequent address family.
        safi: u8,
    },
    /// The codec crate refused to write the message.
    #[error("write {kind} message: {detail}")]
    Write {
        /// Message kind.
        kind: &'static str,
        /// The crate's error, as text.
        detail: String,
    },
}

/// How an UPDATE error is handled instead of a session reset (RFC 7606 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorHandling {
    /// Every route the UPDATE names is withdrawn.
    TreatAsWithdraw,
    /// The bad attribute is dropped and the UPDATE processed.
    AttributeDiscard,
}

/// An UPDATE error that does not reset the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateError {
    /// What was done about it.
    pub handling: ErrorHandling,
    /// The NOTIFICATION RFC 4271 §6.3 would have sent: for the log.
    pub notification: Notification,
}

/// A decoded message, with the UPDATE error handled without a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The message (for treat-as-withdraw: an UPDATE of withdrawals only).
    pub message: Message,
    /// The error, if any.
    pub error: Option<UpdateError>,
}

/// Checks a message header (RFC 4271 §6.1) and returns the message's total
/// length. `header` must hold at least [`HEADER_LEN`] octets.
pub fn check_header(header: &[u8]) -> Result<usize, Notification> {
    let Some(header) = header.get(..HEADER_LEN) else {
        return Err(Notification::new(code::HEADER, code::BAD_MESSAGE_LENGTH));
    };
    if header[..16].iter().any(|&b| b != 0xff) {
        return Err(Notification::new(
            code::HEADER,
            code::CONNECTION_NOT_SYNCHRONIZED,
        ));
    }
    let len = u16::from_be_bytes([header[16], header[17]]);
    let bad_length =
        || Notification::with_data(code::HEADER, code::BAD_MESSAGE_LENGTH, len.to_be_bytes());
    let len = usize::from(len);
    if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(bad_length());
    }
    let kind = header[18];
    let length_ok = match kind {
        1 => len >= 29,
        2 => len >= 23,
        3 => len >= 21,
        4 => len == HEADER_LEN,
        5 => len == 23,
        _ => {
            return Err(Notification::with_data(
                code::HEADER,
                code::BAD_MESSAGE_TYPE,
                [kind],
            ))
        }
    };
    if !length_ok {
        return Err(bad_length());
    }
    Ok(len)
}

/// Takes one whole message off the front of `buf`, if it holds one.
///
/// `asn4` says whether both sides announced 4-octet AS support, which
/// decides how AS_PATH is read. On error the connection must be reset with
/// the returned NOTIFICATION; `buf` is then left in an unspecified state.
pub fn decode_from(buf: &mut BytesMut, asn4: bool) -> Result<Option<Message>, Notification> {
    decode_from_checked(buf, asn4).map(|d| d.map(|d| d.message))
}

/// [`decode_from`] with the UPDATE error handled without a reset, as
/// [`decode_checked`] reports it.
pub fn decode_from_checked(
    buf: &mut BytesMut,
    asn4: bool,
) -> Result<Option<Decoded>, Notification> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = check_header(buf)?;
    if buf.len() < len {
        return Ok(None);
    }
    let frame = buf.split_to(len);
    decode_checked(&frame, asn4).map(Some)
}

/// Decodes one complete message (header included).
pub fn decode(frame: &[u8], asn4: bool) -> Result<Message, Notification> {
    decode_checked(frame, asn4).map(|d| d.message)
}

/// Decodes one complete message like [`decode`], and reports an UPDATE
/// error that was handled without a session reset (RFC 7606).
pub fn decode_checked(frame: &[u8], asn4: bool) -> Result<Decoded, Notification> {
    let len = check_header(frame)?;
    if frame.len() != len {
        let declared = u16::try_from(len).unwrap_or(u16::MAX);
        return Err(Notification::with_data(
            code::HEADER,
            code::BAD_MESSAGE_LENGTH,
            declared.to_be_bytes(),
        ));
    }
    let body = &frame[HEADER_LEN..];
    let plain = |message| Decoded {
        message,
        error: None,
    };
    match frame[18] {
        2 => decode_update(frame, asn4),
        3 => Ok(plain(Message::Notification(Notification {
            code: body[0],
            subcode: body[1],
            data: body[2..].to_vec(),
        }))),
        4 => Ok(plain(Message::Keepalive)),
        _ => parse_wire(frame, asn4).map(plain),
    }
}

/// An UPDATE: RFC 7606's checks first, then netgauze on what is left.
fn decode_update(frame: &[u8], asn4: bool) -> Result<Decoded, Notification> {
    match validate::check_update(&frame[HEADER_LEN..], asn4) {
        Verdict::Reset(n) => Err(n),
        Verdict::Withdraw { prefixes, error } => Ok(Decoded {
            message: Message::Update(Update {
                withdrawn: prefixes,
                attributes: None,
                nlri: Vec::new(),
            }),
            error: Some(UpdateError {
                handling: ErrorHandling::TreatAsWithdraw,
                notification: error,
            }),
        }),
        Verdict::Parse { strip, error } if strip.is_empty() => Ok(Decoded {
            message: parse_wire(frame, asn4)?,
            error,
        }),
        Verdict::Parse { strip, error } => Ok(Decoded {
            message: parse_wire(&without(frame, &strip), asn4)?,
            error,
        }),
    }
}

/// `frame` without the attributes at `strip` (offsets in the body), with
/// its lengths fixed.
fn without(frame: &[u8], strip: &[std::ops::Range<usize>]) -> Vec<u8> {
    let body = &frame[HEADER_LEN..];
    let mut out = frame[..HEADER_LEN].to_vec();
    let mut last = 0;
    for r in strip {
        out.extend_from_slice(&body[last..r.start]);
        last = r.end;
    }
    out.extend_from_slice(&body[last..]);
    let removed: usize = strip.iter().map(|r| r.len()).sum();
    let wlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let alen = usize::from(u16::from_be_bytes([body[2 + wlen], body[3 + wlen]])) - removed;
    let at = HEADER_LEN + 2 + wlen;
    out[at..at + 2].copy_from_slice(&(alen as u16).to_be_bytes());
    let total = out.len() as u16;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    out
}

/// OPEN, UPDATE and ROUTE-REFRESH through netgauze.
fn parse_wire(frame: &[u8], asn4: bool) -> Result<Message, Notification> {
    let body = &frame[HEADER_LEN..];
    let kind = frame[18];
    let mut ctx = BgpParsingContext::new(
        asn4,
        HashMap::new(),
        HashMap::new(),
        false,
        false,
        true,
        true,
    );
    let mut reader = SliceReader::new(frame);
    match BgpMessage::parse(&mut reader, &mut ctx) {
        Ok(BgpMessage::Open(open)) => Ok(Message::Open(open_from_wire(&open))),
        Ok(BgpMessage::Update(update)) => update_from_wire(&update, asn4).map(Message::Update),
        Ok(BgpMessage::RouteRefresh(rr)) => Ok(Message::RouteRefresh(RouteRefresh {
            afi: rr.address_type().address_family().into(),
            safi: rr.address_type().subsequent_address_family().into(),
        })),
        Ok(other) => Err(Notification::with_data(
            code::HEADER,
            code::BAD_MESSAGE_TYPE,
            [other.get_type().into()],
        )),
        // RFC 2918: a request for an AFI/SAFI we did not advertise is
        // ignored, not an error; netgauze rejects unregistered ones.
        Err(_) if kind == 5 => Ok(Message::RouteRefresh(RouteRefresh {
            afi: u16::from_be_bytes([body[0], body[1]]),
            safi: body[3],
        })),
        Err(err) => Err(notification_from_wire(&BgpNotificationMessage::from(err))),
    }
}

/// Appends the encoding of `msg` to `out`.
pub fn encode(msg: &Message, asn4: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    match msg {
        Message::Notification(n) => {
            let len = HEADER_LEN + 2 + n.data.len();
            if len > MAX_MESSAGE_LEN {
                return Err(EncodeError::TooLong(len));
            }
            out.put_slice(&[0xff; 16]);
            out.put_u16(len as u16);
            out.put_u8(3);
            out.put_u8(n.code);
            out.put_u8(n.subcode);
            out.put_slice(&n.data);
            return Ok(());
        }
        Message::Keepalive => write_wire(&BgpMessage::KeepAlive, msg.kind(), out)?,
        Message::Open(open) => write_wire(&BgpMessage::Open(open_to_wire(open)?), msg.kind(), out)?,
        Message::Update(update) => write_wire(
            &BgpMessage::Update(update_to_wire(update, asn4)?),
            msg.kind(),
            out,
        )?,
        Message::RouteRefresh(rr) => {
            let rr = BgpRouteRefreshMessage::new(
                address_type(rr.afi, rr.safi)?,
                RouteRefreshSubcode::NormalRequest,
            );
            write_wire(&BgpMessage::RouteRefresh(rr), msg.kind(), out)?
        }
    }
    let written = out.len() - start;
    if written > MAX_MESSAGE_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLong(written));
    }
    Ok(())
}

/// Encoded size of one IPv4 NLRI entry: length octet plus prefix octets.
pub fn nlri_len(net: &Ipv4Network) -> usize {
    1 + usize::from(net.prefix()).div_ceil(8)
}

fn write_wire(msg: &BgpMessage, kind: &'static str, out: &mut BytesMut) -> Result<(), EncodeError> {
    let len = msg.len();
    if len > MAX_MESSAGE_LEN {
        return Err(EncodeError::TooLong(len));
    }
    out.reserve(len);
    msg.write(&mut out.writer())
        .map_err(|e| EncodeError::Write {
            kind,
            detail: e.to_string(),
        })
}

fn notification_from_wire(n: &BgpNotificationMessage) -> Notification {
    let mut bytes = Vec::with_capacity(n.len());
    if n.write(&mut bytes).is_err() || bytes.len() < 2 {
        return Notification::new(code::FSM, 0);
    }
    let mut b = &bytes[..];
    let (c, s) = (b.get_u8(), b.get_u8());
    Notification::with_data(c, s, b)
}

fn address_type(afi: u16, safi: u8) -> Result<AddressType, EncodeError> {
    let err = || EncodeError::AddressFamily { afi, safi };
    let family = AddressFamily::try_from(afi).map_err(|_| err())?;
    let sub = SubsequentAddressFamily::try_from(safi).map_err(|_| err())?;
    AddressType::from_afi_safi(family, sub).map_err(|_| err())
}

fn open_from_wire(open: &BgpOpenMessage) -> Open {
    let capabilities = open
        .capabilities()
        .into_iter()
        .map(|cap| match cap {
            BgpCapability::MultiProtocolExtensions(mp) => Capability::Multiprotocol {
                afi: mp.address_type().address_family().into(),
                safi: mp.address_type().subsequent_address_family().into(),
            },
            BgpCapability::RouteRefresh => Capability::RouteRefresh,
            BgpCapability::FourOctetAs(c) => Capability::FourOctetAs(c.asn4()),
            BgpCapability::GracefulRestartCapability(gr) => {
                Capability::GracefulRestart(GracefulRestart {
                    restarted: gr.restart(),
                    restart_time: gr.time(),
                    families: gr
                        .address_families()
                        .iter()
                        .map(|f| GrFamily {
                            afi: f.address_type().address_family().into(),
                            safi: f.address_type().subsequent_address_family().into(),
                            forwarding: f.forwarding_state(),
                        })
                        .collect(),
                })
            }
            BgpCapability::Unrecognized(u) => Capability::Other(*u.code()),
            other => Capability::Other(match other.code() {
                Ok(c) => c.into(),
                Err(c) => c,
            }),
        })
        .collect();
    Open {
        asn: open.my_asn4(),
        hold_time: open.hold_time(),
        router_id: open.bgp_id(),
        capabilities,
    }
}

fn open_to_wire(open: &Open) -> Result<BgpOpenMessage, EncodeError> {
    let caps = open
        .capabilities
        .iter()
        .map(|cap| {
            Ok(match *cap {
                Capability::Multiprotocol { afi, safi } => BgpCapability::MultiProtocolExtensions(
                    MultiProtocolExtensionsCapability::new(address_type(afi, safi)?),
                ),
                Capability::RouteRefresh => BgpCapability::RouteRefresh,
                Capability::FourOctetAs(asn) => {
                    BgpCapability::FourOctetAs(FourOctetAsCapability::new(asn))
                }
                Capability::GracefulRestart(ref gr) => {
                    let families = gr
                        .families
                        .iter()
                        .map(|f| {
                            let at = address_type(f.afi, f.safi)?;
                            Ok(GracefulRestartAddressFamily::new(f.forwarding, at))
                        })
                        .collect::<Result<Vec<_>, EncodeError>>()?;
                    BgpCapability::GracefulRestartCapability(GracefulRestartCapability::new(
                        gr.restarted,
                        false,
                        gr.restart_time.min(4095),
                        families,
                    ))
                }
                Capability::Other(code) => {
                    BgpCapability::Unrecognized(UnrecognizedCapability::new(code, Vec::new()))
                }
            })
        })
        .collect::<Result<Vec<_>, EncodeError>>()?;
    let my_as = u16::try_from(open.asn).unwrap_or(AS_TRANS);
    let params = if caps.is_empty() {
        Vec::new()
    } else {
        vec![BgpOpenMessageParameter::Capabilities(caps.into())]
    };
    Ok(BgpOpenMessage::new(
        my_as,
        open.hold_time,
        open.router_id,
        params,
    ))
}

mod update;
mod validate;

#[cfg(test)]
mod malformed_tests;
#[cfg(test)]
mod tests;
