//! The lab's names and addresses, all derived from one prefix so that
//! several labs (a developer's and a test's) can live side by side.
//!
//! With the default prefix `tabby`:
//!
//! | thing                 | name / address                          |
//! |-----------------------|-----------------------------------------|
//! | underlay namespace    | `tabby-underlay`, bridge `br0`, 10.98.0.254/24 |
//! | node *i* namespace    | `tabby-node-<i>`, `eth0` 10.98.0.*i*/24  |
//! | pod namespace         | `tabby-pod-<pod name>`                  |
//! | external client       | `tabby-external`, `eth0` 10.98.0.200/24 |
//! | control plane (`--kubernetes`) | `tabby-control-plane`, `eth0` 10.98.0.250/24 |
//! | a node's cgroup (`--kubernetes`) | `/tabby-node-<i>` in every cgroup v1 hierarchy |

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The underlay subnet's first three octets (10.98.0.0/24).
const UNDERLAY_NET: [u8; 3] = [10, 98, 0];
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
/// The bridge in the underlay namespace.
pub const BRIDGE: &str = "br0";
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

/// Node *i*'s underlay address, 10.98.0.*i*.
pub fn node_address(index: usize) -> Ipv4Addr {
    assert!(
        (1..=MAX_NODES).contains(&index),
        "node index {index} out of range"
    );
    host(index as u8)
}

/// An address on the underlay, 10.98.0.`host`.
pub fn host(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], host)
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
    fn bad_prefixes_and_pod_names_are_refused() {
        assert!(Names::new("").is_err());
        assert!(Names::new("a b").is_err());
        assert!(Names::new("-x").is_err());
        assert!(valid_pod_name("web-1"));
        assert!(!valid_pod_name("Web"));
        assert!(!valid_pod_name("a/b"));
    }
}
