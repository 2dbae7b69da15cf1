//! Kubernetes objects to datastore entries, pure: what a read of the
//! `kubernetes` backend returns for one object. The backend's get and list
//! use it, and so do watches of the same objects (`tabby-node`'s cluster
//! view with `cluster = "kubernetes"`), so both read a document alike.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::DynamicObject;
use serde_json::Value;

use super::crd::Kind;
use super::names::Naming;
use super::{corrupt, nodes, revision_of, SCOPE_LABEL};
use crate::datastore::{Entry, Result};
use crate::store::NODES;

/// The label selector of every list and watch of `scope` (test scopes;
/// `None`: only unscoped objects, which is every object of a real cluster).
pub fn selector(scope: Option<&str>) -> String {
    match scope {
        Some(scope) => format!("{SCOPE_LABEL}={scope}"),
        None => format!("!{SCOPE_LABEL}"),
    }
}

/// A name under `scope` without its `<scope>.` prefix; `None` when the
/// name is not of the scope.
pub fn unscoped<'n>(name: &'n str, scope: Option<&str>) -> Option<&'n str> {
    match scope {
        Some(scope) => name.strip_prefix(scope)?.strip_prefix('.'),
        None => Some(name),
    }
}

/// The key an object of `kind` stores: its `tabby.dev/key` annotation,
/// else (objects written by hand) derived from its name where the kind allows.
pub fn key_of(kind: &Kind, object: &DynamicObject, scope: Option<&str>) -> Option<String> {
    if let Some(key) = object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::KEY_ANNOTATION))
    {
        return Some(key.clone());
    }
    let name = unscoped(object.metadata.name.as_deref()?, scope)?;
    match kind.naming {
        Naming::Fixed(fixed) => (name == fixed).then(|| kind.key.to_string()),
        Naming::Generic => Some(format!("{}{name}", kind.key)),
        Naming::Cidr | Naming::Affinity => None,
    }
}

/// The entry of a custom resource stored under `key`: its spec and resourceVersion.
pub fn entry(key: String, object: &DynamicObject) -> Result<Entry> {
    let spec = object
        .data
        .get("spec")
        .ok_or_else(|| corrupt(&key, "the object has no spec"))?;
    let value = serde_json::to_vec(spec).map_err(|e| corrupt(&key, e.to_string()))?;
    let revision = revision_of(&key, &object.metadata)?;
    Ok(Entry {
        key,
        value,
        revision,
    })
}

/// The entry of a custom resource of `kind` in `scope`; `None` when it has
/// no key (not Tabby's document).
pub fn object_entry(
    kind: &Kind,
    object: &DynamicObject,
    scope: Option<&str>,
) -> Option<Result<Entry>> {
    key_of(kind, object, scope).map(|key| entry(key, object))
}

/// The node document of a Kubernetes Node in `scope` with its name
/// (unscoped); `None` when the Node is not of the scope or not registered
/// with Tabby ([`nodes::doc_of`]).
pub fn node_doc(node: &Node, scope: Option<&str>) -> Option<(String, Value)> {
    let name = unscoped(node.metadata.name.as_deref()?, scope)?;
    let empty = BTreeMap::new();
    let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let doc = nodes::doc_of(name, annotations, labels, SCOPE_LABEL)?;
    Some((name.to_string(), doc))
}

/// The entry `nodes/<name>` of the document `doc` of `node`.
pub fn node_entry(name: &str, doc: &Value, node: &Node) -> Result<Entry> {
    let key = format!("{NODES}{name}");
    let revision = revision_of(&key, &node.metadata)?;
    let value = serde_json::to_vec(doc).map_err(|e| corrupt(&key, e.to_string()))?;
    Ok(Entry {
        key,
        value,
        revision,
    })
}
