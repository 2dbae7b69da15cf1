//! Names Tabby gives to host-side interfaces.

use sha2::{Digest, Sha256};

/// Prefix of every host-side veth, like Calico's `cali`.
pub const HOST_VETH_PREFIX: &str = "tabby";

/// The MAC of every host-side veth: the pod's gateway MAC via proxy ARP.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// The pod's IPv4 gateway, answered by the host veth through proxy ARP.
pub const GATEWAY_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// The pod's IPv6 gateway: the link-local address derived from `ee:ee:ee:ee:ee:ee`.
pub const GATEWAY_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// The interface name of a pod's first (or only) attachment.
pub const DEFAULT_IFNAME: &str = "eth0";

/// `tabby` + the first 10 hex characters of SHA-256 of the pod `identity`
/// (`<identity>/<ifname>` for an interface other than `eth0`, so a pod's
/// interfaces get one host veth each): 15 characters, stable for a pod
/// across sandbox restarts.
pub fn host_veth_name(identity: &str, ifname: &str) -> String {
    let key = if ifname == DEFAULT_IFNAME {
        identity.to_string()
    } else {
        format!("{identity}/{ifname}")
    };
    let digest = Sha256::digest(key.as_bytes());
    let hex = hex::encode(digest);
    format!("{HOST_VETH_PREFIX}{}", &hex[..10])
}

/// `ee:ee:ee:ee:ee:ee` and the like.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_15_characters_and_stable() {
        let a = host_veth_name("default.web-0", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("tabby"));
        assert_eq!(a, host_veth_name("default.web-0", "eth0"));
        assert_ne!(a, host_veth_name("default.web-1", "eth0"));
        let net1 = host_veth_name("default.web-0", "net1");
        assert_eq!(net1.len(), 15);
        assert_ne!(a, net1);
    }

    #[test]
    fn the_v6_gateway_is_the_eui64_of_the_host_mac() {
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
        assert_eq!(format_mac(&HOST_VETH_MAC), "ee:ee:ee:ee:ee:ee");
    }
}
