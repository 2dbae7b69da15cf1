//! Byte-vector tests for every message type, every header error, and
//! decode(encode(x)) == x properties.

use super::*;
use crate::message::{Capability, Notification, Origin, PathAttributes, Update};
use proptest::prelude::*;
use std::net::Ipv4Addr;

const MARKER: [u8; 16] = [0xff; 16];

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = MARKER.to_vec();
    v.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    v.push(kind);
    v.extend_from_slice(body);
    v
}

fn bytes_of(msg: &Message, asn4: bool) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(msg, asn4, &mut buf).unwrap();
    buf.to_vec()
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn err(frame: &[u8]) -> (u8, u8) {
    let n = decode(frame, true).unwrap_err();
    (n.code, n.subcode)
}

fn open(asn: u32) -> Open {
    Open {
        asn,
        hold_time: 90,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities: vec![
            Capability::Multiprotocol { afi: 1, safi: 1 },
            Capability::RouteRefresh,
            Capability::FourOctetAs(asn),
        ],
    }
}

#[test]
fn keepalive_is_a_bare_header() {
    let expected = frame(4, &[]);
    assert_eq!(bytes_of(&Message::Keepalive, true), expected);
    assert_eq!(decode(&expected, true).unwrap(), Message::Keepalive);
}

#[test]
fn open_carries_capabilities_in_one_parameter() {
    let body = [
        4, 0xfc, 0x00, 0, 90, 10, 0, 0, 1, // version, AS 64512, hold 90, id
        16, 2, 14, // optional parameters: one capabilities parameter of 14
        1, 4, 0, 1, 0, 1, // multiprotocol IPv4 unicast
        2, 0, // route refresh
        65, 4, 0, 0, 0xfc, 0x00, // 4-octet AS 64512
    ];
    let expected = frame(1, &body);
    let msg = Message::Open(open(64512));
    assert_eq!(bytes_of(&msg, true), expected);
    assert_eq!(decode(&expected, true).unwrap(), msg);
}

#[test]
fn the_graceful_restart_capability_has_rfc_4724_bytes_and_round_trips() {
    let mut o = open(64512);
    o.capabilities = vec![Capability::GracefulRestart(
        crate::message::GracefulRestart {
            restarted: true,
            restart_time: 120,
            families: vec![crate::message::GrFamily {
                afi: 1,
                safi: 1,
                forwarding: true,
            }],
        },
    )];
    let body = [
        4, 0xfc, 0x00, 0, 90, 10, 0, 0, 1, // version, AS 64512, hold 90, id
        10, 2, 8, // optional parameters: one capabilities parameter of 8
        64, 6, // graceful restart, 6 octets
        0x80, 120, // R bit, restart time 120 s (12 bits)
        0, 1, 1, 0x80, // IPv4 unicast, F bit
    ];
    let expected = frame(1, &body);
    let msg = Message::Open(o);
    assert_eq!(bytes_of(&msg, true), expected);
    assert_eq!(decode(&expected, true).unwrap(), msg);
}

#[test]
fn open_with_a_four_octet_as_sends_as_trans() {
    let bytes = bytes_of(&Message::Open(open(4_200_000_000)), true);
    assert_eq!(&bytes[20..22], &AS_TRANS.to_be_bytes());
    let Message::Open(back) = decode(&bytes, true).unwrap() else {
        panic!()
    };
    assert_eq!(back.asn, 4_200_000_000);
}

#[test]
fn update_with_withdrawn_attributes_and_nlri() {
    let body = [
        0, 2, 8, 10, // withdrawn: 10.0.0.0/8
        0, 27, // attributes length
        0x40, 1, 1, 0, // ORIGIN IGP
        0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9, // AS_PATH sequence [65001]
        0x40, 3, 4, 10, 0, 0, 1, // NEXT_HOP
        0x40, 5, 4, 0, 0, 0, 100, // LOCAL_PREF 100
        26, 10, 244, 1, 0, // NLRI 10.244.1.0/26
    ];
    let expected = frame(2, &body);
    let msg = Message::Update(Update {
        withdrawn: vec![net("10.0.0.0/8")],
        attributes: Some(PathAttributes {
            origin: Origin::Igp,
            as_path: vec![65001],
            next_hop: Ipv4Addr::new(10, 0, 0, 1),
            local_pref: Some(100),
            med: None,
        }),
        nlri: vec![net("10.244.1.0/26")],
    });
    assert_eq!(bytes_of(&msg, true), expected);
    assert_eq!(decode(&expected, true).unwrap(), msg);
}

#[test]
fn end_of_rib_is_an_empty_update() {
    let expected = frame(2, &[0, 0, 0, 0]);
    let msg = Message::Update(Update::default());
    assert_eq!(bytes_of(&msg, true), expected);
    let Message::Update(u) = decode(&expected, true).unwrap() else {
        panic!()
    };
    assert!(u.is_end_of_rib());
}

#[test]
fn notification_keeps_unregistered_codes() {
    for (code, subcode) in [(6, 2), (4, 0), (6, 99), (42, 7)] {
        let expected = frame(3, &[code, subcode, 0xde, 0xad]);
        let msg = Message::Notification(Notification::with_data(code, subcode, [0xde, 0xad]));
        assert_eq!(bytes_of(&msg, true), expected);
        assert_eq!(decode(&expected, true).unwrap(), msg);
    }
}

#[test]
fn route_refresh_for_ipv4_unicast() {
    let expected = frame(5, &[0, 1, 0, 1]);
    let msg = Message::RouteRefresh(RouteRefresh { afi: 1, safi: 1 });
    assert_eq!(bytes_of(&msg, true), expected);
    assert_eq!(decode(&expected, true).unwrap(), msg);
}

#[test]
fn route_refresh_for_an_unknown_family_is_kept_to_be_ignored() {
    let msg = decode(&frame(5, &[0, 99, 0, 77]), true).unwrap();
    assert_eq!(
        msg,
        Message::RouteRefresh(RouteRefresh { afi: 99, safi: 77 })
    );
}

#[test]
fn header_errors_map_to_message_header_subcodes() {
    let mut bad_marker = frame(4, &[]);
    bad_marker[3] = 0;
    assert_eq!(err(&bad_marker), (1, 1));
    let mut short = frame(4, &[]);
    short[17] = 18;
    assert_eq!(err(&short), (1, 2));
    let mut long = frame(2, &[0, 0, 0, 0]);
    long[16..18].copy_from_slice(&4097u16.to_be_bytes());
    assert_eq!(err(&long), (1, 2));
    assert_eq!(err(&frame(9, &[])), (1, 3));
    assert_eq!(err(&frame(4, &[0])), (1, 2), "KEEPALIVE longer than 19");
    assert_eq!(err(&frame(1, &[4, 0, 1])), (1, 2), "OPEN shorter than 29");
    assert_eq!(err(&frame(2, &[0, 0])), (1, 2), "UPDATE shorter than 23");
    assert_eq!(err(&frame(3, &[6])), (1, 2), "NOTIFICATION shorter than 21");
    assert_eq!(err(&frame(5, &[0, 1, 0])), (1, 2), "ROUTE-REFRESH not 23");
    let n = decode(&long, true).unwrap_err();
    assert_eq!(n.data, 4097u16.to_be_bytes(), "data is the bad length");
}

#[test]
fn bad_message_type_carries_the_type() {
    assert_eq!(
        decode(&frame(9, &[]), true).unwrap_err(),
        Notification::with_data(1, 3, [9])
    );
}

#[test]
fn open_errors_map_to_open_subcodes() {
    let mut o = bytes_of(&Message::Open(open(64512)), true);
    o[19] = 3;
    assert_eq!(err(&o), (2, 1), "version 3");
    let mut o = bytes_of(&Message::Open(open(64512)), true);
    o[22..24].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(err(&o), (2, 6), "hold time 2");
}

// The malformed UPDATE table (RFC 4271 §6.3 with RFC 7606) is in
// `malformed_tests.rs`.

#[test]
fn update_with_too_long_withdrawn_length_is_a_malformed_attribute_list() {
    assert_eq!(err(&frame(2, &[0, 200, 0, 0])), (3, 1));
}

#[test]
fn two_octet_session_merges_as4_path() {
    let msg = Message::Update(Update {
        withdrawn: vec![],
        attributes: Some(PathAttributes {
            origin: Origin::Igp,
            as_path: vec![4_200_000_000, 65001],
            next_hop: Ipv4Addr::new(10, 0, 0, 1),
            local_pref: None,
            med: Some(5),
        }),
        nlri: vec![net("10.244.0.0/16")],
    });
    let bytes = bytes_of(&msg, false);
    // The 2-octet AS_PATH holds AS_TRANS in place of the large AS.
    assert!(bytes.windows(2).any(|w| w == AS_TRANS.to_be_bytes()));
    assert_eq!(decode(&bytes, false).unwrap(), msg);
}

#[test]
fn decode_from_waits_for_a_whole_message() {
    let bytes = [
        bytes_of(&Message::Keepalive, true),
        bytes_of(&Message::Open(open(1)), true),
    ]
    .concat();
    let mut buf = BytesMut::from(&bytes[..25]);
    assert_eq!(
        decode_from(&mut buf, true).unwrap(),
        Some(Message::Keepalive)
    );
    assert_eq!(decode_from(&mut buf, true).unwrap(), None);
    buf.extend_from_slice(&bytes[25..]);
    assert!(matches!(
        decode_from(&mut buf, true).unwrap(),
        Some(Message::Open(_))
    ));
    assert!(buf.is_empty());
}

/// An UPDATE of exactly `len` octets (at least 53): the usual attributes
/// and distinct NLRI, /24s (4 octets each) and up to three /32s (5 each).
fn update_of_len(len: usize) -> Message {
    let nlri_of = |n24: usize, n32: usize| -> Vec<Ipv4Network> {
        let mut nlri: Vec<Ipv4Network> = (0..n24)
            .map(|i| net(&format!("10.{}.{}.0/24", i / 256, i % 256)))
            .collect();
        nlri.extend((0..n32).map(|i| net(&format!("11.0.0.{i}/32"))));
        nlri
    };
    let update = |nlri| {
        Message::Update(Update {
            withdrawn: vec![],
            attributes: Some(PathAttributes {
                origin: Origin::Igp,
                as_path: vec![],
                next_hop: Ipv4Addr::new(10, 0, 0, 1),
                local_pref: Some(100),
                med: None,
            }),
            nlri,
        })
    };
    let base = bytes_of(&update(nlri_of(1, 0)), true).len() - 4;
    let (q, r) = ((len - base) / 4, (len - base) % 4);
    update(nlri_of(q - r, r))
}

#[test]
fn an_update_of_exactly_4096_octets_is_encoded() {
    let msg = update_of_len(MAX_MESSAGE_LEN);
    let mut buf = BytesMut::new();
    encode(&msg, true, &mut buf).unwrap();
    assert_eq!(buf.len(), MAX_MESSAGE_LEN);
    assert_eq!(decode(&buf, true).unwrap(), msg);
}

#[test]
fn an_update_one_octet_over_4096_is_too_long_and_appends_nothing() {
    let msg = update_of_len(MAX_MESSAGE_LEN + 1);
    let before = bytes_of(&Message::Keepalive, true);
    let mut buf = BytesMut::from(&before[..]);
    let err = encode(&msg, true, &mut buf).unwrap_err();
    assert!(
        matches!(err, EncodeError::TooLong(n) if n == MAX_MESSAGE_LEN + 1),
        "{err:?}"
    );
    assert_eq!(buf.to_vec(), before);
}

#[test]
fn a_notification_one_octet_over_4096_is_too_long_and_appends_nothing() {
    let data_room = MAX_MESSAGE_LEN - HEADER_LEN - 2;
    let fits = Message::Notification(Notification::with_data(6, 0, vec![7; data_room]));
    assert_eq!(bytes_of(&fits, true).len(), MAX_MESSAGE_LEN);
    let over = Message::Notification(Notification::with_data(6, 0, vec![7; data_room + 1]));
    let mut buf = BytesMut::new();
    let err = encode(&over, true, &mut buf).unwrap_err();
    assert!(
        matches!(err, EncodeError::TooLong(n) if n == MAX_MESSAGE_LEN + 1),
        "{err:?}"
    );
    assert!(buf.is_empty());
}

fn arb_net() -> impl Strategy<Value = Ipv4Network> {
    (1u8..=223, any::<[u8; 3]>(), 0u8..=32).prop_map(|(a, [b, c, d], len)| {
        let n = Ipv4Network::new(Ipv4Addr::new(a, b, c, d), len).unwrap();
        Ipv4Network::new(n.network(), len).unwrap()
    })
}

fn arb_update() -> impl Strategy<Value = Update> {
    let attrs = (
        prop_oneof![
            Just(Origin::Igp),
            Just(Origin::Egp),
            Just(Origin::Incomplete)
        ],
        prop::collection::vec(1u32..u32::MAX, 0..300),
        any::<[u8; 4]>(),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(origin, as_path, nh, local_pref, med)| PathAttributes {
            origin,
            as_path,
            next_hop: Ipv4Addr::from(nh),
            local_pref,
            med,
        });
    (
        prop::collection::vec(arb_net(), 0..100),
        prop::option::of(attrs),
        prop::collection::vec(arb_net(), 0..100),
    )
        .prop_map(|(withdrawn, attributes, nlri)| {
            let attributes = if nlri.is_empty() {
                attributes
            } else {
                attributes.or(Some(PathAttributes {
                    origin: Origin::Igp,
                    as_path: vec![],
                    next_hop: Ipv4Addr::new(10, 0, 0, 1),
                    local_pref: None,
                    med: None,
                }))
            };
            Update {
                withdrawn,
                attributes,
                nlri,
            }
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    let cap = prop_oneof![
        Just(Capability::Multiprotocol { afi: 1, safi: 1 }),
        Just(Capability::Multiprotocol { afi: 2, safi: 1 }),
        Just(Capability::RouteRefresh),
    ];
    // The AS travels in the 4-octet capability when it has one, else in the
    // 2-octet field: generate only OPENs that say the same thing twice.
    let asn = prop_oneof![
        (0u32..=0xffff).prop_map(|a| (a, false)),
        any::<u32>().prop_map(|a| (a, true))
    ];
    let open = (
        asn,
        prop_oneof![Just(0u16), 3u16..],
        1u32..0xe000_0000,
        prop::collection::vec(cap, 0..4),
    )
        .prop_map(|((asn, as4), hold_time, id, mut capabilities)| {
            if as4 {
                capabilities.push(Capability::FourOctetAs(asn));
            }
            Message::Open(Open {
                asn,
                hold_time,
                router_id: Ipv4Addr::from(id),
                capabilities,
            })
        });
    prop_oneof![
        open,
        arb_update().prop_map(Message::Update),
        (
            any::<u8>(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(c, s, d)| Message::Notification(Notification::with_data(c, s, d))),
        Just(Message::Keepalive),
        prop_oneof![Just((1u16, 1u8)), Just((2, 1)), Just((1, 2))]
            .prop_map(|(afi, safi)| Message::RouteRefresh(RouteRefresh { afi, safi })),
    ]
}

proptest! {
    #[test]
    fn decode_of_encode_is_identity(msg in arb_message(), asn4 in any::<bool>()) {
        let mut buf = BytesMut::new();
        // The largest generated message (300 ASNs, twice without 4-octet
        // AS, and 200 prefixes) is under 3,000 octets: every one encodes.
        // The 4096-octet limit is checked exactly below.
        let encoded = encode(&msg, asn4, &mut buf);
        prop_assert!(encoded.is_ok(), "{:?}", encoded);
        prop_assert!(buf.len() <= MAX_MESSAGE_LEN);
        prop_assert_eq!(decode(&buf, asn4).unwrap(), msg);
    }

    #[test]
    fn decode_never_panics_on_random_bytes(body in prop::collection::vec(any::<u8>(), 0..600), kind in 0u8..7, asn4 in any::<bool>()) {
        let _ = decode(&frame(kind, &body), asn4);
        let _ = decode(&body, asn4);
    }

    #[test]
    fn decode_never_panics_on_mutated_messages(msg in arb_message(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut buf = BytesMut::new();
        if encode(&msg, true, &mut buf).is_ok() {
            let mut bytes = buf.to_vec();
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let _ = decode(&bytes, true);
            let _ = decode(&bytes, false);
        }
    }
}
