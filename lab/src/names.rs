//! The lab's names and addresses, all derived from one prefix so that
//! several labs (a developer's and a test's) can live side by side.
//!
//! With the default prefix `tabby`:
//!
//! | thing                 | name / address                          |
//! |-----------------------|-----------------------------------------|
//! | underlay namespace    | `tabby-underlay`, bridge `br0`, 10.98.0.254/24 (the router) |
//! | second subnet (`--subnets 2`) | bridge `br1` in the underlay, 10.98.1.254/24 |
//! | node *i* namespace    | `tabby-node-<i>`, `eth0` 10.98.*s*.*i*/24 (*s* = 0, or (*i*−1) mod 2 with `--subnets 2`) |
//! | pod namespace         | `tabby-pod-<pod name>`                  |
//! | external client       | `tabby-external`, `eth0` 10.98.0.200/24 |
//! | the "internet"        | `tabby-internet`, `eth0` 203.0.113.10/24 behind the underlay's 203.0.113.1 |
//! | control plane (`--kubernetes`) | `tabby-control-plane`, `eth0` 10.98.0.250/24 |
//! | a node's cgroup (`--kubernetes`) | `/tabby-node-<i>` in every cgroup v1 hierarchy |

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The first two octets of the underlay subnets (10.98.*s*.0/24).
const UNDERLAY_NET: [u8; 2] = [10, 98];
/// The most underlay subnets a lab has (`--subnets`).
pub const MAX_SUBNETS: u8 = 2;
/// The "internet" beyond the underlay router (TEST-NET-3, RFC 5737).
pub const INTERNET_NET: [u8; 3] = [203, 0, 113];
/// The router's host number on the internet side (in the underlay namespace).
pub const INTERNET_ROUTER_HOST: u8 = 1;
/// The internet server's host number.
pub const INTERNET_SERVER_HOST: u8 = 10;
/// The port the internet server answers on (an echo server like the pods').
pub const INTERNET_SERVER_PORT: u16 = 80;
/// The underlay's port towards the internet namespace.
pub const INTERNET_PORT: &str = "internet";
/// Prefix length of the underlay subnet.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The underlay's router / gateway address, owned by the underlay namespace.
pub const GATEWAY_HOST: u8 = 254;
/// The external client's host number on the underlay.
pub const EXTERNAL_HOST: u8 = 200;
/// The control plane's host number on the underlay (`--kubernetes`).
pub const CONTROL_PLANE_HOST: u8 = 250;
/// The largest node count: node addresses must stay below the external client's.
pub const MAX_NODES: usize = EXTERNAL_HOST as usize - 1;
/// The interface name of every node's and the external client's underlay link.
pub const UPLINK: &str = "eth0";

/// Names derived from the lab's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Validates `prefix` (letters, digits and `-`, at most 20 characters, so
    /// that namespace names stay readable and `ip netns` accepts them).
    pub fn new(prefix: &str) -> anyhow::Result<Names> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 20
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !prefix.starts_with('-');
        if !valid {
            anyhow::bail!("invalid lab prefix {prefix:?}: use 1-20 letters, digits or '-'");
        }
        Ok(Names {
            prefix: prefix.to_string(),
        })
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The underlay namespace, e.g. `tabby-underlay`.
    pub fn underlay_ns(&self) -> String {
        format!("{}-underlay", self.prefix)
    }

    /// The external client namespace, e.g. `tabby-external`.
    pub fn external_ns(&self) -> String {
        format!("{}-external", self.prefix)
    }

    /// The "internet" namespace beyond the underlay router, e.g. `tabby-internet`.
    pub fn internet_ns(&self) -> String {
        format!("{}-internet", self.prefix)
    }

    /// Node *i*'s namespace (1-based), e.g. `tabby-node-1`.
    pub fn node_ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// The control plane's namespace (`--kubernetes`), e.g. `tabby-control-plane`.
    pub fn control_plane_ns(&self) -> String {
        format!("{}-control-plane", self.prefix)
    }

    /// A node's cgroup (`--kubernetes`: the kubelet's `cgroupRoot`), a
    /// directory at the root of every hierarchy, e.g. `tabby-node-1`.
    pub fn node_cgroup(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// The control plane's cgroup, e.g. `tabby-control-plane`.
    pub fn control_plane_cgroup(&self) -> String {
        self.control_plane_ns()
    }

    /// Whether `name` is a cgroup this prefix's lab may have made.
    pub fn owns_cgroup(&self, name: &str) -> bool {
        let Some(rest) = name
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        rest == "control-plane" || is_node_name(rest)
    }

    /// A pod's namespace; it ends with the pod's name, e.g. `tabby-pod-node-1-pod1`.
    pub fn pod_ns(&self, pod: &str) -> String {
        format!("{}-pod-{pod}", self.prefix)
    }

    /// Whether `ns` is a namespace this prefix's lab may have made, for
    /// cleaning up without a state file.
    pub fn owns_ns(&self, ns: &str) -> bool {
        let Some(rest) = ns
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        rest == "underlay"
            || rest == "external"
            || rest == "internet"
            || rest == "control-plane"
            || is_node_name(rest)
            || rest.strip_prefix("pod-").is_some_and(|p| !p.is_empty())
    }
}

/// Whether `name` is a node's name, `node-<i>`.
pub fn is_node_name(name: &str) -> bool {
    name.strip_prefix("node-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Node *i*'s name (1-based), e.g. `node-1`.
pub fn node_name(index: usize) -> String {
    format!("node-{index}")
}

/// The `k`-th pod (1-based) of a node, e.g. `node-1-pod2`.
pub fn pod_name(node: &str, k: usize) -> String {
    format!("{node}-pod{k}")
}

/// Node *i*'s underlay address in a one-subnet lab, 10.98.0.*i*.
pub fn node_address(index: usize) -> Ipv4Addr {
    node_address_in(index, 1)
}

/// Node *i*'s underlay address when the lab has `subnets` subnets: nodes
/// alternate between them (node-1 on 10.98.0.0/24, node-2 on 10.98.1.0/24,
/// node-3 on 10.98.0.0/24...), the host number is always *i*.
pub fn node_address_in(index: usize, subnets: u8) -> Ipv4Addr {
    assert!(
        (1..=MAX_NODES).contains(&index),
        "node index {index} out of range"
    );
    subnet_host(node_subnet(index, subnets), index as u8)
}

/// The subnet (0-based) node *i* sits on.
pub fn node_subnet(index: usize, subnets: u8) -> u8 {
    ((index - 1) % usize::from(subnets.max(1))) as u8
}

/// The subnet (0-based) an underlay address is on: its third octet.
pub fn subnet_of(address: Ipv4Addr) -> u8 {
    address.octets()[2]
}

/// The bridge of underlay subnet `subnet`: `br0`, `br1`.
pub fn bridge(subnet: u8) -> String {
    format!("br{subnet}")
}

/// An address on the first underlay subnet, 10.98.0.`host`.
pub fn host(host: u8) -> Ipv4Addr {
    subnet_host(0, host)
}

/// An address on underlay subnet `subnet`, 10.98.`subnet`.`host`.
pub fn subnet_host(subnet: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], subnet, host)
}

/// An address on the internet side, 203.0.113.`host`.
pub fn internet_host(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(INTERNET_NET[0], INTERNET_NET[1], INTERNET_NET[2], host)
}

/// Where a named network namespace is mounted, e.g. `/run/netns/tabby-node-1`.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Whether `name` is usable as a pod name (a DNS label, as in Kubernetes).
pub fn valid_pod_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_follow_the_prefix_and_pod_namespaces_end_with_the_pod_name() {
        let n = Names::new("tabby").unwrap();
        assert_eq!(n.underlay_ns(), "tabby-underlay");
        assert_eq!(n.node_ns(&node_name(2)), "tabby-node-2");
        assert_eq!(n.pod_ns(&pod_name("node-1", 2)), "tabby-pod-node-1-pod2");
        assert!(n.pod_ns("web").ends_with("web"));
        assert_eq!(n.external_ns(), "tabby-external");
    }

    #[test]
    fn owns_ns_recognises_only_this_prefixes_namespaces() {
        let n = Names::new("tabby").unwrap();
        for ns in [
            "tabby-underlay",
            "tabby-external",
            "tabby-internet",
            "tabby-control-plane",
            "tabby-node-3",
            "tabby-pod-node-1-pod1",
        ] {
            assert!(n.owns_ns(ns), "{ns}");
        }
        for ns in [
            "tabby-node-x",
            "tabby-pod-",
            "tabby",
            "tl1-node-1",
            "tabbyx-underlay",
            "cni-1234",
        ] {
            assert!(!n.owns_ns(ns), "{ns}");
        }
        assert!(n.owns_cgroup("tabby-node-2") && n.owns_cgroup("tabby-control-plane"));
        assert!(!n.owns_cgroup("tabby-underlay") && !n.owns_cgroup("tabby-pod-node-2"));
        assert!(!n.owns_cgroup("k8s.io") && !n.owns_cgroup("tabbyx-node-1"));
        let t = Names::new("tl42").unwrap();
        assert!(t.owns_ns("tl42-pod-node-2-pod1"));
        assert!(!t.owns_ns("tabby-pod-node-2-pod1"));
    }

    #[test]
    fn addresses_sit_on_the_underlay() {
        assert_eq!(node_address(1), Ipv4Addr::new(10, 98, 0, 1));
        assert_eq!(host(GATEWAY_HOST), Ipv4Addr::new(10, 98, 0, 254));
    }

    #[test]
    fn with_two_subnets_nodes_alternate_between_them() {
        let addresses: Vec<Ipv4Addr> = (1..=4).map(|i| node_address_in(i, 2)).collect();
        let expected = ["10.98.0.1", "10.98.1.2", "10.98.0.3", "10.98.1.4"];
        assert_eq!(addresses, expected.map(|a| a.parse::<Ipv4Addr>().unwrap()));
        assert_eq!(node_address_in(2, 1), node_address(2));
        assert_eq!(subnet_of(node_address_in(4, 2)), 1);
        assert_eq!(bridge(1), "br1");
        assert_eq!(
            internet_host(INTERNET_SERVER_HOST).to_string(),
            "203.0.113.10"
        );
    }

    #[test]
    fn bad_prefixes_and_pod_names_are_refused() {
        assert!(Names::new("").is_err());
        assert!(Names::new("a b").is_err());
        assert!(Names::new("-x").is_err());
        assert!(valid_pod_name("web-1"));
        assert!(!valid_pod_name("Web"));
        assert!(!valid_pod_name("a/b"));
    }
}
