//! Fuzzes the BGP decoder: any byte stream must decode to messages or to a
//! NOTIFICATION, never panic; whatever decodes must re-encode and decode to
//! the same message (except OPENs with capabilities Tabby keeps only by
//! code, which it re-sends without their value).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tabby_bgp::codec::{decode_from, encode};
use tabby_bgp::message::{Capability, Message};

fuzz_target!(|data: &[u8]| {
    for asn4 in [false, true] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(msg)) = decode_from(&mut buf, asn4) {
            if let Message::Open(open) = &msg {
                if open
                    .capabilities
                    .iter()
                    .any(|c| matches!(c, Capability::Other(_)))
                {
                    continue;
                }
            }
            let mut out = BytesMut::new();
            if encode(&msg, asn4, &mut out).is_ok() {
                let again = decode_from(&mut out, asn4);
                assert_eq!(again, Ok(Some(msg)), "re-decode differs");
            }
        }
    }
});
