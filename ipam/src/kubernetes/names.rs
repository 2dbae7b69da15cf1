//! Datastore keys to Kubernetes object names and label values (pure).
//!
//! Object names are DNS-1123 subdomains (lowercase alphanumerics, `-` and
//! `.`, at most 253 characters); label values at most 63 characters of
//! alphanumerics, `-`, `_` and `.`. Keys are mapped deterministically:
//!
//! | key                               | object name                      |
//! |-----------------------------------|----------------------------------|
//! | `blocks/10.244.1.0-26`            | `10-244-1-0-26`                  |
//! | `blocks/fd00::-122`               | `fd00-0-0-0-0-0-0-0-122`         |
//! | `affinities/node-a/10.244.1.0-26` | `node-a.10-244-1-0-26`           |
//! | `pools/default-ipv4-ippool`       | `default-ipv4-ippool` (as is)    |
//! | `handles/k8s-pod-network.0123ab`  | `k8s-pod-network.0123ab` (as is) |
//! | `handles/My_Net.x` (not a name)   | `my-net-x-<10 hex of sha256>`    |
//! | `config/ipam`, `config/bgp`       | `default`                        |
//!
//! Every structured name is injective (a CIDR name has a fixed number of
//! fields; an affinity's node ends at its last `.` since CIDR names have
//! none). A key that is not a valid name as is gets a sanitized form plus a
//! hash of the whole key, which no structured name ends with (their last
//! field has at most 3 digits). The original key is also stored on the
//! object (`tabby.dev/key`) and checked on every read, so even a forged
//! collision cannot return another key's document.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use crate::block::{cidr_key, parse_cidr_key};

/// The longest object name.
pub const MAX_NAME: usize = 253;
/// The longest label value.
pub const MAX_LABEL_VALUE: usize = 63;
/// Hex digits of the hash suffix.
const HASH_LEN: usize = 10;

/// How a kind turns the rest of a key (after its prefix) into a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// The rest as is when it is a valid name, else sanitized + hash.
    Generic,
    /// A CIDR key (`10.244.1.0-26`) as `10-244-1-0-26`.
    Cidr,
    /// `<node>/<cidr key>` as `<node>.<cidr name>`.
    Affinity,
    /// A singleton with this name.
    Fixed(&'static str),
}

/// The object name for `rest` (the key without its kind's prefix), under an
/// optional test scope that prefixes every name with `<scope>.`.
pub fn object_name(naming: Naming, rest: &str, scope: Option<&str>) -> String {
    let room = MAX_NAME - scope.map_or(0, |s| s.len() + 1);
    let name = match naming {
        Naming::Fixed(name) => name.to_string(),
        Naming::Generic if is_dns_subdomain(rest) && rest.len() <= room => rest.to_string(),
        Naming::Generic => hashed(rest, room),
        Naming::Cidr => {
            canonical_cidr(rest).map_or_else(|| hashed(rest, room), |net| cidr_name(&net))
        }
        Naming::Affinity => affinity_name(rest, room).unwrap_or_else(|| hashed(rest, room)),
    };
    match scope {
        Some(scope) => format!("{scope}.{name}"),
        None => name,
    }
}

/// The CIDR of a key's rest, only in the canonical form [`cidr_key`] writes.
fn canonical_cidr(rest: &str) -> Option<IpNetwork> {
    parse_cidr_key(rest).filter(|net| cidr_key(net) == rest)
}

fn affinity_name(rest: &str, room: usize) -> Option<String> {
    let (node, cidr) = rest.split_once('/')?;
    let net = canonical_cidr(cidr)?;
    let name = format!("{node}.{}", cidr_name(&net));
    (is_dns_subdomain(node) && name.len() <= room).then_some(name)
}

/// `10.244.1.0/26` as `10-244-1-0-26`; IPv6 with all eight groups
/// (`fd00-0-0-0-0-0-0-0-122`), so the number of fields fixes the family.
pub fn cidr_name(net: &IpNetwork) -> String {
    let fields: Vec<String> = match net.network() {
        IpAddr::V4(v4) => v4.octets().iter().map(u8::to_string).collect(),
        IpAddr::V6(v6) => v6.segments().iter().map(|s| format!("{s:x}")).collect(),
    };
    format!("{}-{}", fields.join("-"), net.prefix())
}

/// A valid name made from `rest`: its sanitized form, cut to fit, then `-`
/// and a hash of the whole of `rest`.
fn hashed(rest: &str, room: usize) -> String {
    let mut clean = String::with_capacity(rest.len());
    for c in rest.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            clean.push(c);
        } else if !clean.ends_with('-') {
            clean.push('-');
        }
    }
    let clean = clean.trim_matches('-');
    let keep = room.saturating_sub(HASH_LEN + 1);
    let clean = clean[..clean.len().min(keep)].trim_end_matches('-');
    let hash = short_hash(rest);
    if clean.is_empty() {
        hash
    } else {
        format!("{clean}-{hash}")
    }
}

fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    hex::encode(digest)[..HASH_LEN].to_string()
}

/// A label value for `text`: as is when valid, else sanitized + hash.
pub fn label_value(text: &str) -> String {
    if is_label_value(text) {
        return text.to_string();
    }
    let mut clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    clean.truncate(MAX_LABEL_VALUE - HASH_LEN - 1);
    let clean = clean.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if clean.is_empty() {
        short_hash(text)
    } else {
        format!("{clean}-{}", short_hash(text))
    }
}

/// Whether `s` is a DNS-1123 subdomain (a valid name for most objects).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
}

/// Whether `s` is a valid label value (empty is valid).
pub fn is_label_value(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.len() <= MAX_LABEL_VALUE
        && (bytes.is_empty()
            || (bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_become_dashed_names_of_a_fixed_shape() {
        assert_eq!(
            object_name(Naming::Cidr, "10.244.1.0-26", None),
            "10-244-1-0-26"
        );
        assert_eq!(
            object_name(Naming::Cidr, "fd00::-122", None),
            "fd00-0-0-0-0-0-0-0-122"
        );
        assert_eq!(
            object_name(Naming::Cidr, "::ffff:1.2.3.4-128", None),
            "0-0-0-0-0-ffff-102-304-128"
        );
        // Not canonical (or not a CIDR): hashed, never the dashed form.
        let odd = object_name(Naming::Cidr, "10-244-1-0-26", None);
        assert_ne!(odd, "10-244-1-0-26");
        assert!(is_dns_subdomain(&odd), "{odd}");
    }

    #[test]
    fn affinities_join_node_and_block_at_the_last_dot() {
        assert_eq!(
            object_name(Naming::Affinity, "node-a/10.244.1.0-26", None),
            "node-a.10-244-1-0-26"
        );
        assert_eq!(
            object_name(Naming::Affinity, "n1.example.com/10.0.0.0-26", None),
            "n1.example.com.10-0-0-0-26"
        );
        let bad_node = object_name(Naming::Affinity, "Node_A/10.0.0.0-26", None);
        assert!(is_dns_subdomain(&bad_node), "{bad_node}");
        assert!(bad_node.starts_with("node-a-10-0-0-0-26-"), "{bad_node}");
    }

    #[test]
    fn names_that_are_valid_stay_and_others_get_a_hash() {
        assert_eq!(
            object_name(Naming::Generic, "k8s-pod-network.0123abcd", None),
            "k8s-pod-network.0123abcd"
        );
        let a = object_name(Naming::Generic, "My_Net.x", None);
        let b = object_name(Naming::Generic, "my_net.x", None);
        assert!(a.starts_with("my-net-x-") && b.starts_with("my-net-x-"));
        assert_ne!(a, b, "the hash covers the original spelling");
        let long = "x".repeat(400);
        let name = object_name(Naming::Generic, &long, Some("t1"));
        assert!(name.len() <= MAX_NAME && is_dns_subdomain(&name), "{name}");
        assert!(name.starts_with("t1.x"));
        assert_eq!(
            object_name(Naming::Fixed("default"), "ipam", Some("s")),
            "s.default"
        );
        assert!(is_dns_subdomain(&object_name(Naming::Generic, "..", None)));
        assert!(is_dns_subdomain(&object_name(Naming::Generic, "", None)));
    }

    #[test]
    fn label_values_are_valid_or_hashed() {
        assert_eq!(label_value("node-a"), "node-a");
        assert_eq!(label_value("n1.example.com"), "n1.example.com");
        let long = label_value(&"a".repeat(100));
        assert!(
            is_label_value(&long) && long.len() <= MAX_LABEL_VALUE,
            "{long}"
        );
        assert!(is_label_value(&label_value("ä/ö")));
        assert_ne!(label_value(&"a".repeat(100)), label_value(&"a".repeat(101)));
    }

    #[test]
    fn subdomain_and_label_rules() {
        for ok in ["a", "a-b.c", "0.1", "x".repeat(253).as_str()] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a..b",
            "-a",
            "a-",
            "a_b",
            ".a",
            "x".repeat(254).as_str(),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
        assert!(is_label_value("") && is_label_value("A_b.c-1"));
        assert!(!is_label_value("-a") && !is_label_value("a/b"));
    }
}
