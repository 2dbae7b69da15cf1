//! The CRDs `crd.tabby.dev/v1` (cluster-scoped, like Calico's) and the
//! table that maps datastore keys to them.
//!
//! The spec of each custom resource *is* the stored document (the typed
//! structs of [`crate::types`] and [`crate::resources`], flattened into the
//! spec), so the CRD schemas are generated from the same Rust types the
//! allocator reads: `kubectl get ipamblocks -o yaml` shows what IPAM sees.
//!
//! A new kind is one CRD wrapper below and one line in [`KINDS`].

// Several `printcolumn(type_ = "string", ...)` on one type read as duplicates to clippy.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::ApiResource;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::names::Naming;
use crate::resources::{
    BgpConfiguration, BgpFilter, BgpPeer, BGP_CONFIG_KEY, BGP_FILTERS, BGP_PEERS,
};
use crate::store::{AFFINITIES, BLOCKS, CONFIG_KEY, HANDLES, POOLS};
use crate::types::{self, Block, Handle, IpPool, IpamConfig};

/// The API group of every Tabby CRD.
pub const GROUP: &str = "crd.tabby.dev";

/// `IPPool`: a cluster-wide address pool.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "IPPool",
    plural = "ippools"
)]
#[kube(printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"))]
#[kube(printcolumn(name = "Block", type_ = "integer", json_path = ".spec.blockSize"))]
#[kube(printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"))]
pub struct IpPoolSpec {
    /// The pool document.
    #[serde(flatten)]
    pub pool: IpPool,
}

/// `IPAMBlock`: one block of a pool with its allocation table.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "IPAMBlock",
    plural = "ipamblocks"
)]
#[kube(printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"))]
#[kube(printcolumn(name = "Affinity", type_ = "string", json_path = ".spec.affinity"))]
pub struct IpamBlockSpec {
    /// The block document.
    #[serde(flatten)]
    pub block: Block,
}

/// `BlockAffinity`: a node's claim on a block.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "BlockAffinity",
    plural = "blockaffinities"
)]
#[kube(printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"))]
#[kube(printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"))]
#[kube(printcolumn(name = "State", type_ = "string", json_path = ".spec.state"))]
pub struct BlockAffinitySpec {
    /// The affinity document.
    #[serde(flatten)]
    pub affinity: types::BlockAffinity,
}

/// `IPAMHandle`: the owner of allocations, with its count per block.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "IPAMHandle",
    plural = "ipamhandles"
)]
#[kube(printcolumn(name = "Handle", type_ = "string", json_path = ".spec.handleId"))]
pub struct IpamHandleSpec {
    /// The handle document.
    #[serde(flatten)]
    pub handle: Handle,
}

/// `IPAMConfig` (one, named `default`): cluster IPAM settings.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "IPAMConfig",
    plural = "ipamconfigs"
)]
pub struct IpamConfigSpec {
    /// The settings document.
    #[serde(flatten)]
    pub config: IpamConfig,
}

/// `BGPConfiguration` (one, named `default`): cluster BGP settings.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "BGPConfiguration",
    plural = "bgpconfigurations"
)]
pub struct BgpConfigurationSpec {
    /// The settings document.
    #[serde(flatten)]
    pub config: BgpConfiguration,
}

/// `BGPPeer`: an explicit BGP peer, global or for one node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "BGPPeer",
    plural = "bgppeers"
)]
#[kube(printcolumn(name = "Peer", type_ = "string", json_path = ".spec.peerIp"))]
#[kube(printcolumn(name = "AS", type_ = "integer", json_path = ".spec.asNumber"))]
#[kube(printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"))]
pub struct BgpPeerSpec {
    /// The peer document.
    #[serde(flatten)]
    pub peer: BgpPeer,
}

/// `BGPFilter`: accept/reject rules for the routes exchanged with peers.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "crd.tabby.dev",
    version = "v1",
    kind = "BGPFilter",
    plural = "bgpfilters"
)]
pub struct BgpFilterSpec {
    /// The filter document.
    #[serde(flatten)]
    pub filter: BgpFilter,
}

/// Which node a document belongs to (for the `tabby.dev/node` label).
pub type NodeOf = fn(&Value) -> Option<String>;

/// One kind of document stored as a custom resource.
#[derive(Clone, Copy)]
pub struct Kind {
    /// The key prefix (`blocks/`), or the whole key of a singleton (`config/ipam`).
    pub key: &'static str,
    /// How the rest of the key becomes an object name.
    pub naming: Naming,
    /// The API resource (group, version, kind, plural).
    pub resource: fn() -> ApiResource,
    /// The CRD, generated from the Rust types.
    pub crd: fn() -> CustomResourceDefinition,
    /// Checks a document against the spec type; returns it as the spec.
    pub to_spec: fn(&[u8]) -> Result<Value, String>,
    /// The node a document belongs to, if any: labelled `tabby.dev/node`.
    pub node_of: Option<NodeOf>,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key)
    }
}

macro_rules! kind {
    ($cr:ty, $spec:ty, $key:expr, $naming:expr, $node_of:expr) => {
        Kind {
            key: $key,
            naming: $naming,
            resource: || ApiResource::erase::<$cr>(&()),
            crd: <$cr as CustomResourceExt>::crd,
            to_spec: to_spec::<$spec>,
            node_of: $node_of,
        }
    };
}

/// Every kind, by key prefix. The singletons' keys are whole keys.
pub static KINDS: &[Kind] = &[
    kind!(IPPool, IpPoolSpec, POOLS, Naming::Generic, None),
    kind!(
        IPAMBlock,
        IpamBlockSpec,
        BLOCKS,
        Naming::Cidr,
        Some(block_node)
    ),
    kind!(
        BlockAffinity,
        BlockAffinitySpec,
        AFFINITIES,
        Naming::Affinity,
        Some(affinity_node)
    ),
    kind!(IPAMHandle, IpamHandleSpec, HANDLES, Naming::Generic, None),
    kind!(
        IPAMConfig,
        IpamConfigSpec,
        CONFIG_KEY,
        Naming::Fixed("default"),
        None
    ),
    kind!(
        BGPConfiguration,
        BgpConfigurationSpec,
        BGP_CONFIG_KEY,
        Naming::Fixed("default"),
        None
    ),
    kind!(BGPPeer, BgpPeerSpec, BGP_PEERS, Naming::Generic, None),
    kind!(BGPFilter, BgpFilterSpec, BGP_FILTERS, Naming::Generic, None),
];

impl Kind {
    /// Whether this kind stores one document under exactly its key.
    pub fn is_singleton(&self) -> bool {
        matches!(self.naming, Naming::Fixed(_))
    }

    /// The rest of `key` after this kind's prefix, if `key` is of this kind.
    pub fn rest_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        if self.is_singleton() {
            return (key == self.key).then_some("");
        }
        key.strip_prefix(self.key).filter(|rest| !rest.is_empty())
    }

    /// Whether some key of this kind may start with `prefix`.
    pub fn may_match(&self, prefix: &str) -> bool {
        self.key.starts_with(prefix) || prefix.starts_with(self.key)
    }

    /// The kind's name (`IPAMBlock`).
    pub fn kind_name(&self) -> String {
        (self.resource)().kind
    }
}

/// The kind that stores `key`, with the rest of the key.
pub fn kind_of(key: &str) -> Option<(&'static Kind, &str)> {
    KINDS
        .iter()
        .find_map(|kind| kind.rest_of(key).map(|rest| (kind, rest)))
}

/// Every CRD.
pub fn crds() -> Vec<CustomResourceDefinition> {
    KINDS.iter().map(|kind| (kind.crd)()).collect()
}

/// The CRDs as one multi-document YAML file (`deploy/crds.yaml`).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Tabby's CRDs (crd.tabby.dev/v1), generated from the Rust types by\n\
         # `tabbyctl crds`; regenerate with TABBY_UPDATE_GOLDEN=1 cargo test -p tabby-ipam --test crds.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd).expect("a CRD serializes to YAML"));
    }
    out
}

/// Decodes `doc` as spec `S` and re-encodes it; refuses a document with a
/// field the schema does not carry (the apiserver would prune it silently).
fn to_spec<S: DeserializeOwned + Serialize>(doc: &[u8]) -> Result<Value, String> {
    let input: Value = serde_json::from_slice(doc).map_err(|e| format!("not JSON: {e}"))?;
    let typed: S = serde_json::from_value(input.clone()).map_err(|e| e.to_string())?;
    let spec = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match missing_field(&input, &spec, "") {
        Some(path) => Err(format!("field {path} is not part of the CRD schema")),
        None => Ok(spec),
    }
}

/// The first path in `input` whose value `output` does not carry.
fn missing_field(input: &Value, output: &Value, path: &str) -> Option<String> {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => i.iter().find_map(|(k, v)| {
            let here = format!("{path}.{k}");
            match o.get(k) {
                Some(w) => missing_field(v, w, &here),
                None if v.is_null() => None,
                None => Some(here),
            }
        }),
        (Value::Array(i), Value::Array(o)) if i.len() == o.len() => i
            .iter()
            .zip(o)
            .enumerate()
            .find_map(|(n, (v, w))| missing_field(v, w, &format!("{path}[{n}]"))),
        (Value::Array(_), _) => Some(path.to_string()),
        _ => None,
    }
}

fn block_node(spec: &Value) -> Option<String> {
    spec.get("affinity")?
        .as_str()
        .and_then(crate::block::affinity_node)
        .map(str::to_string)
}

fn affinity_node(spec: &Value) -> Option<String> {
    spec.get("node")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_kind_is_found_and_singletons_match_whole_keys() {
        assert_eq!(
            kind_of("blocks/10.0.0.0-26").unwrap().0.kind_name(),
            "IPAMBlock"
        );
        assert_eq!(
            kind_of("affinities/n/10.0.0.0-26").unwrap().1,
            "n/10.0.0.0-26"
        );
        assert_eq!(kind_of("config/ipam").unwrap().0.kind_name(), "IPAMConfig");
        assert_eq!(
            kind_of("config/bgp").unwrap().0.kind_name(),
            "BGPConfiguration"
        );
        assert!(kind_of("config/other").is_none());
        assert!(kind_of("blocks/").is_none());
        assert!(kind_of("nodes/a").is_none(), "nodes are not a CRD");
    }

    #[test]
    fn documents_with_fields_outside_the_schema_are_refused() {
        let to_spec = kind_of("pools/p").unwrap().0.to_spec;
        let ok = br#"{"name":"p","cidr":"10.0.0.0/24","blockSize":26}"#;
        let spec = to_spec(ok).unwrap();
        assert_eq!(spec["nodeSelector"], "all()", "defaults are filled in");
        let extra = br#"{"name":"p","cidr":"10.0.0.0/24","blockSize":26,"colour":"red"}"#;
        assert!(to_spec(extra).unwrap_err().contains(".colour"));
        assert!(to_spec(b"{}").is_err());
    }

    #[test]
    fn crds_are_cluster_scoped_in_the_tabby_group() {
        let crds = crds();
        assert_eq!(crds.len(), KINDS.len());
        for crd in &crds {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Cluster");
        }
        assert!(crds_yaml().contains("name: ipamblocks.crd.tabby.dev"));
    }
}
