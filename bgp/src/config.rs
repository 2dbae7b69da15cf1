//! The speaker's configuration, events, status and errors.

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnetwork::Ipv4Network;

use super::fsm::State;
use super::policy::Rule;

/// The well-known BGP port.
pub const BGP_PORT: u16 = 179;

/// The local side of every session.
#[derive(Debug, Clone)]
pub struct SpeakerConfig {
    /// Our BGP identifier (the node's address).
    pub router_id: Ipv4Addr,
    /// Our AS (Calico's default is 64512).
    pub asn: u32,
    /// Address to listen on and to bind outbound connections to;
    /// `0.0.0.0` lets the kernel choose the source.
    pub listen_addr: Ipv4Addr,
    /// TCP port to listen on and to connect to (179; another in tests).
    pub listen_port: u16,
}

/// Which kind of peer this is, as `tabbyctl node status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerType {
    /// Another node, from the full mesh.
    NodeMesh,
    /// A `BGPPeer` for every node.
    Global,
    /// A `BGPPeer` for this node only.
    NodeSpecific,
}

impl std::fmt::Display for PeerType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerType::NodeMesh => "node-to-node mesh",
            PeerType::Global => "global",
            PeerType::NodeSpecific => "node specific",
        })
    }
}

/// One peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The peer's address.
    pub addr: Ipv4Addr,
    /// The peer's AS: ours for iBGP, another for eBGP.
    pub asn: u32,
    /// Proposed hold time in seconds (default 90; 0 or at least 3).
    pub hold_time: u16,
    /// Keepalive interval in seconds (default 30).
    pub keepalive: u16,
    /// First connect-retry delay (default 5 s); doubles up to
    /// `connect_retry_max`.
    pub connect_retry: Duration,
    /// Cap of the connect-retry back-off (default 120 s).
    pub connect_retry_max: Duration,
    /// TCP MD5 password (RFC 2385).
    pub password: Option<String>,
    /// For `node status`.
    pub peer_type: PeerType,
    /// Always put our own address as next hop (always so for eBGP).
    pub next_hop_self: bool,
    /// Most prefixes the peer may announce; more resets the session with
    /// Cease 6/1 "Maximum Number of Prefixes Reached" (RFC 4486).
    pub max_prefix: Option<u32>,
    /// Export rules: local routes a rule rejects are not announced to this
    /// peer (unmatched routes are).
    pub export: Vec<Rule>,
    /// Graceful restart (RFC 4724): the restart time we advertise, in
    /// seconds (default 120, as Calico's BIRD; at most 4095; 0: off). A peer
    /// that advertises it too keeps our routes that long when we crash, and
    /// we keep its routes when it does.
    pub restart_time: u16,
    /// How long a restarted peer's stale routes wait for its End-of-RIB
    /// (default 360 s).
    pub stale_time: Duration,
}

impl PeerConfig {
    /// A peer with the defaults: hold 90 s, keepalive 30 s, retry 5..120 s,
    /// graceful restart time 120 s.
    pub fn new(addr: Ipv4Addr, asn: u32, peer_type: PeerType) -> Self {
        PeerConfig {
            addr,
            asn,
            hold_time: 90,
            keepalive: 30,
            connect_retry: Duration::from_secs(5),
            connect_retry_max: Duration::from_secs(120),
            password: None,
            peer_type,
            next_hop_self: false,
            max_prefix: None,
            export: Vec::new(),
            restart_time: 120,
            stale_time: Duration::from_secs(360),
        }
    }
}

/// What the speaker reports to its consumer (the route programmer).
///
/// Route events carry one UPDATE's worth of prefixes so that a full table
/// arrives in a few hundred events, not one per prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeakerEvent {
    /// The session with `peer` reached Established.
    PeerUp {
        /// The peer.
        peer: Ipv4Addr,
    },
    /// The session with `peer` went down: drop every route learned from it.
    PeerDown {
        /// The peer.
        peer: Ipv4Addr,
    },
    /// The session with `peer` dropped but it restarts gracefully: keep its
    /// routes, marked stale, until [`SpeakerEvent::PurgeStale`] or
    /// [`SpeakerEvent::PeerDown`].
    PeerStale {
        /// The peer.
        peer: Ipv4Addr,
    },
    /// `peer` is back and re-sent its routes (or ran out of time): drop its
    /// routes still marked stale.
    PurgeStale {
        /// The peer.
        peer: Ipv4Addr,
    },
    /// `peer` announced `prefixes` via `next_hop`.
    RoutesLearned {
        /// The peer.
        peer: Ipv4Addr,
        /// Next hop of every prefix.
        next_hop: Ipv4Addr,
        /// The prefixes.
        prefixes: Vec<Ipv4Network>,
    },
    /// `peer` withdrew `prefixes`.
    RoutesWithdrawn {
        /// The peer.
        peer: Ipv4Addr,
        /// The prefixes.
        prefixes: Vec<Ipv4Network>,
    },
}

/// One row of `tabbyctl node status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// PEER ADDRESS.
    pub addr: Ipv4Addr,
    /// PEER TYPE.
    pub peer_type: PeerType,
    /// STATE.
    pub state: State,
    /// SINCE: when the state last changed.
    pub since: SystemTime,
    /// INFO: the last error, or the state.
    pub info: String,
}

/// Errors of the speaker's API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not create or bind the listening socket.
    #[error("listen on {addr}:{port}")]
    Listen {
        /// Address.
        addr: Ipv4Addr,
        /// Port.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Could not set the TCP MD5 key for a peer on the listening socket.
    #[error("set TCP MD5 key for peer {peer}")]
    Md5 {
        /// The peer.
        peer: Ipv4Addr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer is already configured.
    #[error("peer {0} already exists")]
    DuplicatePeer(Ipv4Addr),
    /// A hold time of 1 or 2 seconds (RFC 4271 §4.2).
    #[error("hold time {0} s is neither 0 nor at least 3")]
    HoldTime(u16),
    /// AS 0 (RFC 7607) or AS_TRANS (RFC 6793) as a peer's or our AS.
    #[error("AS {0} cannot be a BGP speaker's AS (0 is reserved, 23456 is AS_TRANS)")]
    ReservedAs(u32),
}

/// Result of the speaker's API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
