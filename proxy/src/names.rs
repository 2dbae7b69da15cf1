//! Chain names and the hash that kube-proxy uses to name per-service chains.
//!
//! A service port's chains are named `TABBY-<KIND>-<hash>` where the hash is
//! the first 16 characters of the base32 (RFC 4648, standard alphabet) encoding
//! of `sha256(servicePortName + protocol)`, and an endpoint's chain adds the
//! endpoint (`ip:port`) to the hashed text. This is kube-proxy's recipe, so a
//! Tabby chain carries the same suffix as the `KUBE-` chain kube-proxy would
//! create for the same service port: `default/kubernetes:https` over TCP is
//! `TABBY-SVC-NPX46M4PTMTKRN6Y` here and `KUBE-SVC-NPX46M4PTMTKRN6Y` there.

use sha2::{Digest, Sha256};

/// nat and filter: the dispatch chain every service rule hangs from.
pub const SERVICES: &str = "TABBY-SERVICES";
/// filter: rules for traffic to externally visible service addresses.
pub const EXTERNAL_SERVICES: &str = "TABBY-EXTERNAL-SERVICES";
/// nat: node port dispatch; filter: health check node port accepts.
pub const NODEPORTS: &str = "TABBY-NODEPORTS";
/// nat: masquerades marked packets.
pub const POSTROUTING: &str = "TABBY-POSTROUTING";
/// nat: sets the masquerade mark.
pub const MARK_MASQ: &str = "TABBY-MARK-MASQ";
/// filter: accepts forwarded service traffic.
pub const FORWARD: &str = "TABBY-FORWARD";
/// filter: drops load balancer traffic not allowed by `loadBalancerSourceRanges`.
pub const PROXY_FIREWALL: &str = "TABBY-PROXY-FIREWALL";

/// Prefix of the per-service-port chain for `Cluster` traffic policy.
pub const SVC_PREFIX: &str = "TABBY-SVC-";
/// Prefix of the per-service-port chain for `Local` traffic policy.
pub const SVL_PREFIX: &str = "TABBY-SVL-";
/// Prefix of the per-service-port chain for external destinations.
pub const EXT_PREFIX: &str = "TABBY-EXT-";
/// Prefix of the per-service-port load balancer source range chain.
pub const FW_PREFIX: &str = "TABBY-FW-";
/// Prefix of the per-endpoint chain.
pub const SEP_PREFIX: &str = "TABBY-SEP-";

/// The nat chains declared (and so flushed and rewritten) on every sync.
pub const NAT_DISPATCH_CHAINS: [&str; 4] = [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ];
/// The filter chains declared (and so flushed and rewritten) on every sync.
pub const FILTER_CHAINS: [&str; 5] = [
    SERVICES,
    EXTERNAL_SERVICES,
    FORWARD,
    NODEPORTS,
    PROXY_FIREWALL,
];

/// Whether `chain` is a per-service chain Tabby owns (and may delete).
pub fn is_service_chain(chain: &str) -> bool {
    [SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX]
        .iter()
        .any(|p| chain.starts_with(p))
}

/// kube-proxy's `portProtoHash`: 16 base32 characters of `sha256(name + protocol)`.
///
/// `service_port_name` is `namespace/name:port` (or `namespace/name` for an
/// unnamed port) and `protocol` is lower case (`tcp`, `udp`, `sctp`).
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    let mut h = Sha256::new();
    h.update(service_port_name.as_bytes());
    h.update(protocol.as_bytes());
    base32_16(&h.finalize())
}

/// `TABBY-SVC-<hash>`: the service port's chain for `Cluster` policy.
pub fn svc_chain(service_port_name: &str, protocol: &str) -> String {
    format!(
        "{SVC_PREFIX}{}",
        port_proto_hash(service_port_name, protocol)
    )
}

/// `TABBY-SEP-<hash>`: one endpoint of one service port.
pub fn sep_chain(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    let mut h = Sha256::new();
    h.update(service_port_name.as_bytes());
    h.update(protocol.as_bytes());
    h.update(endpoint.as_bytes());
    format!("{SEP_PREFIX}{}", base32_16(&h.finalize()))
}

/// The first 16 characters of the standard base32 encoding of `bytes` (which
/// must hold at least 10 bytes: 16 characters carry 80 bits).
fn base32_16(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    for group in bytes[..10].chunks(5) {
        let bits = group.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        for i in (0..8).rev() {
            out.push(char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_the_chains_kube_proxy_creates_for_well_known_services() {
        // Suffixes seen in kube-proxy's own nat tables (seed 000 and countless clusters).
        assert_eq!(
            svc_chain("default/kubernetes:https", "tcp"),
            "TABBY-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            svc_chain("kube-system/kube-dns:dns", "udp"),
            "TABBY-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            svc_chain("kube-system/kube-dns:dns-tcp", "tcp"),
            "TABBY-SVC-ERIFXISQEP7F7OF4"
        );
        assert_eq!(
            svc_chain("kube-system/kube-dns:metrics", "tcp"),
            "TABBY-SVC-JD5MR3NA4I4DYORP"
        );
        assert_eq!(
            svc_chain("default/hello-service", "tcp"),
            "TABBY-SVC-WR2LASOULGGSX3JN"
        );
        assert_eq!(
            svc_chain("default/hello-nodeport-service:http", "tcp"),
            "TABBY-SVC-KGTTXZQT54FX5FOU"
        );
    }

    #[test]
    fn endpoint_chains_match_seed_004() {
        let n = "default/svc-clusterip:svc-webport";
        assert_eq!(svc_chain(n, "tcp"), "TABBY-SVC-KBDEBIL6IU6WL7RF");
        assert_eq!(
            sep_chain(n, "tcp", "10.10.1.2:80"),
            "TABBY-SEP-TBW2IYJKUCAC7GB3"
        );
        assert_eq!(
            sep_chain(n, "tcp", "10.10.2.2:80"),
            "TABBY-SEP-DOIEFYKPESCDTYCH"
        );
        assert_eq!(
            sep_chain(n, "tcp", "10.10.3.3:80"),
            "TABBY-SEP-K7ALM6KJRBAYOHKX"
        );
    }

    #[test]
    fn chain_names_fit_the_kernel_limit() {
        assert!(sep_chain("a/b:c", "tcp", "10.0.0.1:80").len() <= 28);
        assert!(EXTERNAL_SERVICES.len() <= 28);
    }

    #[test]
    fn service_chain_prefixes_are_recognised() {
        assert!(is_service_chain("TABBY-SEP-ABC"));
        assert!(!is_service_chain(SERVICES));
        assert!(!is_service_chain("KUBE-SVC-ABC"));
    }
}
