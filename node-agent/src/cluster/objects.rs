//! Watched objects to a [`ClusterView`], pure.
//!
//! Each object becomes the datastore entry a read of the `kubernetes`
//! backend would return ([`tabby_ipam::kubernetes::objects`]: the same
//! scope, key and node-annotation rules), and the view is read from those
//! entries by [`load_view`], the function the polling agent uses: a new
//! field in a document, a node or the view reaches both sources alike.
//! One addition: a registered Node without `tabby.dev/bgp-address` gets
//! its InternalIP as its BGP address ([`with_internal_ip`]).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use kube::api::DynamicObject;
use serde_json::Value;
use tabby_errors::chain;
use tabby_ipam::datastore::Datastore as _;
use tabby_ipam::kubernetes::crd::{Kind, KINDS};
use tabby_ipam::kubernetes::objects::{node_doc, node_entry, object_entry};
use tabby_ipam::resources::{BGP_CONFIG_KEY, BGP_FILTERS, BGP_PEERS};
use tabby_ipam::store::{AFFINITIES, BLOCKS, POOLS};
use tabby_ipam::{DatastoreError, MemDatastore};
use tracing::warn;

use crate::desired::ClusterView;
use crate::error::{AgentError, Result};
use crate::register::load_view;

/// The key prefixes of the CRDs the view needs. IPAMHandles (one per pod)
/// and IPAMConfig are not watched: the agent reads neither.
pub const WATCHED: [&str; 6] = [
    POOLS,
    BLOCKS,
    AFFINITIES,
    BGP_CONFIG_KEY,
    BGP_PEERS,
    BGP_FILTERS,
];

/// The CRD kinds to watch, in [`WATCHED`] order.
pub fn watched_kinds() -> Vec<&'static Kind> {
    WATCHED
        .iter()
        .filter_map(|key| KINDS.iter().find(|k| k.key == *key))
        .collect()
}

/// The document field of a node's BGP address.
const ADDRESS: &str = "address";

/// A Node's BGP address when it has no `tabby.dev/bgp-address`: its first
/// IPv4 InternalIP, else its first InternalIP.
pub fn internal_ip(node: &Node) -> Option<IpAddr> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    let internal: Vec<IpAddr> = addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    internal
        .iter()
        .find(|a| a.is_ipv4())
        .or(internal.first())
        .copied()
}

/// Fills a node document's missing address with the Node's InternalIP.
pub fn with_internal_ip(doc: &mut Value, node: &Node) {
    let Value::Object(fields) = doc else { return };
    if fields.get(ADDRESS).is_none_or(Value::is_null) {
        if let Some(ip) = internal_ip(node) {
            fields.insert(ADDRESS.into(), Value::String(ip.to_string()));
        }
    }
}

/// The view of `nodes` and of `objects` (each with its kind), in `scope`.
pub fn view_of<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    objects: impl IntoIterator<Item = (&'a Kind, &'a DynamicObject)>,
    scope: Option<&str>,
) -> Result<ClusterView> {
    let mem = MemDatastore::new();
    let put = |entry: tabby_ipam::datastore::Entry| match mem.create(&entry.key, &entry.value) {
        Err(DatastoreError::Conflict { key }) => {
            warn!(%key, "two objects hold one key; keeping the first");
            Ok(())
        }
        other => other.map(drop),
    };
    for node in nodes {
        if let Some((name, mut doc)) = node_doc(node, scope) {
            with_internal_ip(&mut doc, node);
            put(node_entry(&name, &doc, node).map_err(AgentError::WatchedView)?)
                .map_err(AgentError::WatchedView)?;
        }
    }
    for (kind, object) in objects {
        match object_entry(kind, object, scope) {
            Some(entry) => {
                put(entry.map_err(AgentError::WatchedView)?).map_err(AgentError::WatchedView)?
            }
            None => warn!(
                name = ?object.metadata.name,
                kind = %kind.kind_name(),
                "skipping an object without a tabby.dev/key annotation"
            ),
        }
    }
    load_view(&mem).map_err(|e| match e {
        AgentError::ReadView(source) => AgentError::WatchedView(source),
        other => other,
    })
}

/// [`view_of`], logging why it failed.
pub fn view_or_log<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    objects: impl IntoIterator<Item = (&'a Kind, &'a DynamicObject)>,
    scope: Option<&str>,
) -> Option<ClusterView> {
    view_of(nodes, objects, scope)
        .inspect_err(
            |e| warn!(error = %chain(e), "the watched objects make no view; keeping the last"),
        )
        .ok()
}

#[cfg(test)]
mod tests;
