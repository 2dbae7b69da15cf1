//! The BGP speaker: RFC 4271 sessions with 4-octet AS (RFC 6793) and route
//! refresh (RFC 2918), IPv4 unicast, iBGP and eBGP.
//!
//! - [`message`]: Tabby's own small message types.
//! - [`codec`]: bytes to and from [`Message`] over the `netgauze-bgp-pkt`
//!   crate, with the RFC 4271 §6 NOTIFICATION for every malformed input.
//! - [`fsm`]: the per-peer state machine, pure (events in, actions out).
//! - [`adj_out`]: the UPDATEs sent to a peer, packed to 4096 octets.
//! - [`policy`]: prefix filters (ordered accept/reject rules by CIDR).
//! - [`rib`]: a Loc-RIB for the speaker's consumer: best paths, graceful-restart stale marks.
//! - `session`: one tokio task per peer running the FSM over TCP.
//! - [`Speaker`]: the handle the agent drives (peers, routes, status) and
//!   the listener on TCP 179.
//!
//! ```text
//!             announce/withdraw/add_peer/remove_peer        status()
//!  agent ──► Speaker ──PeerCommand──► peer task (FSM) ──► StatusTable ──► agent
//!              ▲ listener: Inbound ──┘   │    ▲
//!              │                         │    └── reader/connect tasks
//!  agent ◄── mpsc::Receiver<SpeakerEvent> ┘──► writer task ──► TCP
//! ```

pub mod adj_out;
pub mod codec;
mod config;
pub mod fsm;
mod md5;
pub mod message;
pub mod policy;
pub mod rib;
mod session;
mod speaker;

pub use config::{
    Error, PeerConfig, PeerStatus, PeerType, Result, SpeakerConfig, SpeakerEvent, BGP_PORT,
};
pub use fsm::State;
pub use message::{Message, AS_TRANS};

/// Whether `asn` may be a speaker's own AS: not 0 (RFC 7607) and not
/// AS_TRANS (RFC 6793 §9).
pub fn is_valid_asn(asn: u32) -> bool {
    asn != 0 && asn != u32::from(AS_TRANS)
}
pub use speaker::Speaker;
