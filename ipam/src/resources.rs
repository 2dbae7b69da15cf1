//! Cluster resources beside IPAM that live in the same datastore: the BGP
//! configuration and explicit BGP peers (Calico's `BGPConfiguration` and
//! `BGPPeer`), read by `tabby-node` and written by `tabbyctl bgp ...`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::datastore::{Datastore, Result};
use crate::store;

/// Key of the cluster BGP settings.
pub const BGP_CONFIG_KEY: &str = "config/bgp";
/// Prefix of every explicit BGP peer.
pub const BGP_PEERS: &str = "bgppeers/";

/// The default AS of every node, as Calico's.
pub const DEFAULT_ASN: u32 = 64512;

/// Cluster BGP settings (`BGPConfiguration` named default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// `bgppeers/<name>`.
pub fn bgp_peer_key(name: &str) -> String {
    format!("{BGP_PEERS}{name}")
}

/// The cluster BGP settings (defaults when none are stored).
pub fn bgp_config(ds: &impl Datastore) -> Result<BgpConfiguration> {
    Ok(store::get::<BgpConfiguration>(ds, BGP_CONFIG_KEY)?
        .map(|d| d.value)
        .unwrap_or_default())
}

/// Stores the cluster BGP settings (create or compare-and-swap update).
pub fn set_bgp_config(ds: &impl Datastore, config: &BgpConfiguration) -> Result<()> {
    match store::get::<BgpConfiguration>(ds, BGP_CONFIG_KEY)? {
        Some(old) => store::update(ds, BGP_CONFIG_KEY, config, &old.revision).map(drop),
        None => store::create(ds, BGP_CONFIG_KEY, config).map(drop),
    }
}

/// Every explicit peer, sorted by name.
pub fn bgp_peers(ds: &impl Datastore) -> Result<Vec<BgpPeer>> {
    Ok(store::list::<BgpPeer>(ds, BGP_PEERS)?
        .into_iter()
        .map(|d| d.value)
        .collect())
}

/// Creates a peer; `Conflict` if the name is taken.
pub fn create_bgp_peer(ds: &impl Datastore, peer: &BgpPeer) -> Result<()> {
    store::create(ds, &bgp_peer_key(&peer.name), peer).map(drop)
}

/// Deletes a peer; `Ok(false)` if it did not exist.
pub fn delete_bgp_peer(ds: &impl Datastore, name: &str) -> Result<bool> {
    let key = bgp_peer_key(name);
    match ds.get(&key)? {
        Some(e) => ds.delete(&key, &e.revision).map(|()| true),
        None => Ok(false),
    }
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
        };
        create_bgp_peer(&ds, &p).unwrap();
        assert!(create_bgp_peer(&ds, &p).is_err());
        assert_eq!(bgp_peers(&ds).unwrap(), vec![p]);
        assert!(delete_bgp_peer(&ds, "tor").unwrap());
        assert!(!delete_bgp_peer(&ds, "tor").unwrap());
    }
}
