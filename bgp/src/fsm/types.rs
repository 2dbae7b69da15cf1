//! The FSM's inputs, outputs and parameters.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::message::{Message, Notification};

/// Hold time while waiting for the peer's OPEN (RFC 4271 §8: "4 minutes").
pub const OPEN_HOLD_TIME: Duration = Duration::from_secs(240);

/// Identifies one TCP connection of a peer, chosen by the runtime.
pub type ConnId = u64;

/// The six RFC 4271 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Not trying; waiting for a start or the automatic restart timer.
    Idle,
    /// Connecting to the peer.
    Connect,
    /// Waiting for the peer to connect (an outbound attempt failed).
    Active,
    /// OPEN sent, waiting for the peer's OPEN.
    OpenSent,
    /// OPENs exchanged, waiting for KEEPALIVE.
    OpenConfirm,
    /// Session up.
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        })
    }
}

/// The FSM's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Connect retry, and the automatic restart from Idle.
    ConnectRetry,
    /// Hold timer.
    Hold,
    /// Keepalive timer.
    Keepalive,
    /// Graceful restart: how long a peer that went down keeps its routes
    /// while it restarts (the restart time it advertised).
    Restart,
    /// Graceful restart: how long a peer that is back has to re-send its
    /// routes (End-of-RIB) before its stale ones go.
    Stale,
}

/// What the FSM needs to know about both ends.
#[derive(Debug, Clone)]
pub struct FsmConfig {
    /// Our AS.
    pub local_asn: u32,
    /// Our BGP identifier.
    pub router_id: Ipv4Addr,
    /// The AS the peer must announce.
    pub peer_asn: u32,
    /// Proposed hold time in seconds (0, or at least 3).
    pub hold_time: u16,
    /// Keepalive interval in seconds; capped at a third of the negotiated
    /// hold time.
    pub keepalive: u16,
    /// First connect-retry delay; doubles on each failure.
    pub connect_retry: Duration,
    /// Cap of the connect-retry back-off.
    pub connect_retry_max: Duration,
    /// Most prefixes the peer may announce (RFC 4486): more resets the
    /// session with Cease 6/1. Counts what the peer announced, before any
    /// import policy.
    pub max_prefix: Option<u32>,
    /// Graceful restart (RFC 4724): the restart time we advertise, in
    /// seconds; 0 turns graceful restart off on both sides.
    pub restart_time: u16,
    /// Graceful restart: how long a restarted peer's stale routes wait for
    /// its End-of-RIB once it is back.
    pub stale_time: Duration,
}

/// What was agreed when the session came up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The connection carrying the session.
    pub conn: ConnId,
    /// Hold time in seconds (0: no hold timer, no keepalives).
    pub hold_time: u16,
    /// Keepalive interval in seconds.
    pub keepalive: u16,
    /// Both sides speak 4-octet AS numbers.
    pub asn4: bool,
    /// The peer accepts ROUTE-REFRESH.
    pub route_refresh: bool,
    /// The peer's BGP identifier.
    pub remote_id: Ipv4Addr,
    /// The peer restarts gracefully for IPv4 unicast (both sides advertised
    /// graceful restart, and the peer listed the family).
    pub peer_restart: Option<PeerRestart>,
    /// The peer understands End-of-RIB: it advertised graceful restart.
    pub end_of_rib: bool,
}

/// What a gracefully restarting peer announced in its OPEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRestart {
    /// How long to keep its routes after its session drops.
    pub restart_time: u16,
    /// It kept forwarding through the restart that just happened (F bit).
    pub forwarding: bool,
}

/// Inputs to the FSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Manual start.
    Start,
    /// Manual stop (Cease 6/2 if a connection is up).
    Stop,
    /// A timer went off.
    TimerExpired(Timer),
    /// A TCP connection is up: `outbound` if we opened it.
    Connected {
        /// Connection id.
        conn: ConnId,
        /// We initiated it.
        outbound: bool,
    },
    /// The outbound connection attempt failed.
    ConnectFailed,
    /// The connection was closed or reset by the peer.
    Closed {
        /// Connection id.
        conn: ConnId,
    },
    /// A message arrived.
    Received {
        /// Connection id.
        conn: ConnId,
        /// The message.
        msg: Message,
    },
    /// A malformed message arrived; the codec chose the NOTIFICATION.
    Malformed {
        /// Connection id.
        conn: ConnId,
        /// What to send back.
        notification: Notification,
    },
    /// The peer does not read what we send (the send queue is full or a
    /// write made no progress for too long).
    SendBlocked {
        /// Connection id.
        conn: ConnId,
    },
}

/// Outputs of the FSM, to be carried out in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start an outbound connection attempt (abandoning any pending one).
    Connect,
    /// Send a message on a connection.
    Send {
        /// Connection id.
        conn: ConnId,
        /// The message.
        msg: Message,
    },
    /// Close a connection after flushing what was sent.
    Close {
        /// Connection id.
        conn: ConnId,
    },
    /// Arm (or re-arm) a timer.
    StartTimer(Timer, Duration),
    /// Disarm a timer.
    StopTimer(Timer),
    /// The session reached Established.
    Up(Negotiated),
    /// The session left Established, or a restarting peer did not come
    /// back in time: drop every route learned from the peer.
    Down,
    /// The session of a gracefully restarting peer dropped: keep its routes,
    /// marked stale, until it is back.
    Stale,
    /// The restarted peer has re-sent its routes (End-of-RIB) or ran out of
    /// time: drop its routes that are still stale.
    PurgeStale,
    /// Advertise the whole local RIB (Established, or ROUTE-REFRESH).
    AdvertiseAll,
    /// Routes announced by the peer, sharing one next hop.
    Learned {
        /// Next hop.
        next_hop: Ipv4Addr,
        /// Prefixes.
        prefixes: Vec<Ipv4Network>,
    },
    /// Routes withdrawn by the peer.
    Withdrawn(Vec<Ipv4Network>),
    /// An UPDATE's routes were withdrawn instead of learned (RFC 7606
    /// treat-as-withdraw) for the error RFC 4271 would have reset with: log it.
    TreatedAsWithdraw(Notification),
}
