//! Typed access to the IPAM documents: their keys and JSON (de)serialization
//! over a [`Datastore`].

use ipnetwork::IpNetwork;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::block::cidr_key;
use crate::datastore::{Datastore, DatastoreError, Entry, Result, Revision};
use crate::types::Block;

/// Key of the cluster IPAM settings.
pub const CONFIG_KEY: &str = "config/ipam";
/// Prefix of every pool.
pub const POOLS: &str = "pools/";
/// Prefix of every block.
pub const BLOCKS: &str = "blocks/";
/// Prefix of every affinity.
pub const AFFINITIES: &str = "affinities/";
/// Prefix of every handle.
pub const HANDLES: &str = "handles/";
/// Prefix of every node.
pub const NODES: &str = "nodes/";

/// `pools/<name>`.
pub fn pool_key(name: &str) -> String {
    format!("{POOLS}{name}")
}

/// `blocks/<ip>-<prefix>`.
pub fn block_key(cidr: &IpNetwork) -> String {
    format!("{BLOCKS}{}", cidr_key(cidr))
}

/// `affinities/<node>/` (every affinity of one node).
pub fn affinity_prefix(node: &str) -> String {
    format!("{AFFINITIES}{node}/")
}

/// `affinities/<node>/<ip>-<prefix>`.
pub fn affinity_key(node: &str, cidr: &IpNetwork) -> String {
    format!("{}{}", affinity_prefix(node), cidr_key(cidr))
}

/// `handles/<handle>`.
pub fn handle_key(handle: &str) -> String {
    format!("{HANDLES}{handle}")
}

/// `nodes/<name>`.
pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

/// A decoded document with the revision it was read at.
#[derive(Debug, Clone)]
pub struct Doc<T> {
    /// The stored key.
    pub key: String,
    /// The decoded document.
    pub value: T,
    /// Its revision, for compare-and-swap.
    pub revision: Revision,
}

/// Decodes one entry.
pub fn decode<T: DeserializeOwned>(entry: Entry) -> Result<Doc<T>> {
    let value = serde_json::from_slice(&entry.value).map_err(|e| DatastoreError::Corrupt {
        key: entry.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Doc {
        key: entry.key,
        value,
        revision: entry.revision,
    })
}

/// Reads and decodes one document.
pub fn get<T: DeserializeOwned>(ds: &impl Datastore, key: &str) -> Result<Option<Doc<T>>> {
    ds.get(key)?.map(decode).transpose()
}

/// Reads, decodes and checks one block.
pub fn get_block(ds: &impl Datastore, cidr: &IpNetwork) -> Result<Option<Doc<Block>>> {
    get::<Block>(ds, &block_key(cidr))?
        .map(checked_block)
        .transpose()
}

/// Checks a decoded block's table.
pub fn checked_block(doc: Doc<Block>) -> Result<Doc<Block>> {
    doc.value
        .validate()
        .map_err(|reason| DatastoreError::Corrupt {
            key: doc.key.clone(),
            reason,
        })?;
    Ok(doc)
}

/// Lists and decodes every document under `prefix`.
pub fn list<T: DeserializeOwned>(ds: &impl Datastore, prefix: &str) -> Result<Vec<Doc<T>>> {
    ds.list(prefix)?.into_iter().map(decode).collect()
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| DatastoreError::Corrupt {
        key: key.to_string(),
        reason: format!("cannot encode: {e}"),
    })
}

/// Creates a document; `Conflict` if it exists.
pub fn create<T: Serialize>(ds: &impl Datastore, key: &str, value: &T) -> Result<Revision> {
    ds.create(key, &encode(key, value)?)
}

/// Replaces a document at `revision`; `Conflict` if it changed.
pub fn update<T: Serialize>(
    ds: &impl Datastore,
    key: &str,
    value: &T,
    revision: &Revision,
) -> Result<Revision> {
    ds.update(key, &encode(key, value)?, revision)
}

/// [`update`] that a crash may undo (a release, see
/// [`Datastore::update_relaxed`]).
pub fn update_relaxed<T: Serialize>(
    ds: &impl Datastore,
    key: &str,
    value: &T,
    revision: &Revision,
) -> Result<Revision> {
    ds.update_relaxed(key, &encode(key, value)?, revision)
}

/// [`create`] made durable by a later [`Datastore::sync`] (an assign, see
/// [`Datastore::create_deferred`]).
pub fn create_deferred<T: Serialize>(
    ds: &impl Datastore,
    key: &str,
    value: &T,
) -> Result<Revision> {
    ds.create_deferred(key, &encode(key, value)?)
}

/// [`update`] made durable by a later [`Datastore::sync`] (an assign, see
/// [`Datastore::update_deferred`]).
pub fn update_deferred<T: Serialize>(
    ds: &impl Datastore,
    key: &str,
    value: &T,
    revision: &Revision,
) -> Result<Revision> {
    ds.update_deferred(key, &encode(key, value)?, revision)
}
