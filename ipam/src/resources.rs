//! Cluster resources beside IPAM that live in the same datastore: the BGP
//! configuration, explicit BGP peers and BGP filters (Calico's
//! `BGPConfiguration`, `BGPPeer` and `BGPFilter`), read by `tabby-node` and
//! written by `tabbyctl bgp ...`. Writes validate first.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::datastore::{Datastore, DatastoreError};
use crate::store;

mod filter;

pub use filter::{BgpFilter, BgpFilterRule, FilterAction, MatchOperator, PrefixLength};

/// Key of the cluster BGP settings.
pub const BGP_CONFIG_KEY: &str = "config/bgp";
/// Prefix of every explicit BGP peer.
pub const BGP_PEERS: &str = "bgppeers/";
/// Prefix of every BGP filter.
pub const BGP_FILTERS: &str = "bgpfilters/";

/// AS_TRANS (RFC 6793): stands in for a 4-octet AS, never a speaker's own.
pub const AS_TRANS: u32 = 23456;

/// Errors of the resource API.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The resource cannot work as written.
    #[error("invalid {kind} {name:?}: {reason}")]
    Invalid {
        /// `BGPPeer`, `BGPFilter`, `BGPConfiguration`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A filter that peers still name.
    #[error("BGP filter {filter} is used by BGP peer {peer}: remove it from the peer first")]
    InUse {
        /// The filter.
        filter: String,
        /// A peer naming it.
        peer: String,
    },
    /// The datastore failed or raced.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

/// Result of the resource API.
pub type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// Whether `asn` may be a speaker's own AS: not 0 (RFC 7607), not AS_TRANS.
pub fn check_asn(asn: u32) -> Result<(), String> {
    match asn {
        0 => Err("AS 0 is reserved (RFC 7607)".into()),
        AS_TRANS => Err("AS 23456 is AS_TRANS, which stands in for 4-octet ASes (RFC 6793)".into()),
        _ => Ok(()),
    }
}

/// Resource names: 1 to 253 of `a-z`, `0-9`, `.`, `-`, `_`, alphanumeric at both ends.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty()
        || name.len() > 253
        || !name.chars().all(ok_char)
        || !alnum(name.chars().next())
        || !alnum(name.chars().last())
    {
        return Err(format!(
            "name {name:?} must be 1-253 lowercase letters, digits, '.', '-' or '_', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// The default AS of every node, as Calico's.
pub const DEFAULT_ASN: u32 = 64512;

/// Cluster BGP settings (`BGPConfiguration` named default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpConfiguration {
    /// The AS of nodes that do not set their own.
    #[serde(default = "default_asn")]
    pub as_number: u32,
    /// Full-mesh iBGP among all nodes.
    #[serde(default = "yes")]
    pub node_to_node_mesh: bool,
}

fn default_asn() -> u32 {
    DEFAULT_ASN
}

fn yes() -> bool {
    true
}

impl Default for BgpConfiguration {
    fn default() -> Self {
        Self {
            as_number: DEFAULT_ASN,
            node_to_node_mesh: true,
        }
    }
}

/// An explicit BGP peer: global (every node peers with it) or for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeer {
    /// Unique name.
    pub name: String,
    /// The peer's address.
    pub peer_ip: IpAddr,
    /// The peer's AS.
    pub as_number: u32,
    /// Only this node peers with it; `None`: every node (a global peer).
    #[serde(default)]
    pub node: Option<String>,
    /// TCP MD5 password (RFC 2385).
    #[serde(default)]
    pub password: Option<String>,
    /// BGP filters, by name, tried in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Most prefixes the peer may announce; more resets the session with
    /// Cease 6/1 (RFC 4486).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefix: Option<u32>,
}

impl BgpPeer {
    /// Checks the name, the AS, the prefix limit and the filter names.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| ResourceError::Invalid {
            kind: "BGPPeer",
            name: self.name.clone(),
            reason,
        };
        check_name(&self.name).map_err(invalid)?;
        check_asn(self.as_number).map_err(|r| invalid(format!("asNumber: {r}")))?;
        if self.max_prefix == Some(0) {
            return Err(invalid(
                "maxPrefix 0 would reset every session; reject routes with a filter".into(),
            ));
        }
        if self.peer_ip.is_unspecified()
            || self.peer_ip.is_multicast()
            || self.peer_ip.is_loopback()
        {
            return Err(invalid(format!(
                "peerIP {} is no peer address",
                self.peer_ip
            )));
        }
        for f in &self.filters {
            check_name(f).map_err(|r| invalid(format!("filter {r}")))?;
        }
        Ok(())
    }
}

impl BgpConfiguration {
    /// Checks the AS.
    pub fn validate(&self) -> Result<()> {
        check_asn(self.as_number).map_err(|reason| ResourceError::Invalid {
            kind: "BGPConfiguration",
            name: "default".into(),
            reason: format!("asNumber: {reason}"),
        })
    }
}

/// `bgppeers/<name>`.
pub fn bgp_peer_key(name: &str) -> String {
    format!("{BGP_PEERS}{name}")
}

/// The cluster BGP settings (defaults when none are stored).
pub fn bgp_config(ds: &impl Datastore) -> crate::datastore::Result<BgpConfiguration> {
    Ok(store::get::<BgpConfiguration>(ds, BGP_CONFIG_KEY)?
        .map(|d| d.value)
        .unwrap_or_default())
}

/// Stores the cluster BGP settings (create or compare-and-swap update).
pub fn set_bgp_config(ds: &impl Datastore, config: &BgpConfiguration) -> Result<()> {
    config.validate()?;
    Ok(match store::get::<BgpConfiguration>(ds, BGP_CONFIG_KEY)? {
        Some(old) => store::update(ds, BGP_CONFIG_KEY, config, &old.revision).map(drop),
        None => store::create(ds, BGP_CONFIG_KEY, config).map(drop),
    }?)
}

/// Every explicit peer, sorted by name.
pub fn bgp_peers(ds: &impl Datastore) -> crate::datastore::Result<Vec<BgpPeer>> {
    Ok(store::list::<BgpPeer>(ds, BGP_PEERS)?
        .into_iter()
        .map(|d| d.value)
        .collect())
}

/// Creates a peer after [`BgpPeer::validate`]; every filter it names must
/// exist. `Conflict` if the name is taken.
pub fn create_bgp_peer(ds: &impl Datastore, peer: &BgpPeer) -> Result<()> {
    peer.validate()?;
    for f in &peer.filters {
        if ds.get(&bgp_filter_key(f))?.is_none() {
            return Err(ResourceError::Invalid {
                kind: "BGPPeer",
                name: peer.name.clone(),
                reason: format!("BGP filter {f} does not exist"),
            });
        }
    }
    Ok(store::create(ds, &bgp_peer_key(&peer.name), peer).map(drop)?)
}

/// Deletes a peer; `Ok(false)` if it did not exist.
pub fn delete_bgp_peer(ds: &impl Datastore, name: &str) -> Result<bool> {
    delete(ds, &bgp_peer_key(name))
}

fn delete(ds: &impl Datastore, key: &str) -> Result<bool> {
    match ds.get(key)? {
        Some(e) => Ok(ds.delete(key, &e.revision).map(|()| true)?),
        None => Ok(false),
    }
}

/// `bgpfilters/<name>`.
pub fn bgp_filter_key(name: &str) -> String {
    format!("{BGP_FILTERS}{name}")
}

/// Every BGP filter, sorted by name.
pub fn bgp_filters(ds: &impl Datastore) -> crate::datastore::Result<Vec<BgpFilter>> {
    Ok(store::list::<BgpFilter>(ds, BGP_FILTERS)?
        .into_iter()
        .map(|d| d.value)
        .collect())
}

/// Creates a filter after [`BgpFilter::validate`]; `Conflict` if the name is taken.
pub fn create_bgp_filter(ds: &impl Datastore, filter: &BgpFilter) -> Result<()> {
    filter.validate().map_err(|reason| ResourceError::Invalid {
        kind: "BGPFilter",
        name: filter.name.clone(),
        reason,
    })?;
    Ok(store::create(ds, &bgp_filter_key(&filter.name), filter).map(drop)?)
}

/// Deletes a filter no peer names; `Ok(false)` if it did not exist.
pub fn delete_bgp_filter(ds: &impl Datastore, name: &str) -> Result<bool> {
    if let Some(p) = bgp_peers(ds)?
        .into_iter()
        .find(|p| p.filters.iter().any(|f| f == name))
    {
        return Err(ResourceError::InUse {
            filter: name.into(),
            peer: p.name,
        });
    }
    delete(ds, &bgp_filter_key(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDatastore;

    #[test]
    fn bgp_settings_default_to_a_64512_full_mesh_and_round_trip() {
        let ds = MemDatastore::default();
        assert_eq!(bgp_config(&ds).unwrap(), BgpConfiguration::default());
        let c = BgpConfiguration {
            as_number: 65001,
            node_to_node_mesh: false,
        };
        set_bgp_config(&ds, &c).unwrap();
        set_bgp_config(&ds, &c).unwrap();
        assert_eq!(bgp_config(&ds).unwrap(), c);
    }

    #[test]
    fn peers_are_created_once_listed_and_deleted() {
        let ds = MemDatastore::default();
        let p = BgpPeer {
            name: "tor".into(),
            peer_ip: "10.98.0.254".parse().unwrap(),
            as_number: 65000,
            node: None,
            password: None,
            filters: vec![],
            max_prefix: None,
        };
        create_bgp_peer(&ds, &p).unwrap();
        assert!(create_bgp_peer(&ds, &p).is_err());
        assert_eq!(bgp_peers(&ds).unwrap(), vec![p]);
        assert!(delete_bgp_peer(&ds, "tor").unwrap());
        assert!(!delete_bgp_peer(&ds, "tor").unwrap());
    }

    fn peer(name: &str, asn: u32) -> BgpPeer {
        BgpPeer {
            name: name.into(),
            peer_ip: "10.98.0.254".parse().unwrap(),
            as_number: asn,
            node: None,
            password: None,
            filters: vec![],
            max_prefix: None,
        }
    }

    #[test]
    fn a_peer_with_as_0_or_as_trans_is_refused() {
        let ds = MemDatastore::default();
        for asn in [0, 23456] {
            let err = create_bgp_peer(&ds, &peer("tor", asn)).unwrap_err();
            assert!(matches!(err, ResourceError::Invalid { .. }), "{err}");
            assert!(err.to_string().contains(&asn.to_string()), "{err}");
        }
        assert!(bgp_peers(&ds).unwrap().is_empty());
        assert!(create_bgp_peer(&ds, &peer("tor", 4_200_000_000)).is_ok());
        let zero = BgpConfiguration {
            as_number: 0,
            node_to_node_mesh: true,
        };
        assert!(set_bgp_config(&ds, &zero).is_err());
        assert_eq!(bgp_config(&ds).unwrap().as_number, DEFAULT_ASN);
    }

    #[test]
    fn peers_with_bad_names_limits_or_addresses_are_refused() {
        let ds = MemDatastore::default();
        let mut p = peer("tor", 65000);
        p.max_prefix = Some(0);
        assert!(create_bgp_peer(&ds, &p).is_err());
        let mut p = peer("a/b", 65000);
        assert!(create_bgp_peer(&ds, &p).is_err());
        p.name = "tor".into();
        p.peer_ip = "224.0.0.5".parse().unwrap();
        assert!(create_bgp_peer(&ds, &p).is_err());
    }

    #[test]
    fn peers_name_existing_filters_and_a_named_filter_cannot_go() {
        let ds = MemDatastore::default();
        let mut p = peer("tor", 65000);
        p.filters = vec!["allow-default".into()];
        let err = create_bgp_peer(&ds, &p).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let f = BgpFilter {
            name: "allow-default".into(),
            import_v4: vec![BgpFilterRule {
                action: FilterAction::Accept,
                cidr: Some("0.0.0.0/0".parse().unwrap()),
                match_operator: Some(MatchOperator::Equal),
                prefix_length: None,
            }],
            export_v4: vec![],
        };
        create_bgp_filter(&ds, &f).unwrap();
        assert!(create_bgp_filter(&ds, &f).is_err(), "the name is taken");
        create_bgp_peer(&ds, &p).unwrap();
        assert_eq!(bgp_filters(&ds).unwrap(), vec![f]);
        let err = delete_bgp_filter(&ds, "allow-default").unwrap_err();
        assert!(matches!(err, ResourceError::InUse { .. }), "{err}");
        delete_bgp_peer(&ds, "tor").unwrap();
        assert!(delete_bgp_filter(&ds, "allow-default").unwrap());
        assert!(!delete_bgp_filter(&ds, "allow-default").unwrap());
    }
}
