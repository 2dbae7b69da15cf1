//! Interop: Tabby's speaker against BIRD 2 and GoBGP, iBGP and eBGP, each
//! pair in two fresh network namespaces joined by a veth (root only).
//!
//! The speaker runs on a thread that entered the Tabby namespace before
//! creating its runtime, so every socket it opens lives there; the peer
//! daemons run under `ip netns exec`. Everything is polled with deadlines
//! and torn down by a guard, also when a test panics.

use std::time::Duration;

use ipnetwork::Ipv4Network;
use tabby_bgp::{PeerConfig, PeerType, Speaker, SpeakerConfig, SpeakerEvent, State};
use tabby_testkit::bgp::*;
use tabby_testkit::{poll_until as poll, wait_for_message};
use tokio::time::Instant;

/// Waits up to 40 s for a speaker event `want` accepts.
async fn wait_event(
    events: &mut tokio::sync::mpsc::Receiver<SpeakerEvent>,
    what: &str,
    want: impl FnMut(&SpeakerEvent) -> bool,
) {
    wait_for_message(events, what, Duration::from_secs(40), want).await;
}

fn interop(
    daemon: fn(&mut Lab, u32, Option<&str>) -> Peer,
    peer_asn: u32,
    password: Option<&'static str>,
) {
    let Some(mut lab) = Lab::new() else { return };
    let peer = daemon(&mut lab, peer_asn, password);
    let tabby_prefix: Ipv4Network = TABBY_PREFIX.parse().unwrap();
    let peer_prefix: Ipv4Network = PEER_PREFIX.parse().unwrap();
    let ns = lab.tabby_ns.clone();
    in_netns(&ns, move || async move {
        let lab = &mut lab;
        let (speaker, mut events) = Speaker::start(SpeakerConfig {
            router_id: TABBY_ADDR,
            asn: TABBY_ASN,
            listen_addr: TABBY_ADDR,
            listen_port: 179,
        })
        .await
        .unwrap();
        let mut config = PeerConfig::new(PEER_ADDR, peer_asn, PeerType::Global);
        (config.hold_time, config.keepalive, config.connect_retry) = (9, 3, Duration::from_secs(1));
        config.password = password.map(str::to_string);
        speaker.add_peer(config).unwrap();
        speaker.announce(tabby_prefix, None);

        wait_event(&mut events, "PeerUp", |e| {
            matches!(e, SpeakerEvent::PeerUp { .. })
        })
        .await;
        assert_eq!(speaker.status()[0].state, State::Established);
        peer.announce(lab);
        wait_event(&mut events, "the peer's route", |e| {
            matches!(e, SpeakerEvent::RoutesLearned { next_hop, prefixes, .. }
                if *next_hop == PEER_ADDR && prefixes.contains(&peer_prefix))
        })
        .await;
        poll("Tabby's route at the peer", Duration::from_secs(30), || {
            peer.has_tabby_route(lab)
        })
        .await;

        speaker.withdraw(tabby_prefix);
        poll(
            "Tabby's withdraw at the peer",
            Duration::from_secs(30),
            || !peer.has_tabby_route(lab),
        )
        .await;
        peer.withdraw(lab);
        wait_event(&mut events, "the peer's withdraw", |e| {
            matches!(e, SpeakerEvent::RoutesWithdrawn { prefixes, .. } if prefixes.contains(&peer_prefix))
        })
        .await;

        // A peer that goes silent (frozen, its TCP connection still open) is
        // dropped when the hold time runs out.
        let frozen = Instant::now();
        lab.signal_daemon("STOP");
        wait_event(&mut events, "PeerDown", |e| {
            matches!(e, SpeakerEvent::PeerDown { .. })
        })
        .await;
        let after = frozen.elapsed();
        assert!(
            after >= Duration::from_secs(5) && after <= Duration::from_secs(12),
            "PeerDown after {after:?}"
        );
        assert_eq!(speaker.status()[0].info, "hold timer expired");

        // Thawed, it reconnects; killed, its kernel closes the connection and
        // the session drops at once.
        lab.signal_daemon("CONT");
        wait_event(&mut events, "PeerUp again", |e| {
            matches!(e, SpeakerEvent::PeerUp { .. })
        })
        .await;
        let killed = Instant::now();
        lab.kill_daemon();
        wait_event(&mut events, "PeerDown", |e| {
            matches!(e, SpeakerEvent::PeerDown { .. })
        })
        .await;
        assert!(
            killed.elapsed() <= Duration::from_secs(12),
            "PeerDown after {:?}",
            killed.elapsed()
        );
    });
}

#[test]
fn bird_ibgp() {
    interop(Lab::bird, TABBY_ASN, None);
}

#[test]
fn bird_ebgp() {
    interop(Lab::bird, 65001, None);
}

#[test]
fn gobgp_ibgp() {
    interop(Lab::gobgp, TABBY_ASN, None);
}

#[test]
fn gobgp_ebgp() {
    interop(Lab::gobgp, 65001, None);
}

#[test]
fn bird_ebgp_with_tcp_md5_password() {
    interop(Lab::bird, 65001, Some("tabby-secret"));
}

#[test]
fn gobgp_ibgp_with_tcp_md5_password() {
    interop(Lab::gobgp, TABBY_ASN, Some("tabby-secret"));
}
