//! Registering this node (name, BGP address, AS) in the datastore and
//! reading the cluster view the agent acts on.

use ipnetwork::IpNetwork;
use tabby_ipam::datastore::Datastore;
use tabby_ipam::report::Snapshot;
use tabby_ipam::store::{self, node_key};
use tabby_ipam::{resources, DatastoreError, Node};

use crate::config::AgentConfig;
use crate::desired::ClusterView;
use crate::error::{AgentError, Result};

/// Creates or updates `nodes/<name>` with this node's address and AS and
/// its underlay address with prefix (`underlay`, from the uplink: what
/// CrossSubnet compares), keeping what others wrote (labels, tunnel
/// addresses). Retries on conflicts.
pub fn register_node(
    ds: &impl Datastore,
    cfg: &AgentConfig,
    underlay: Option<IpNetwork>,
) -> Result<Node> {
    try_register(ds, cfg, underlay).map_err(|source| AgentError::Register {
        node: cfg.node_name.clone(),
        source,
    })
}

fn try_register(
    ds: &impl Datastore,
    cfg: &AgentConfig,
    underlay: Option<IpNetwork>,
) -> Result<Node, DatastoreError> {
    let key = node_key(&cfg.node_name);
    for _ in 0..100 {
        let result = match store::get::<Node>(ds, &key)? {
            Some(doc) => {
                let mut node = doc.value.clone();
                node.address = Some(cfg.bgp_address);
                node.asn = cfg.as_number;
                node.ipv4_address = underlay;
                if node == doc.value {
                    return Ok(node);
                }
                store::update(ds, &key, &node, &doc.revision).map(|_| node)
            }
            None => {
                let node = Node {
                    name: cfg.node_name.clone(),
                    address: Some(cfg.bgp_address),
                    asn: cfg.as_number,
                    ipv4_address: underlay,
                    ..Default::default()
                };
                store::create(ds, &key, &node).map(|_| node)
            }
        };
        match result {
            Ok(node) => return Ok(node),
            Err(DatastoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(DatastoreError::Conflict { key })
}

/// Reads everything the agent acts on.
pub fn load_view(ds: &impl Datastore) -> Result<ClusterView> {
    let read = || -> Result<ClusterView, DatastoreError> {
        Ok(ClusterView {
            snapshot: Snapshot::load(ds)?,
            bgp: resources::bgp_config(ds)?,
            peers: resources::bgp_peers(ds)?,
            filters: resources::bgp_filters(ds)?,
        })
    };
    read().map_err(AgentError::ReadView)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tabby_ipam::mem::MemDatastore;

    fn cfg() -> AgentConfig {
        AgentConfig::parse("node_name = \"node-1\"\nbgp_address = \"10.98.0.1\"\n").unwrap()
    }

    #[test]
    fn registration_creates_the_node_then_updates_it_keeping_labels() {
        let ds = MemDatastore::default();
        let underlay = Some("10.98.0.1/24".parse().unwrap());
        let n = register_node(&ds, &cfg(), underlay).unwrap();
        assert_eq!(n.address, Some("10.98.0.1".parse().unwrap()));
        assert_eq!(n.ipv4_address, underlay);
        // Someone labels the node; a restart with a new address keeps the label.
        let doc = store::get::<Node>(&ds, "nodes/node-1").unwrap().unwrap();
        let mut labelled = doc.value.clone();
        labelled.labels.insert("rack".into(), "r1".into());
        store::update(&ds, "nodes/node-1", &labelled, &doc.revision).unwrap();
        let mut c = cfg();
        c.bgp_address = "10.98.0.9".parse().unwrap();
        let n = register_node(&ds, &c, None).unwrap();
        assert_eq!(n.address, Some("10.98.0.9".parse().unwrap()));
        assert_eq!(n.labels.get("rack").map(String::as_str), Some("r1"));
        let view = load_view(&ds).unwrap();
        assert_eq!(view.snapshot.nodes.len(), 1);
        assert!(view.bgp.node_to_node_mesh);
    }
}
