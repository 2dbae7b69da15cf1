//! `nodes/<name>` documents as annotations on the Kubernetes Node.
//!
//! A node's Tabby facts are annotations `tabby.dev/...` on the Node object
//! (one per field, [`NODE_FIELDS`]); its labels are the Node's own labels,
//! read for pool node selectors and never written by Tabby on an existing
//! Node (they belong to the kubelet and the operator). The document
//! exists when the Node carries [`REGISTERED`]:
//!
//! - get / list: Nodes with `tabby.dev/registered`; others are not Tabby nodes (yet).
//! - create on an existing Node without the marker: registers it (patches
//!   the annotations under a resourceVersion precondition); with the
//!   marker: `Conflict`. On a missing Node: creates a Node object with the
//!   document's labels (clusters without kubelets: tests, the namespace
//!   lab; needs `create` on nodes, which a plugin's role need not grant,
//!   because in a real cluster the kubelet registers the Node before any
//!   pod can be scheduled on it).
//! - update: patches the annotations (a field set to null or left out is
//!   removed) under a resourceVersion precondition; a missing Node is `NotFound`.
//! - delete: removes Tabby's annotations (the Node itself stays).
//!
//! The resourceVersion of the Node is the document's revision: a kubelet
//! status update in between makes a compare-and-swap conflict, and the
//! caller re-reads, as after any other writer.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{json, Map, Value};

/// The marker annotation: this Node is registered with Tabby.
pub const REGISTERED: &str = "tabby.dev/registered";

/// One field of the node document and the annotation that holds it.
#[derive(Debug, Clone, Copy)]
pub struct NodeField {
    /// The document field (`address`).
    pub field: &'static str,
    /// The annotation (`tabby.dev/bgp-address`).
    pub annotation: &'static str,
    /// A JSON number (stored as its decimal text).
    pub number: bool,
}

/// The document fields kept as annotations; a new field is one more line.
pub static NODE_FIELDS: &[NodeField] = &[
    NodeField {
        field: "address",
        annotation: "tabby.dev/bgp-address",
        number: false,
    },
    NodeField {
        field: "asn",
        annotation: "tabby.dev/as-number",
        number: true,
    },
    NodeField {
        field: "ipv4Address",
        annotation: "tabby.dev/ipv4-address",
        number: false,
    },
    NodeField {
        field: "ipv4VXLANTunnelAddr",
        annotation: "tabby.dev/ipv4-vxlan-tunnel-addr",
        number: false,
    },
    NodeField {
        field: "vxlanTunnelMACAddr",
        annotation: "tabby.dev/vxlan-tunnel-mac-addr",
        number: false,
    },
    NodeField {
        field: "ipv4IPIPTunnelAddr",
        annotation: "tabby.dev/ipv4-ipip-tunnel-addr",
        number: false,
    },
];

/// The document of a Node, `None` when it is not registered. `hidden` is a
/// label left out of the document (the test scope).
pub fn doc_of(
    name: &str,
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
    hidden: &str,
) -> Option<Value> {
    annotations.get(REGISTERED)?;
    let mut doc = Map::new();
    doc.insert("name".into(), json!(name));
    for f in NODE_FIELDS {
        if let Some(text) = annotations.get(f.annotation) {
            let value = match f.number {
                true => text
                    .parse::<u64>()
                    .map_or_else(|_| json!(text), |n| json!(n)),
                false => json!(text),
            };
            doc.insert(f.field.into(), value);
        }
    }
    let labels: Map<String, Value> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != hidden)
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    doc.insert("labels".into(), Value::Object(labels));
    Some(Value::Object(doc))
}

/// What a node document writes: every Tabby annotation (`None` removes
/// it), and the labels (used only when the Node is created).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWrite {
    /// Annotation -> value, `None` to remove.
    pub annotations: BTreeMap<String, Option<String>>,
    /// The document's labels.
    pub labels: BTreeMap<String, String>,
}

/// Splits a node document into annotations and labels; refuses fields no
/// annotation carries, so nothing is dropped silently.
pub fn write_of(name: &str, doc: &[u8]) -> Result<NodeWrite, String> {
    let Value::Object(doc) = serde_json::from_slice(doc).map_err(|e| format!("not JSON: {e}"))?
    else {
        return Err("a node document must be a JSON object".into());
    };
    let mut annotations: BTreeMap<String, Option<String>> = NODE_FIELDS
        .iter()
        .map(|f| (f.annotation.to_string(), None))
        .collect();
    annotations.insert(REGISTERED.into(), Some("true".into()));
    let mut labels = BTreeMap::new();
    for (field, value) in doc {
        match (field.as_str(), value) {
            ("name", Value::String(n)) if n == name => {}
            ("name", other) => return Err(format!("name {other} does not match the key")),
            ("labels", Value::Object(map)) => {
                for (k, v) in map {
                    let Value::String(v) = v else {
                        return Err(format!("label {k} is not a string"));
                    };
                    labels.insert(k, v);
                }
            }
            ("labels", Value::Null) => {}
            (field, value) => {
                let f = NODE_FIELDS
                    .iter()
                    .find(|f| f.field == field)
                    .ok_or_else(|| format!("field {field} has no tabby.dev annotation"))?;
                let text = match (&value, f.number) {
                    (Value::Null, _) => None,
                    (Value::Number(n), true) => Some(n.to_string()),
                    (Value::String(s), false) => Some(s.clone()),
                    _ => return Err(format!("field {field} has an unexpected type: {value}")),
                };
                annotations.insert(f.annotation.to_string(), text);
            }
        }
    }
    Ok(NodeWrite {
        annotations,
        labels,
    })
}

/// The merge patch that writes `write`'s annotations at `revision`.
pub fn annotation_patch(write: &NodeWrite, revision: &str) -> Value {
    json!({
        "metadata": {
            "resourceVersion": revision,
            "annotations": write.annotations,
        }
    })
}

/// The merge patch that removes every Tabby annotation at `revision`.
pub fn unregister_patch(revision: &str) -> Value {
    let mut annotations: BTreeMap<&str, Option<&str>> =
        NODE_FIELDS.iter().map(|f| (f.annotation, None)).collect();
    annotations.insert(REGISTERED, None);
    json!({
        "metadata": {
            "resourceVersion": revision,
            "annotations": annotations,
        }
    })
}

/// Patches a Node (JSON merge patch).
pub async fn patch(api: &Api<Node>, name: &str, patch: Value) -> kube::Result<Node> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// Creates a Node carrying `write` (for clusters without kubelets).
pub async fn create(
    api: &Api<Node>,
    name: &str,
    write: &NodeWrite,
    extra_labels: BTreeMap<String, String>,
) -> kube::Result<Node> {
    let mut labels = write.labels.clone();
    labels.extend(extra_labels);
    let annotations = write
        .annotations
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
        .collect();
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &node).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_document_round_trips_through_annotations() {
        let doc = br#"{"name":"n1","address":"10.0.0.1","asn":64512,"labels":{"zone":"a"}}"#;
        let write = write_of("n1", doc).unwrap();
        assert_eq!(
            write.annotations["tabby.dev/bgp-address"].as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            write.annotations["tabby.dev/as-number"].as_deref(),
            Some("64512")
        );
        assert_eq!(write.annotations[REGISTERED].as_deref(), Some("true"));
        let annotations: BTreeMap<String, String> = write
            .annotations
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect();
        let mut labels = write.labels.clone();
        labels.insert("tabby.dev/scope".into(), "t1".into());
        let back = doc_of("n1", &annotations, &labels, "tabby.dev/scope").unwrap();
        assert_eq!(back, serde_json::from_slice::<Value>(doc).unwrap());
    }

    #[test]
    fn the_encapsulation_fields_of_a_node_round_trip_through_annotations() {
        let node = crate::Node {
            name: "n1".into(),
            address: Some("10.98.0.1".parse().unwrap()),
            ipv4_address: Some("10.98.0.1/24".parse().unwrap()),
            ipv4_vxlan_tunnel_addr: Some("10.244.0.0".parse().unwrap()),
            vxlan_tunnel_mac_addr: Some("66:01:02:03:04:05".into()),
            ipv4_ipip_tunnel_addr: Some("10.245.0.1".parse().unwrap()),
            ..Default::default()
        };
        let write = write_of("n1", &serde_json::to_vec(&node).unwrap()).unwrap();
        assert_eq!(
            write.annotations["tabby.dev/ipv4-address"].as_deref(),
            Some("10.98.0.1/24")
        );
        assert_eq!(
            write.annotations["tabby.dev/vxlan-tunnel-mac-addr"].as_deref(),
            Some("66:01:02:03:04:05")
        );
        let annotations: BTreeMap<String, String> = write
            .annotations
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect();
        let back = doc_of("n1", &annotations, &BTreeMap::new(), "").unwrap();
        assert_eq!(serde_json::from_value::<crate::Node>(back).unwrap(), node);
    }

    #[test]
    fn unregistered_nodes_have_no_document_and_unknown_fields_are_refused() {
        let none = BTreeMap::new();
        assert!(doc_of("n", &none, &none, "").is_none());
        assert!(write_of("n", br#"{"name":"n","colour":"red"}"#)
            .unwrap_err()
            .contains("colour"));
        assert!(write_of("n", br#"{"name":"other"}"#).is_err());
        assert!(write_of("n", br#"{"name":"n","asn":"x"}"#).is_err());
        // A field set to null (or left out) removes its annotation.
        let w = write_of("n", br#"{"name":"n","address":null}"#).unwrap();
        assert_eq!(w.annotations["tabby.dev/bgp-address"], None);
        assert_eq!(w.annotations["tabby.dev/as-number"], None);
    }

    #[test]
    fn unregistering_removes_every_tabby_annotation_at_a_revision() {
        let p = unregister_patch("42");
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert!(p["metadata"]["annotations"][REGISTERED].is_null());
        assert_eq!(
            p["metadata"]["annotations"].as_object().unwrap().len(),
            NODE_FIELDS.len() + 1
        );
    }
}
