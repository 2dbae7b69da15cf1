//! A batch whose ACKs do not all come back returns after the ACK timeout
//! and names the routes left without an answer (root only: sending to
//! another netlink socket needs CAP_NET_ADMIN).

use std::time::{Duration, Instant};

use rtnetlink::packet_core::{ErrorMessage, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};
use tabby_dataplane::{Route, RouteBatch};

/// A user-space netlink peer that ACKs every request of the first datagram
/// but the `drop_nth`, then stops; returns its port id and how many it saw.
fn lossy_peer(drop_nth: usize) -> (u32, std::thread::JoinHandle<usize>) {
    let mut peer = Socket::new(NETLINK_ROUTE).unwrap();
    let addr = peer.bind_auto().unwrap();
    let handle = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(1 << 16);
        let (_, from) = peer.recv_from(&mut buf, 0).unwrap();
        let mut offset = 0;
        let mut out = Vec::new();
        let mut n = 0;
        while offset < buf.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..]).unwrap();
            offset += (msg.header.length as usize + 3) & !3;
            if n != drop_nth {
                let mut header = NetlinkHeader::default();
                header.sequence_number = msg.header.sequence_number;
                let mut ack = NetlinkMessage::<RouteNetlinkMessage>::new(
                    header,
                    NetlinkPayload::Error(ErrorMessage::default()),
                );
                ack.finalize();
                let start = out.len();
                out.resize(start + ack.buffer_len(), 0);
                ack.serialize(&mut out[start..]);
            }
            n += 1;
        }
        peer.send_to(&out, &from, 0).unwrap();
        n
    });
    (addr.port_number(), handle)
}

#[test]
fn a_lost_ack_fails_its_route_after_the_timeout_instead_of_blocking() {
    if !tabby_testkit::require_root(
        "a_lost_ack_fails_its_route_after_the_timeout_instead_of_blocking",
    ) {
        return;
    }
    let routes: Vec<Route> = (1..=20u8)
        .map(|i| Route::blackhole(format!("100.99.0.{i}/32").parse().unwrap()).with_protocol(201))
        .collect();
    let (port, peer) = lossy_peer(7);
    let mut batch = RouteBatch::open().unwrap();
    batch.set_ack_timeout(Duration::from_millis(300)).unwrap();
    batch.connect_to(port).unwrap();

    let started = Instant::now();
    let failed = batch.apply(&[], &routes);
    let took = started.elapsed();

    assert_eq!(peer.join().unwrap(), 20, "the peer saw every request");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, routes[7]);
    let source = std::error::Error::source(&failed[0].1).map(|s| s.to_string());
    let err = format!("{}: {}", failed[0].1, source.unwrap_or_default());
    assert!(err.contains("100.99.0.8"), "{err}");
    assert!(err.contains("timed out"), "{err}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "apply returned after {took:?}"
    );
}
