//! The speaker against a scripted peer on loopback, with tokio's clock
//! paused: timers fire at exact virtual times and no test sleeps.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::BytesMut;
use tabby_bgp::codec::{decode_from, encode};
use tabby_bgp::message::{
    Capability, GrFamily, GracefulRestart, Message, Notification, Open, Origin, PathAttributes,
    RouteRefresh, Update,
};
use tabby_bgp::{PeerConfig, PeerType, Speaker, SpeakerConfig, SpeakerEvent, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

const SPEAKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The next hop the peer announces: a loopback one is martian (RFC 4271 §6.3).
const PEER_NH: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// A peer played by the test, one message at a time.
struct FakePeer {
    stream: TcpStream,
    buf: BytesMut,
}

impl FakePeer {
    async fn send(&mut self, msg: Message) {
        let mut out = BytesMut::new();
        encode(&msg, true, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(msg) = decode_from(&mut self.buf, true).unwrap() {
                return Some(msg);
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// Answers the speaker's OPEN (ours with `hold_time` and the `extra`
    /// capabilities) and KEEPALIVE; returns the speaker's OPEN.
    async fn establish(&mut self, hold_time: u16, extra: Vec<Capability>) -> Open {
        let Some(Message::Open(theirs)) = self.recv().await else {
            panic!("no OPEN")
        };
        assert!(theirs.asn == 64512 && theirs.four_octet_as());
        let mut capabilities = vec![Capability::FourOctetAs(64512), Capability::RouteRefresh];
        capabilities.extend(extra);
        self.send(Message::Open(Open {
            asn: 64512,
            hold_time,
            router_id: PEER,
            capabilities,
        }))
        .await;
        self.send(Message::Keepalive).await;
        assert_eq!(self.recv().await, Some(Message::Keepalive));
        theirs
    }
}

/// Starts a speaker on 127.0.0.1 peering with a listener on 127.0.0.2.
async fn setup(hold_time: u16) -> (Speaker, mpsc::Receiver<SpeakerEvent>, TcpListener) {
    setup_with(hold_time, |_| {}).await
}

/// [`setup`] with the peer's configuration changed by `change`.
async fn setup_with(
    hold_time: u16,
    change: impl FnOnce(&mut PeerConfig),
) -> (Speaker, mpsc::Receiver<SpeakerEvent>, TcpListener) {
    let listener = TcpListener::bind((PEER, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (speaker, events) = Speaker::start(SpeakerConfig {
        router_id: SPEAKER,
        asn: 64512,
        listen_addr: SPEAKER,
        listen_port: port,
    })
    .await
    .unwrap();
    let mut peer = PeerConfig::new(PEER, 64512, PeerType::NodeMesh);
    peer.hold_time = hold_time;
    peer.keepalive = hold_time / 3;
    peer.connect_retry = Duration::from_secs(1);
    change(&mut peer);
    speaker.add_peer(peer).unwrap();
    (speaker, events, listener)
}

async fn accept(listener: &TcpListener) -> FakePeer {
    let (stream, _) = listener.accept().await.unwrap();
    FakePeer {
        stream,
        buf: BytesMut::new(),
    }
}

/// Accepts the speaker's connection, establishes the session (our OPEN
/// with `hold_time` and the `extra` capabilities) and waits for PeerUp.
async fn peer_up(
    listener: &TcpListener,
    events: &mut mpsc::Receiver<SpeakerEvent>,
    hold_time: u16,
    extra: Vec<Capability>,
) -> FakePeer {
    let mut peer = accept(listener).await;
    peer.establish(hold_time, extra).await;
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerUp { peer: PEER })
    );
    peer
}

#[tokio::test(start_paused = true)]
async fn keepalives_go_out_every_third_of_hold_and_hold_expiry_sends_4_0() {
    let (speaker, mut events, listener) = setup(9).await;
    let mut peer = peer_up(&listener, &mut events, 9, vec![]).await;
    assert_eq!(speaker.status()[0].state, State::Established);
    let up = Instant::now();
    assert_eq!(peer.recv().await, Some(Message::Keepalive));
    assert_eq!(up.elapsed(), Duration::from_secs(3));
    assert_eq!(peer.recv().await, Some(Message::Keepalive));
    assert_eq!(up.elapsed(), Duration::from_secs(6));
    // The peer stays silent: at 9 s the hold timer expires.
    let mut last = None;
    while let Some(msg) = peer.recv().await {
        last = Some(msg);
    }
    assert_eq!(last, Some(Message::Notification(Notification::new(4, 0))));
    assert_eq!(up.elapsed(), Duration::from_secs(9));
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerDown { peer: PEER })
    );
    assert_eq!(speaker.status()[0].info, "hold timer expired");
}

#[tokio::test(start_paused = true)]
async fn connect_retry_back_off_doubles_between_attempts() {
    let (_speaker, _events, listener) = setup(9).await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let peer = accept(&listener).await;
        times.push(Instant::now());
        drop(peer);
    }
    let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    assert_eq!(gaps, vec![1, 2, 4, 8]);
}

#[tokio::test(start_paused = true)]
async fn malformed_update_resets_the_session_and_it_comes_back() {
    let (_speaker, mut events, listener) = setup(9).await;
    let mut peer = peer_up(&listener, &mut events, 9, vec![]).await;
    // An UPDATE whose withdrawn-routes length runs past the message.
    let mut bad = vec![0xff; 16];
    bad.extend_from_slice(&[0, 23, 2, 0, 200, 0, 0]);
    peer.stream.write_all(&bad).await.unwrap();
    let mut last = None;
    while let Some(msg) = peer.recv().await {
        last = Some(msg);
    }
    assert!(
        matches!(
            last,
            Some(Message::Notification(Notification {
                code: 3,
                subcode: 1,
                ..
            }))
        ),
        "{last:?}"
    );
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerDown { peer: PEER })
    );
    let _peer = peer_up(&listener, &mut events, 9, vec![]).await;
}

#[tokio::test(start_paused = true)]
async fn routes_flow_both_ways_and_route_refresh_re_advertises() {
    let (speaker, mut events, listener) = setup(90).await;
    speaker.announce("10.244.1.0/26".parse().unwrap(), None);
    let mut peer = peer_up(&listener, &mut events, 90, vec![]).await;
    let Some(Message::Update(u)) = peer.recv().await else {
        panic!()
    };
    assert_eq!(u.nlri, vec!["10.244.1.0/26".parse().unwrap()]);
    let attrs = u.attributes.unwrap();
    assert_eq!(
        (attrs.next_hop, attrs.local_pref, attrs.as_path.len()),
        (SPEAKER, Some(100), 0)
    );

    speaker.withdraw("10.244.1.0/26".parse().unwrap());
    let Some(Message::Update(u)) = peer.recv().await else {
        panic!()
    };
    assert_eq!(u.withdrawn, vec!["10.244.1.0/26".parse().unwrap()]);

    speaker.announce("10.244.2.0/26".parse().unwrap(), None);
    assert!(matches!(peer.recv().await, Some(Message::Update(_))));
    peer.send(Message::RouteRefresh(RouteRefresh { afi: 1, safi: 1 }))
        .await;
    let Some(Message::Update(u)) = peer.recv().await else {
        panic!()
    };
    assert_eq!(u.nlri, vec!["10.244.2.0/26".parse().unwrap()]);

    let learned: Vec<_> = (0..2000u32)
        .map(|i| {
            format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
                .parse()
                .unwrap()
        })
        .collect();
    for chunk in learned.chunks(500) {
        peer.send(Message::Update(Update {
            withdrawn: vec![],
            attributes: Some(PathAttributes {
                origin: Origin::Igp,
                as_path: vec![],
                next_hop: PEER_NH,
                local_pref: Some(100),
                med: None,
            }),
            nlri: chunk.to_vec(),
        }))
        .await;
    }
    let mut got = Vec::new();
    while got.len() < learned.len() {
        match events.recv().await {
            Some(SpeakerEvent::RoutesLearned {
                peer: p,
                next_hop,
                prefixes,
            }) => {
                assert_eq!((p, next_hop), (PEER, PEER_NH));
                got.extend(prefixes);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, learned);
    peer.send(Message::Update(Update {
        withdrawn: learned[..3].to_vec(),
        attributes: None,
        nlri: vec![],
    }))
    .await;
    let Some(SpeakerEvent::RoutesWithdrawn { prefixes, .. }) = events.recv().await else {
        panic!()
    };
    assert_eq!(prefixes, learned[..3].to_vec());
}

#[tokio::test(start_paused = true)]
async fn removing_a_peer_sends_cease() {
    let (speaker, mut events, listener) = setup(90).await;
    let mut peer = peer_up(&listener, &mut events, 90, vec![]).await;
    assert!(speaker.remove_peer(PEER).await);
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerDown { peer: PEER })
    );
    assert_eq!(
        peer.recv().await,
        Some(Message::Notification(Notification::new(6, 2)))
    );
    assert!(speaker.status().is_empty());
}

/// An UPDATE body announcing `nlri` with `attrs` (raw attribute bytes).
fn raw_update(attrs: &[&[u8]], nlri: &[u8]) -> Vec<u8> {
    let attrs = attrs.concat();
    let mut body = vec![0, 0];
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(&attrs);
    body.extend_from_slice(nlri);
    let mut frame = vec![0xff; 16];
    frame.extend_from_slice(&(19 + body.len() as u16).to_be_bytes());
    frame.push(2);
    frame.extend_from_slice(&body);
    frame
}

const ORIGIN: &[u8] = &[0x40, 1, 1, 0];
const AS_PATH: &[u8] = &[0x40, 2, 0];
/// 10.1.0.0/24 and 10.2.0.0/24.
const TWO_PREFIXES: &[u8] = &[24, 10, 1, 0, 24, 10, 2, 0];

fn update(nlri: &[&str]) -> Message {
    Message::Update(Update {
        withdrawn: vec![],
        attributes: Some(PathAttributes {
            origin: Origin::Igp,
            as_path: vec![],
            next_hop: PEER_NH,
            local_pref: Some(100),
            med: None,
        }),
        nlri: nlri.iter().map(|p| p.parse().unwrap()).collect(),
    })
}

#[tokio::test(start_paused = true)]
async fn updates_with_a_bad_next_hop_or_origin_withdraw_their_routes_and_keep_the_session() {
    let (speaker, mut events, listener) = setup(9).await;
    let mut peer = peer_up(&listener, &mut events, 9, vec![]).await;
    peer.send(update(&["10.1.0.0/24"])).await;
    assert!(matches!(
        events.recv().await,
        Some(SpeakerEvent::RoutesLearned { .. })
    ));
    let both: Vec<ipnetwork::Ipv4Network> = vec![
        "10.1.0.0/24".parse().unwrap(),
        "10.2.0.0/24".parse().unwrap(),
    ];
    let bad = [
        raw_update(
            &[ORIGIN, AS_PATH, &[0x40, 3, 4, 224, 0, 0, 1]],
            TWO_PREFIXES,
        ),
        raw_update(&[ORIGIN, AS_PATH, &[0x40, 3, 4, 0, 0, 0, 0]], TWO_PREFIXES),
        raw_update(
            &[&[0x40, 1, 2, 0, 0], AS_PATH, &[0x40, 3, 4, 127, 0, 0, 2]],
            TWO_PREFIXES,
        ),
        raw_update(&[ORIGIN, AS_PATH, &[0x40, 3, 3, 127, 0, 0]], TWO_PREFIXES),
        raw_update(
            &[ORIGIN, AS_PATH, &[0x40, 3, 4, 127, 0, 0, 1]],
            TWO_PREFIXES,
        ),
    ];
    for frame in &bad {
        peer.stream.write_all(frame).await.unwrap();
        assert_eq!(
            events.recv().await,
            Some(SpeakerEvent::RoutesWithdrawn {
                peer: PEER,
                prefixes: both.clone()
            })
        );
    }
    // No NOTIFICATION: the session lives on and keepalives keep coming.
    let now = Instant::now();
    assert_eq!(peer.recv().await, Some(Message::Keepalive));
    assert!(now.elapsed() <= Duration::from_secs(3));
    assert_eq!(speaker.status()[0].state, State::Established);
}

#[tokio::test(start_paused = true)]
async fn more_prefixes_than_max_prefix_reset_the_session_with_cease_6_1() {
    let (speaker, mut events, listener) = setup_with(9, |p| p.max_prefix = Some(2)).await;
    let mut peer = peer_up(&listener, &mut events, 9, vec![]).await;
    peer.send(update(&["10.1.0.0/24", "10.1.1.0/24"])).await;
    assert!(matches!(
        events.recv().await,
        Some(SpeakerEvent::RoutesLearned { .. })
    ));
    peer.send(update(&["10.1.2.0/24"])).await;
    let mut last = None;
    while let Some(msg) = peer.recv().await {
        last = Some(msg);
    }
    assert_eq!(
        last,
        Some(Message::Notification(Notification::with_data(
            6,
            1,
            [0, 1, 1, 0, 0, 0, 2]
        )))
    );
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerDown { peer: PEER })
    );
    assert_eq!(
        speaker.status()[0].info,
        "sent 6/1 (maximum number of prefixes reached)"
    );
}

#[tokio::test(start_paused = true)]
async fn export_rules_keep_local_routes_from_a_peer() {
    use tabby_bgp::policy::{Action, MatchOperator, PrefixMatch, Rule};
    let reject = Rule {
        action: Action::Reject,
        prefix: Some(PrefixMatch {
            cidr: "10.244.2.0/24".parse().unwrap(),
            operator: MatchOperator::In,
            min_len: None,
            max_len: None,
        }),
    };
    let (speaker, mut events, listener) = setup_with(90, |p| p.export = vec![reject]).await;
    speaker.announce("10.244.1.0/26".parse().unwrap(), None);
    speaker.announce("10.244.2.0/26".parse().unwrap(), None);
    let mut peer = peer_up(&listener, &mut events, 90, vec![]).await;
    let Some(Message::Update(u)) = peer.recv().await else {
        panic!()
    };
    assert_eq!(u.nlri, vec!["10.244.1.0/26".parse().unwrap()]);
    // A filtered route is neither announced nor withdrawn later.
    speaker.announce("10.244.2.64/26".parse().unwrap(), None);
    speaker.withdraw("10.244.2.0/26".parse().unwrap());
    speaker.announce("10.244.3.0/26".parse().unwrap(), None);
    let Some(Message::Update(u)) = peer.recv().await else {
        panic!()
    };
    assert_eq!(
        (u.nlri, u.withdrawn),
        (vec!["10.244.3.0/26".parse().unwrap()], vec![])
    );
}

#[tokio::test]
async fn as_0_and_as_trans_are_refused() {
    let (speaker, _events, _listener) = setup(9).await;
    for asn in [0, 23456] {
        let err = speaker
            .add_peer(PeerConfig::new(
                Ipv4Addr::new(127, 0, 0, 9),
                asn,
                PeerType::Global,
            ))
            .unwrap_err();
        assert!(err.to_string().contains(&asn.to_string()), "{err}");
    }
    let refused = Speaker::start(SpeakerConfig {
        router_id: SPEAKER,
        asn: 0,
        listen_addr: SPEAKER,
        listen_port: 0,
    })
    .await;
    assert!(refused.is_err());
}

/// A graceful restart capability: 120 s, IPv4 unicast with F = `forwarding`.
fn graceful(forwarding: bool) -> Capability {
    Capability::GracefulRestart(GracefulRestart {
        restarted: false,
        restart_time: 120,
        families: vec![GrFamily {
            afi: 1,
            safi: 1,
            forwarding,
        }],
    })
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_restarts_gracefully_keeps_its_routes_until_its_end_of_rib() {
    let (speaker, mut events, listener) = setup(90).await;
    speaker.announce("10.244.1.0/26".parse().unwrap(), None);
    let mut peer = accept(&listener).await;
    let open = peer.establish(90, vec![graceful(true)]).await;
    let gr = open
        .graceful_restart()
        .expect("the speaker restarts gracefully too");
    assert_eq!(gr.restart_time, 120);
    assert!(gr.families[0].forwarding);
    assert!(matches!(peer.recv().await, Some(Message::Update(u)) if !u.nlri.is_empty()));
    assert_eq!(
        peer.recv().await,
        Some(Message::Update(Update::default())),
        "End-of-RIB after the initial routes"
    );
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerUp { peer: PEER })
    );
    peer.send(update(&["10.250.1.0/24"])).await;
    peer.send(update(&["10.250.2.0/24"])).await;
    for _ in 0..2 {
        assert!(matches!(
            events.recv().await,
            Some(SpeakerEvent::RoutesLearned { .. })
        ));
    }

    // The peer's process dies: the connection closes without a NOTIFICATION.
    drop(peer);
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerStale { peer: PEER })
    );
    assert!(
        speaker.status()[0].info.contains("graceful restart"),
        "{:?}",
        speaker.status()
    );
    // It is back, re-sends one of its two routes, then End-of-RIB.
    let mut peer = peer_up(&listener, &mut events, 90, vec![graceful(true)]).await;
    peer.send(update(&["10.250.1.0/24"])).await;
    assert!(matches!(
        events.recv().await,
        Some(SpeakerEvent::RoutesLearned { .. })
    ));
    peer.send(Message::Update(Update::default())).await;
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PurgeStale { peer: PEER })
    );
}
