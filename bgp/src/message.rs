//! Tabby's own small BGP message types.
//!
//! The rest of the speaker (FSM, sessions) only sees these types; the
//! [`codec`](super::codec) module converts them to and from the wire through
//! the `netgauze-bgp-pkt` crate. They hold exactly what an IPv4 unicast
//! speaker for a Kubernetes node needs, so they stay cheap to build and
//! compare.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// The 2-octet AS number sent in OPEN's `My Autonomous System` field when the
/// real AS does not fit in 16 bits (RFC 6793 §9).
pub const AS_TRANS: u16 = 23456;

/// BGP version 4: the only one we speak.
pub const BGP_VERSION: u8 = 4;

/// Address family identifier for IPv4 (IANA).
pub const AFI_IPV4: u16 = 1;
/// Subsequent address family identifier for unicast (IANA).
pub const SAFI_UNICAST: u8 = 1;

/// One BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// OPEN (type 1).
    Open(Open),
    /// UPDATE (type 2), IPv4 unicast only.
    Update(Update),
    /// NOTIFICATION (type 3).
    Notification(Notification),
    /// KEEPALIVE (type 4).
    Keepalive,
    /// ROUTE-REFRESH (type 5, RFC 2918).
    RouteRefresh(RouteRefresh),
}

impl Message {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Open(_) => "OPEN",
            Message::Update(_) => "UPDATE",
            Message::Notification(_) => "NOTIFICATION",
            Message::Keepalive => "KEEPALIVE",
            Message::RouteRefresh(_) => "ROUTE-REFRESH",
        }
    }
}

/// An OPEN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The sender's AS: the 4-octet AS from the capability if present,
    /// otherwise the 2-octet `My Autonomous System` field.
    pub asn: u32,
    /// Proposed hold time in seconds (0, or at least 3).
    pub hold_time: u16,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Capabilities advertised (RFC 5492).
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// Whether the sender advertised the 4-octet AS capability.
    pub fn four_octet_as(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    /// Whether the sender advertised route refresh (RFC 2918).
    pub fn route_refresh(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::RouteRefresh))
    }

    /// The sender's graceful restart capability (RFC 4724), if any.
    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(gr) => Some(gr),
            _ => None,
        })
    }
}

/// The graceful restart capability (RFC 4724 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// R: the sender has restarted (its peers need not wait for it before
    /// sending their End-of-RIB).
    pub restarted: bool,
    /// How long, in seconds (at most 4095), the receiver should keep the
    /// sender's routes after the session drops, waiting for it to come back.
    pub restart_time: u16,
    /// The address families whose routes the sender keeps forwarding across
    /// a restart, with F: it did keep them in the restart that just happened.
    pub families: Vec<GrFamily>,
}

/// One address family of [`GracefulRestart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrFamily {
    /// Address family.
    pub afi: u16,
    /// Subsequent address family.
    pub safi: u8,
    /// F: the forwarding state was preserved.
    pub forwarding: bool,
}

/// A capability in an OPEN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Multiprotocol extensions (RFC 4760) for one AFI/SAFI.
    Multiprotocol {
        /// Address family.
        afi: u16,
        /// Subsequent address family.
        safi: u8,
    },
    /// Route refresh (RFC 2918).
    RouteRefresh,
    /// 4-octet AS numbers (RFC 6793) with the speaker's AS.
    FourOctetAs(u32),
    /// Graceful restart (RFC 4724).
    GracefulRestart(GracefulRestart),
    /// Any other capability, by code; Tabby ignores it.
    Other(u8),
}

/// ORIGIN path attribute values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Learned from an interior protocol (what Tabby originates).
    Igp,
    /// Learned from EGP.
    Egp,
    /// Learned by some other means.
    Incomplete,
}

/// The path attributes Tabby reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathAttributes {
    /// ORIGIN.
    pub origin: Origin,
    /// AS_PATH as one flat list of AS numbers, nearest AS first (AS_SET
    /// members are appended in order: Tabby only uses the path for loop
    /// detection and display).
    pub as_path: Vec<u32>,
    /// NEXT_HOP.
    pub next_hop: Ipv4Addr,
    /// LOCAL_PREF (iBGP only).
    pub local_pref: Option<u32>,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
}

/// An UPDATE message for IPv4 unicast.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// Withdrawn routes.
    pub withdrawn: Vec<Ipv4Network>,
    /// Path attributes; `None` in a pure withdraw.
    pub attributes: Option<PathAttributes>,
    /// Announced routes, which all share `attributes`.
    pub nlri: Vec<Ipv4Network>,
}

impl Update {
    /// An UPDATE with no routes and no attributes: End-of-RIB for IPv4
    /// unicast (RFC 4724).
    pub fn is_end_of_rib(&self) -> bool {
        self.withdrawn.is_empty() && self.nlri.is_empty() && self.attributes.is_none()
    }
}

/// A NOTIFICATION message: error code, subcode and data (RFC 4271 §4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code.
    pub code: u8,
    /// Error subcode.
    pub subcode: u8,
    /// Diagnostic data.
    pub data: Vec<u8>,
}

impl Notification {
    /// A notification without data.
    pub fn new(code: u8, subcode: u8) -> Self {
        Notification {
            code,
            subcode,
            data: Vec::new(),
        }
    }

    /// A notification with data.
    pub fn with_data(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Self {
        Notification {
            code,
            subcode,
            data: data.into(),
        }
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} ({})",
            self.code,
            self.subcode,
            error_name(self.code, self.subcode)
        )
    }
}

/// A human name for an error code and subcode, for `node status` and logs.
pub fn error_name(code: u8, subcode: u8) -> &'static str {
    match (code, subcode) {
        (1, 1) => "connection not synchronized",
        (1, 2) => "bad message length",
        (1, 3) => "bad message type",
        (1, _) => "message header error",
        (2, 1) => "unsupported version number",
        (2, 2) => "bad peer AS",
        (2, 3) => "bad BGP identifier",
        (2, 4) => "unsupported optional parameter",
        (2, 6) => "unacceptable hold time",
        (2, _) => "OPEN message error",
        (3, 1) => "malformed attribute list",
        (3, 2) => "unrecognized well-known attribute",
        (3, 3) => "missing well-known attribute",
        (3, 4) => "attribute flags error",
        (3, 5) => "attribute length error",
        (3, 6) => "invalid ORIGIN attribute",
        (3, 8) => "invalid NEXT_HOP attribute",
        (3, 9) => "optional attribute error",
        (3, 10) => "invalid network field",
        (3, 11) => "malformed AS_PATH",
        (3, _) => "UPDATE message error",
        (4, _) => "hold timer expired",
        (5, _) => "finite state machine error",
        (6, 1) => "maximum number of prefixes reached",
        (6, 2) => "administrative shutdown",
        (6, 3) => "peer de-configured",
        (6, 4) => "administrative reset",
        (6, 5) => "connection rejected",
        (6, 7) => "connection collision resolution",
        (6, 8) => "out of resources",
        (6, _) => "cease",
        (7, _) => "ROUTE-REFRESH message error",
        _ => "unknown error",
    }
}

/// A ROUTE-REFRESH request (RFC 2918).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    /// Address family.
    pub afi: u16,
    /// Subsequent address family.
    pub safi: u8,
}

/// NOTIFICATION error codes (RFC 4271 §4.5) and the subcodes Tabby sends.
pub mod code {
    /// Message Header Error.
    pub const HEADER: u8 = 1;
    /// OPEN Message Error.
    pub const OPEN: u8 = 2;
    /// UPDATE Message Error.
    pub const UPDATE: u8 = 3;
    /// Hold Timer Expired.
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    /// Finite State Machine Error.
    pub const FSM: u8 = 5;
    /// Cease.
    pub const CEASE: u8 = 6;
    /// ROUTE-REFRESH Message Error (RFC 7313).
    pub const ROUTE_REFRESH: u8 = 7;

    /// Header: connection not synchronized.
    pub const CONNECTION_NOT_SYNCHRONIZED: u8 = 1;
    /// Header: bad message length.
    pub const BAD_MESSAGE_LENGTH: u8 = 2;
    /// Header: bad message type.
    pub const BAD_MESSAGE_TYPE: u8 = 3;
    /// OPEN: unsupported version number.
    pub const UNSUPPORTED_VERSION: u8 = 1;
    /// OPEN: bad peer AS.
    pub const BAD_PEER_AS: u8 = 2;
    /// OPEN: bad BGP identifier.
    pub const BAD_BGP_IDENTIFIER: u8 = 3;
    /// OPEN: unacceptable hold time.
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
    /// UPDATE: malformed attribute list.
    pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    /// UPDATE: missing well-known attribute.
    pub const MISSING_WELL_KNOWN_ATTRIBUTE: u8 = 3;
    /// UPDATE: attribute flags error.
    pub const ATTRIBUTE_FLAGS_ERROR: u8 = 4;
    /// UPDATE: attribute length error.
    pub const ATTRIBUTE_LENGTH_ERROR: u8 = 5;
    /// UPDATE: invalid ORIGIN attribute.
    pub const INVALID_ORIGIN: u8 = 6;
    /// UPDATE: invalid NEXT_HOP attribute.
    pub const INVALID_NEXT_HOP: u8 = 8;
    /// UPDATE: optional attribute error.
    pub const OPTIONAL_ATTRIBUTE_ERROR: u8 = 9;
    /// UPDATE: invalid network field.
    pub const INVALID_NETWORK_FIELD: u8 = 10;
    /// UPDATE: malformed AS_PATH.
    pub const MALFORMED_AS_PATH: u8 = 11;
    /// FSM: unexpected message in OpenSent (RFC 6608).
    pub const FSM_OPEN_SENT: u8 = 1;
    /// FSM: unexpected message in OpenConfirm (RFC 6608).
    pub const FSM_OPEN_CONFIRM: u8 = 2;
    /// FSM: unexpected message in Established (RFC 6608).
    pub const FSM_ESTABLISHED: u8 = 3;
    /// Cease: maximum number of prefixes reached (RFC 4486).
    pub const MAX_PREFIXES: u8 = 1;
    /// Cease: administrative shutdown (RFC 4486).
    pub const ADMIN_SHUTDOWN: u8 = 2;
    /// Cease: peer de-configured.
    pub const PEER_DECONFIGURED: u8 = 3;
    /// Cease: connection rejected.
    pub const CONNECTION_REJECTED: u8 = 5;
    /// Cease: out of resources (RFC 4486).
    pub const OUT_OF_RESOURCES: u8 = 8;
    /// Cease: connection collision resolution.
    pub const COLLISION_RESOLUTION: u8 = 7;
}
