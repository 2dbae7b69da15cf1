//! What a pod's annotations ask of IPAM (like Calico's
//! `cni.projectcalico.org/ipv4pools` and `.../ipAddrs`):
//!
//! ```yaml
//! metadata:
//!   annotations:
//!     tabby.dev/ipv4pools: '["default-ipv4-ippool", "10.245.0.0/16"]'   # pool names or CIDRs
//!     tabby.dev/ipv6pools: '["fd00:10::/64"]'
//!     tabby.dev/ipAddrs: '["10.244.3.7"]'                               # fixed addresses
//! ```
//!
//! Read on ADD only, when the datastore is Kubernetes and CNI_ARGS name
//! the pod (K8S_POD_NAMESPACE, K8S_POD_NAME); DEL releases by handle and
//! never needs the pod, so it works after the pod object is gone.
//! Parsing and pool resolution are pure; [`crate::tabby_ipam`] fetches.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tabby_ipam::IpPool;

use crate::error::{CniError, Code, Result};

/// Pools (names or CIDRs) for the pod's IPv4 address.
pub const IPV4_POOLS: &str = "tabby.dev/ipv4pools";
/// Pools (names or CIDRs) for the pod's IPv6 address.
pub const IPV6_POOLS: &str = "tabby.dev/ipv6pools";
/// Fixed addresses, at most one per family.
pub const IP_ADDRS: &str = "tabby.dev/ipAddrs";

/// What the annotations ask for; empty when the pod has none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIpam {
    /// Pool names or CIDRs, from both pool annotations.
    pub pools: Vec<String>,
    /// Fixed addresses.
    pub addrs: Vec<IpAddr>,
}

impl PodIpam {
    /// Parses the annotations; a malformed one is an error naming it.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self> {
        let mut pools = Vec::new();
        for key in [IPV4_POOLS, IPV6_POOLS] {
            if let Some(text) = annotations.get(key) {
                pools.extend(json_list::<String>(key, text)?);
            }
        }
        let addrs = match annotations.get(IP_ADDRS) {
            Some(text) => json_list::<IpAddr>(IP_ADDRS, text)?,
            None => Vec::new(),
        };
        for family in [true, false] {
            if addrs.iter().filter(|a| a.is_ipv4() == family).count() > 1 {
                return Err(invalid(IP_ADDRS, "at most one address per family"));
            }
        }
        Ok(Self { pools, addrs })
    }

    /// The CIDRs of the named pools (`pools` as the datastore lists
    /// them); an unknown name or CIDR is an error, so a typo never falls
    /// back to every pool. Each fixed address must lie in one of them.
    pub fn resolve(&self, pools: &[IpPool]) -> Result<Vec<IpNetwork>> {
        let mut cidrs = Vec::new();
        for wanted in &self.pools {
            let found = match wanted.parse::<IpNetwork>() {
                Ok(cidr) => pools.iter().find(|p| p.cidr == cidr),
                Err(_) => pools.iter().find(|p| &p.name == wanted),
            };
            let pool = found.ok_or_else(|| {
                invalid(
                    &format!("{IPV4_POOLS} / {IPV6_POOLS}"),
                    &format!("no IP pool named or with CIDR {wanted:?}"),
                )
            })?;
            cidrs.push(pool.cidr);
        }
        for addr in &self.addrs {
            let same_family: Vec<_> = cidrs
                .iter()
                .filter(|c| c.is_ipv4() == addr.is_ipv4())
                .collect();
            if !same_family.is_empty() && !same_family.iter().any(|c| c.contains(*addr)) {
                return Err(invalid(
                    IP_ADDRS,
                    &format!("{addr} is outside the pools the pod names"),
                ));
            }
        }
        Ok(cidrs)
    }
}

fn json_list<T: serde::de::DeserializeOwned>(key: &str, text: &str) -> Result<Vec<T>> {
    serde_json::from_str(text).map_err(|e| {
        CniError::with_source(
            Code::InvalidConfig,
            format!("pod annotation {key} must be a JSON list, like [\"10.244.0.0/16\"]"),
            &e,
        )
    })
}

fn invalid(key: &str, why: &str) -> CniError {
    CniError::new(Code::InvalidConfig, format!("pod annotation {key}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pool(name: &str, cidr: &str) -> IpPool {
        serde_json::from_value(serde_json::json!({"name": name, "cidr": cidr, "blockSize": 26}))
            .unwrap()
    }

    #[test]
    fn a_pod_without_annotations_asks_for_nothing() {
        let other = annotations(&[("example.com/x", "y")]);
        assert_eq!(
            PodIpam::from_annotations(&other).unwrap(),
            PodIpam::default()
        );
    }

    #[test]
    fn pools_resolve_by_name_or_cidr_and_unknown_ones_are_refused() {
        let pools = [pool("a", "10.1.0.0/16"), pool("b", "10.2.0.0/16")];
        let pod =
            PodIpam::from_annotations(&annotations(&[(IPV4_POOLS, r#"["b", "10.1.0.0/16"]"#)]))
                .unwrap();
        let cidrs: Vec<String> = pod
            .resolve(&pools)
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(cidrs, ["10.2.0.0/16", "10.1.0.0/16"]);
        let typo = PodIpam::from_annotations(&annotations(&[(IPV4_POOLS, r#"["c"]"#)])).unwrap();
        let err = typo.resolve(&pools).unwrap_err();
        assert!(err.to_string().contains("\"c\""), "{err}");
    }

    #[test]
    fn malformed_annotations_are_refused_with_their_name() {
        for (key, text) in [
            (IPV4_POOLS, "default-ipv4-ippool"),
            (IP_ADDRS, r#"["10.0.0.300"]"#),
            (IP_ADDRS, r#"["10.0.0.1", "10.0.0.2"]"#),
        ] {
            let err = PodIpam::from_annotations(&annotations(&[(key, text)])).unwrap_err();
            assert!(err.to_string().contains(key), "{key}={text}: {err}");
        }
    }

    #[test]
    fn a_fixed_address_must_lie_in_the_named_pools() {
        let pools = [pool("a", "10.1.0.0/16"), pool("b", "10.2.0.0/16")];
        let both = |addr: &str| {
            PodIpam::from_annotations(&annotations(&[
                (IPV4_POOLS, r#"["a"]"#),
                (IP_ADDRS, &format!("[\"{addr}\"]")),
            ]))
            .unwrap()
        };
        assert!(both("10.1.0.9").resolve(&pools).is_ok());
        assert!(both("10.2.0.9").resolve(&pools).is_err());
    }
}
