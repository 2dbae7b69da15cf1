//! The agent's [`BgpControl`] over Tabby's BGP [`Speaker`], and the
//! translation of its events and status rows.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use tabby_errors::chain;
use tokio::sync::mpsc;
use tracing::warn;

use crate::agent::{BgpControl, BgpEvent};
use crate::config::AgentConfig;
use crate::desired::PeerSpec;
use crate::status::PeerRow;
use tabby_bgp::{PeerConfig, PeerStatus, Speaker, SpeakerEvent, State};

/// A started speaker with the agent's session settings.
pub struct SpeakerControl {
    speaker: Speaker,
    hold_time: u16,
    keepalive: u16,
    connect_retry: Duration,
    restart_time: u16,
}

impl SpeakerControl {
    /// Wraps `speaker`, using `cfg`'s timers for every peer.
    pub fn new(speaker: Speaker, cfg: &AgentConfig) -> Self {
        Self {
            speaker,
            hold_time: cfg.hold_time,
            keepalive: cfg.keepalive().as_secs() as u16,
            connect_retry: Duration::from_secs(u64::from(cfg.connect_retry.max(1))),
            restart_time: cfg.graceful_restart_time,
        }
    }

    /// Closes every session (NOTIFICATION Cease).
    pub async fn shutdown(self) {
        self.speaker.shutdown().await;
    }
}

impl BgpControl for SpeakerControl {
    fn add_peer(&mut self, peer: &PeerSpec) {
        let IpAddr::V4(addr) = peer.addr else {
            warn!(peer = %peer.addr, "IPv6 BGP peers are not supported yet");
            return;
        };
        let mut pc = PeerConfig::new(addr, peer.asn, peer.peer_type);
        pc.hold_time = self.hold_time;
        pc.keepalive = self.keepalive;
        pc.connect_retry = self.connect_retry;
        pc.password = peer.password.clone();
        pc.export = peer.export.clone();
        pc.max_prefix = peer.max_prefix;
        pc.restart_time = self.restart_time;
        if let Err(e) = self.speaker.add_peer(pc) {
            warn!(peer = %addr, error = %chain(&e), "adding BGP peer failed");
        }
    }

    async fn remove_peer(&mut self, addr: IpAddr) {
        if let IpAddr::V4(a) = addr {
            self.speaker.remove_peer(a).await;
        }
    }

    fn announce(&mut self, prefix: IpNetwork) {
        match prefix {
            IpNetwork::V4(p) => self.speaker.announce(p, None),
            IpNetwork::V6(p) => warn!(prefix = %p, "IPv6 prefixes are not advertised yet"),
        }
    }

    fn withdraw(&mut self, prefix: IpNetwork) {
        if let IpNetwork::V4(p) = prefix {
            self.speaker.withdraw(p);
        }
    }

    fn status(&self) -> Vec<PeerRow> {
        let mut rows: Vec<PeerRow> = self.speaker.status().iter().map(row).collect();
        rows.sort_by(|a, b| a.peer_address.cmp(&b.peer_address));
        rows
    }
}

/// One `node status` row, in BIRD's words as calicoctl prints them:
/// STATE `up` once Established, else `start`; INFO the FSM state and the last error.
pub fn row(s: &PeerStatus) -> PeerRow {
    let established = s.state == State::Established;
    let info = if established || s.info.is_empty() || s.info == format!("{:?}", s.state) {
        format!("{:?}", s.state)
    } else {
        format!("{:?} {}", s.state, s.info)
    };
    PeerRow {
        peer_address: s.addr.to_string(),
        peer_type: s.peer_type.to_string(),
        state: if established { "up" } else { "start" }.to_string(),
        since: since(s.since, SystemTime::now()),
        info,
    }
}

/// BIRD's SINCE column: the UTC time of day for today, else the date.
pub fn since(t: SystemTime, now: SystemTime) -> String {
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let (ts, ns) = (secs(t), secs(now));
    if ns / 86_400 == ts / 86_400 {
        let d = ts % 86_400;
        format!("{:02}:{:02}:{:02}", d / 3600, d % 3600 / 60, d % 60)
    } else {
        let (y, m, d) = civil_from_days((ts / 86_400) as i64);
        format!("{y:04}-{m:02}-{d:02}")
    }
}

/// Days since 1970-01-01 to a (year, month, day) date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Forwards the speaker's events to the agent in the agent's terms.
pub async fn forward_events(mut from: mpsc::Receiver<SpeakerEvent>, to: mpsc::Sender<BgpEvent>) {
    let v4 = |a: Ipv4Addr| IpAddr::V4(a);
    while let Some(ev) = from.recv().await {
        let ev = match ev {
            SpeakerEvent::PeerUp { .. } => continue,
            SpeakerEvent::PeerDown { peer } => BgpEvent::PeerDown { peer: v4(peer) },
            SpeakerEvent::PeerStale { peer } => BgpEvent::Stale { peer: v4(peer) },
            SpeakerEvent::PurgeStale { peer } => BgpEvent::PurgeStale { peer: v4(peer) },
            SpeakerEvent::RoutesLearned {
                peer,
                next_hop,
                prefixes,
            } => BgpEvent::Learned {
                peer: v4(peer),
                next_hop: v4(next_hop),
                prefixes: prefixes.into_iter().map(IpNetwork::V4).collect(),
            },
            SpeakerEvent::RoutesWithdrawn { peer, prefixes } => BgpEvent::Withdrawn {
                peer: v4(peer),
                prefixes: prefixes.into_iter().map(IpNetwork::V4).collect(),
            },
        };
        if to.send(ev).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_the_time_of_day_today_and_the_date_before() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_456_802); // 2026-11-23 18:00:02 UTC
        assert_eq!(since(t, t + Duration::from_secs(60)), "18:00:02");
        assert_eq!(since(t, t + Duration::from_secs(86_400)), "2026-11-23");
    }

    #[test]
    fn an_established_session_is_up_and_others_say_why_not() {
        let mut s = PeerStatus {
            addr: "10.98.0.2".parse().unwrap(),
            peer_type: tabby_bgp::PeerType::NodeMesh,
            state: State::Established,
            since: SystemTime::now(),
            info: String::new(),
        };
        let r = row(&s);
        assert_eq!(
            (r.state.as_str(), r.info.as_str(), r.peer_type.as_str()),
            ("up", "Established", "node-to-node mesh")
        );
        s.state = State::Active;
        s.info = "Connection refused".into();
        let r = row(&s);
        assert_eq!(
            (r.state.as_str(), r.info.as_str()),
            ("start", "Active Connection refused")
        );
    }
}
