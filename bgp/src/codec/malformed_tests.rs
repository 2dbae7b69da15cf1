//! The malformed UPDATE table: bytes in, and either the NOTIFICATION that
//! resets the session or the treat-as-withdraw the RFCs ask for instead,
//! with the exact code and subcode RFC 4271 §6.3 assigns to the error.
//!
//! RFC 7606 §3 (e): "'Treat-as-withdraw' MUST be used for the cases that
//! specify a session reset and involve any of the attributes ORIGIN,
//! AS_PATH, NEXT_HOP, MULTI_EXIT_DISC, or LOCAL_PREF"; §4 does the same for
//! an attribute whose length overruns the Total Path Attribute Length. A
//! NEXT_HOP that is semantically wrong is the FSM's (`fsm/tests/update_tests.rs`).

use std::net::Ipv4Addr;

use super::*;
use crate::message::{Notification, Origin, PathAttributes, Update};

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    v.push(2);
    v.extend_from_slice(body);
    v
}

fn update_body(withdrawn: &[u8], attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = (withdrawn.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(withdrawn);
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(attrs);
    body.extend_from_slice(nlri);
    body
}

const ORIGIN: [u8; 4] = [0x40, 1, 1, 0];
const AS_PATH: [u8; 9] = [0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9];
const NEXT_HOP: [u8; 7] = [0x40, 3, 4, 10, 0, 0, 1];
/// 10.1.2.0/24 and 10.1.3.0/24.
const NLRI: [u8; 8] = [24, 10, 1, 2, 24, 10, 1, 3];
/// 10.9.0.0/16, withdrawn in the same UPDATE.
const WITHDRAWN: [u8; 3] = [16, 10, 9];

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn nlri_nets() -> Vec<Ipv4Network> {
    vec![net("10.1.2.0/24"), net("10.1.3.0/24")]
}

/// An UPDATE with `attrs` announcing NLRI and withdrawing WITHDRAWN.
fn with_attrs(attrs: &[&[u8]]) -> Vec<u8> {
    frame(&update_body(&WITHDRAWN, &attrs.concat(), &NLRI))
}

/// Asserts that `bytes` decode to a withdrawal of everything the UPDATE
/// names, and that the error RFC 4271 would have sent is `code/subcode` with `data`.
fn assert_withdrawn(bytes: &[u8], subcode: u8, data: &[u8]) {
    let decoded = decode_checked(bytes, true).unwrap_or_else(|n| panic!("session reset with {n}"));
    let mut all = vec![net("10.9.0.0/16")];
    all.extend(nlri_nets());
    assert_eq!(
        decoded.message,
        Message::Update(Update {
            withdrawn: all,
            attributes: None,
            nlri: vec![],
        })
    );
    let error = decoded.error.expect("the error is reported");
    assert_eq!(error.handling, ErrorHandling::TreatAsWithdraw);
    assert_eq!(
        error.notification,
        Notification::with_data(3, subcode, data)
    );
    // The plain decoder gives the same message.
    assert_eq!(decode(bytes, true).unwrap(), decoded.message);
}

fn assert_reset(bytes: &[u8], code: u8, subcode: u8) {
    let n = decode(bytes, true).unwrap_err();
    assert_eq!((n.code, n.subcode), (code, subcode), "{n}");
}

#[test]
fn an_origin_of_length_2_is_an_attribute_length_error_treated_as_withdraw() {
    let origin = [0x40, 1, 2, 0, 0];
    assert_withdrawn(&with_attrs(&[&origin, &AS_PATH, &NEXT_HOP]), 5, &origin);
}

#[test]
fn a_next_hop_of_length_3_is_an_attribute_length_error_treated_as_withdraw() {
    let nh = [0x40, 3, 3, 10, 0, 0];
    assert_withdrawn(&with_attrs(&[&ORIGIN, &AS_PATH, &nh]), 5, &nh);
}

#[test]
fn an_attribute_running_past_the_attribute_section_is_an_attribute_length_error() {
    // NEXT_HOP claims 9 octets; the section ends 4 octets later.
    let nh = [0x40, 3, 9, 10, 0, 0, 1];
    assert_withdrawn(&with_attrs(&[&ORIGIN, &AS_PATH, &nh]), 5, &nh);
}

#[test]
fn a_truncated_attribute_header_is_an_attribute_length_error() {
    assert_withdrawn(
        &with_attrs(&[&ORIGIN, &AS_PATH, &NEXT_HOP, &[0x80, 4]]),
        5,
        &[0x80, 4],
    );
}

#[test]
fn an_undefined_origin_is_invalid_origin_treated_as_withdraw() {
    let origin = [0x40, 1, 1, 7];
    assert_withdrawn(&with_attrs(&[&origin, &AS_PATH, &NEXT_HOP]), 6, &origin);
}

#[test]
fn well_known_attribute_flags_in_conflict_are_an_attribute_flags_error() {
    let origin = [0xc0, 1, 1, 0];
    assert_withdrawn(&with_attrs(&[&origin, &AS_PATH, &NEXT_HOP]), 4, &origin);
}

#[test]
fn missing_well_known_attributes_are_treated_as_withdraw() {
    assert_withdrawn(&with_attrs(&[&AS_PATH, &NEXT_HOP]), 3, &[1]);
    assert_withdrawn(&with_attrs(&[&ORIGIN, &NEXT_HOP]), 3, &[2]);
    assert_withdrawn(&with_attrs(&[&ORIGIN, &AS_PATH]), 3, &[3]);
}

#[test]
fn a_malformed_as_path_is_treated_as_withdraw() {
    // A segment of 5 ASes with room for one; a segment of length zero; type 9.
    for path in [
        &[0x40, 2, 6, 2, 5, 0, 0, 0xfd, 0xe9][..],
        &[0x40, 2, 2, 2, 0][..],
        &[0x40, 2, 6, 9, 1, 0, 0, 0xfd, 0xe9][..],
        &[0x40, 2, 7, 2, 1, 0, 0, 0xfd, 0xe9, 0][..],
    ] {
        assert_withdrawn(&with_attrs(&[&ORIGIN, path, &NEXT_HOP]), 11, &[]);
    }
}

#[test]
fn med_and_local_pref_of_the_wrong_length_are_treated_as_withdraw() {
    let med = [0x80, 4, 3, 0, 0, 1];
    assert_withdrawn(&with_attrs(&[&ORIGIN, &AS_PATH, &NEXT_HOP, &med]), 5, &med);
    let pref = [0x40, 5, 2, 0, 100];
    assert_withdrawn(
        &with_attrs(&[&ORIGIN, &AS_PATH, &NEXT_HOP, &pref]),
        5,
        &pref,
    );
}

#[test]
fn a_repeated_attribute_keeps_its_first_occurrence() {
    let second_nh = [0x40, 3, 4, 10, 0, 0, 9];
    let bytes = with_attrs(&[&ORIGIN, &AS_PATH, &NEXT_HOP, &second_nh, &[0x40, 1, 1, 2]]);
    let Message::Update(u) = decode(&bytes, true).unwrap() else {
        panic!()
    };
    let a = u.attributes.unwrap();
    assert_eq!(
        (a.origin, a.next_hop),
        (Origin::Igp, Ipv4Addr::new(10, 0, 0, 1))
    );
    assert_eq!(u.nlri, nlri_nets());
}

#[test]
fn a_repeated_mp_unreach_nlri_resets_the_session_with_malformed_attribute_list() {
    let unreach = [0x80, 15, 5, 0, 1, 1, 8, 10];
    assert_reset(
        &with_attrs(&[&ORIGIN, &AS_PATH, &NEXT_HOP, &unreach, &unreach]),
        3,
        1,
    );
}

#[test]
fn a_malformed_aggregator_is_discarded_and_the_route_kept() {
    let aggregator = [0xc0, 7, 3, 0, 0, 1];
    let decoded = decode_checked(
        &with_attrs(&[&ORIGIN, &AS_PATH, &NEXT_HOP, &aggregator]),
        true,
    )
    .unwrap();
    let Message::Update(u) = &decoded.message else {
        panic!()
    };
    assert_eq!(u.nlri, nlri_nets());
    assert_eq!(
        u.attributes,
        Some(PathAttributes {
            origin: Origin::Igp,
            as_path: vec![65001],
            next_hop: Ipv4Addr::new(10, 0, 0, 1),
            local_pref: None,
            med: None,
        })
    );
    let error = decoded.error.unwrap();
    assert_eq!(error.handling, ErrorHandling::AttributeDiscard);
    assert_eq!(
        error.notification,
        Notification::with_data(3, 5, aggregator)
    );
}

#[test]
fn errors_that_hide_the_nlri_still_reset_the_session() {
    // Withdrawn Routes Length past the message: Malformed Attribute List.
    assert_reset(&frame(&[0, 200, 0, 0]), 3, 1);
    // Total Path Attribute Length past the message.
    assert_reset(&frame(&[0, 0, 0, 200, 0x40, 1, 1, 0]), 3, 1);
    // A 33-bit prefix in the NLRI: Invalid Network Field.
    let bytes = frame(&update_body(
        &[],
        &[&ORIGIN[..], &AS_PATH, &NEXT_HOP].concat(),
        &[33, 10, 1, 2, 3, 4],
    ));
    assert_reset(&bytes, 3, 10);
    // A prefix longer than what is left of the NLRI field.
    let bytes = frame(&update_body(
        &[],
        &[&ORIGIN[..], &AS_PATH, &NEXT_HOP].concat(),
        &[24, 10, 1],
    ));
    assert_reset(&bytes, 3, 10);
}

#[test]
fn an_mp_reach_nlri_with_a_bad_next_hop_length_resets_the_session() {
    // IPv4 unicast with a 3-octet next hop: the NLRI cannot be located.
    let reach = [0x80, 14, 10, 0, 1, 1, 3, 10, 0, 0, 0, 24, 10];
    assert_reset(&with_attrs(&[&ORIGIN, &AS_PATH, &reach]), 3, 9);
}

#[test]
fn a_next_hop_that_is_no_host_address_is_left_to_the_fsm() {
    // Well formed: the FSM ignores the route (RFC 4271 §6.3 semantic check).
    let nh = [0x40, 3, 4, 224, 0, 0, 1];
    let decoded = decode_checked(&with_attrs(&[&ORIGIN, &AS_PATH, &nh]), true).unwrap();
    assert!(decoded.error.is_none());
    let Message::Update(u) = decoded.message else {
        panic!()
    };
    assert_eq!(u.attributes.unwrap().next_hop, Ipv4Addr::new(224, 0, 0, 1));
}

#[test]
fn a_well_formed_update_has_no_error() {
    let decoded = decode_checked(&with_attrs(&[&ORIGIN, &AS_PATH, &NEXT_HOP]), true).unwrap();
    assert!(decoded.error.is_none());
    let Message::Update(u) = decoded.message else {
        panic!()
    };
    assert_eq!(
        (u.withdrawn, u.nlri),
        (vec![net("10.9.0.0/16")], nlri_nets())
    );
}
