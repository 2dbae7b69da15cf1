//! The BGP speaker: RFC 4271 sessions with 4-octet AS (RFC 6793) and route
//! refresh (RFC 2918), IPv4 unicast, iBGP and eBGP.
//!
//! - [`message`]: Tabby's own small message types.
//! - [`codec`]: bytes to and from [`Message`] over the `netgauze-bgp-pkt`
//!   crate, with the RFC 4271 §6 NOTIFICATION for every malformed input.
//! - [`fsm`]: the per-peer state machine, pure (events in, actions out).
//! - [`adj_out`]: the UPDATEs sent to a peer, packed to 4096 octets.
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
mod session;
mod speaker;

pub use config::{
    Error, PeerConfig, PeerStatus, PeerType, Result, SpeakerConfig, SpeakerEvent, BGP_PORT,
};
pub use fsm::State;
pub use message::Message;
pub use speaker::Speaker;
