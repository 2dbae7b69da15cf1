//! A peer that floods the speaker while it reads nothing cannot grow the
//! speaker's memory without bound: the session's send queue is bounded and
//! the session is reset with Cease 6/8 (out of resources) when it is full.
//! Its own test binary, so that the process's memory is this test's alone.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::BytesMut;
use ipnetwork::Ipv4Network;
use tabby_bgp::codec::{decode_from, encode};
use tabby_bgp::message::{Capability, Message, Open, RouteRefresh};
use tabby_bgp::{PeerConfig, PeerType, Speaker, SpeakerConfig, SpeakerEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SPEAKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// ROUTE-REFRESH requests the peer sends; each asks for the whole table
/// (about 100 KB of UPDATEs), 1 GB in all if they were all queued.
const REQUESTS: usize = 10_000;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

async fn recv(stream: &mut TcpStream, buf: &mut BytesMut) -> Message {
    loop {
        if let Some(msg) = decode_from(buf, true).unwrap() {
            return msg;
        }
        assert!(stream.read_buf(buf).await.unwrap() > 0, "closed early");
    }
}

fn bytes(msg: &Message) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(msg, true, &mut out).unwrap();
    out.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_asks_for_the_table_without_reading_is_reset_and_memory_stays_bounded() {
    let listener = TcpListener::bind((PEER, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (speaker, mut events) = Speaker::start(SpeakerConfig {
        router_id: SPEAKER,
        asn: 64512,
        listen_addr: SPEAKER,
        listen_port: port,
    })
    .await
    .unwrap();
    // 20,000 local routes: ~25 UPDATEs of 4 KB for each table dump.
    let routes = (0..20_000u32)
        .map(|i| {
            (
                Ipv4Network::new(Ipv4Addr::from(0x0a80_0000 + i), 32).unwrap(),
                None,
            )
        })
        .collect();
    speaker.announce_many(routes);
    let mut peer = PeerConfig::new(PEER, 64512, PeerType::Global);
    peer.connect_retry = Duration::from_secs(60);
    speaker.add_peer(peer).unwrap();

    let (mut stream, _) = listener.accept().await.unwrap();
    let mut buf = BytesMut::new();
    assert!(matches!(
        recv(&mut stream, &mut buf).await,
        Message::Open(_)
    ));
    let open = Message::Open(Open {
        asn: 64512,
        hold_time: 90,
        router_id: PEER,
        capabilities: vec![Capability::FourOctetAs(64512), Capability::RouteRefresh],
    });
    let mut hello = bytes(&open);
    hello.extend(bytes(&Message::Keepalive));
    stream.write_all(&hello).await.unwrap();
    assert_eq!(
        events.recv().await,
        Some(SpeakerEvent::PeerUp { peer: PEER })
    );

    // From now on the peer reads nothing and asks for the table, again and again.
    let before = rss_mib();
    let request = bytes(&Message::RouteRefresh(RouteRefresh { afi: 1, safi: 1 }));
    let flood: Vec<u8> = request.repeat(REQUESTS);
    let writer = tokio::spawn(async move {
        // The speaker closes the session midway: a failed write is expected.
        let _ = stream.write_all(&flood).await;
        stream
    });
    let down = tokio::time::timeout(Duration::from_secs(30), events.recv()).await;
    assert_eq!(
        down.expect("the session is reset"),
        Some(SpeakerEvent::PeerDown { peer: PEER })
    );
    let grown = rss_mib() - before;
    // The status follows the event.
    tabby_testkit::poll_until("the reset in the status", Duration::from_secs(5), || {
        speaker.status()[0].info.contains("send queue full")
    })
    .await;
    let status = speaker.status();
    assert!(
        grown < 64.0,
        "the speaker grew by {grown:.1} MiB for {REQUESTS} unread table dumps"
    );
    eprintln!(
        "RSS grew by {grown:.1} MiB; session reset: {}",
        status[0].info
    );
    drop(writer);
}
