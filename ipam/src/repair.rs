//! Garbage collection and the repair of what crashed writers leave.
//!
//! A process killed in the middle of an operation leaves one of these
//! (each write is atomic, so never a torn document):
//!
//! - an allocation whose attachment is gone: [`Ipam::gc`] / [`Ipam::gc_where`]
//!   release it (the caller decides what is stale);
//! - a handle that records more (or fewer) addresses than the blocks hold,
//!   e.g. killed between the handle write and the block write, or an
//!   allocation with no handle document: [`Ipam::repair_handles`] makes the
//!   handles say what the blocks hold;
//! - a pending affinity whose block was never created:
//!   [`Ipam::drop_dead_claims`].
//!
//! The repairs must not run while the same node has an assign or release in
//! flight (that state looks just like a crash): callers hold the node's IPAM
//! lock ([`crate::Datastore::node_lock`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ipnetwork::IpNetwork;

use crate::allocator::{delete_if_present, Ipam, IpamError, Released, Result};
use crate::datastore::{Datastore, DatastoreError};
use crate::report::Allocation;
use crate::store::{self, Doc};
use crate::types::{AffinityState, AllocationAttribute, Block, BlockAffinity, Handle};

/// One handle document put right by [`Ipam::repair_handles`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleRepair {
    /// The handle.
    pub handle: String,
    /// Block -> count, as the handle document recorded it (empty: no document).
    pub recorded: BTreeMap<String, u32>,
    /// Block -> count, as the blocks hold it (empty: the document was deleted).
    pub actual: BTreeMap<String, u32>,
}

impl<D: Datastore> Ipam<D> {
    /// Every allocated address of every block, with its attributes.
    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        let mut out = Vec::new();
        for block in self.blocks()? {
            out.extend(block.value.allocated().map(|(ip, attribute)| Allocation {
                ip,
                block: block.value.cidr,
                attribute: attribute.clone(),
            }));
        }
        Ok(out)
    }

    fn blocks(&self) -> Result<Vec<Doc<Block>>> {
        let mut blocks = Vec::new();
        for entry in self.ds.list(store::BLOCKS)? {
            blocks.push(store::checked_block(store::decode::<Block>(entry)?)?);
        }
        Ok(blocks)
    }

    /// Releases every handle that starts with `handle_prefix` and is not in `valid`.
    ///
    /// Also sweeps the blocks for allocations of such handles that have no
    /// handle document (left by a crash or an older version).
    pub fn gc(&self, handle_prefix: &str, valid: &HashSet<String>) -> Result<Vec<Released>> {
        let stale = |h: &str| h.starts_with(handle_prefix) && !valid.contains(h);
        let mut handles: BTreeSet<String> = store::list::<Handle>(&self.ds, store::HANDLES)?
            .into_iter()
            .map(|d| d.value.handle_id)
            .filter(|h| stale(h))
            .collect();
        for allocation in self.allocations()? {
            if stale(&allocation.attribute.handle_id) {
                handles.insert(allocation.attribute.handle_id);
            }
        }
        self.release_handles(&handles)
    }

    /// Releases every handle that holds an allocation `stale` accepts, judged
    /// by the allocation's handle and attributes (e.g. its node and network),
    /// so a node's runtime can collect its own garbage without touching other
    /// nodes' or other networks' addresses.
    pub fn gc_where(&self, stale: impl Fn(&AllocationAttribute) -> bool) -> Result<Vec<Released>> {
        let handles: BTreeSet<String> = self
            .allocations()?
            .into_iter()
            .filter(|a| stale(&a.attribute))
            .map(|a| a.attribute.handle_id)
            .collect();
        self.release_handles(&handles)
    }

    /// Releases every address of `handles`, also those no handle document
    /// knows (the documents of a crashed writer).
    pub fn release_handles(&self, handles: &BTreeSet<String>) -> Result<Vec<Released>> {
        let mut released = Vec::new();
        for handle in handles {
            released.extend(self.release_by_handle(handle)?);
        }
        for block in self.blocks()? {
            let cidr = block.value.cidr;
            for handle in block
                .value
                .handle_counts()
                .into_keys()
                .filter(|h| handles.contains(h))
            {
                released.extend(self.retry(|| {
                    self.release_in_block(&cidr, |b| b.release_handle(&handle), &handle)
                })?);
            }
        }
        Ok(released)
    }

    /// Makes every handle document that `pick` accepts (by handle and node)
    /// record what the blocks hold: an orphan handle is deleted, an
    /// over-counted one corrected, a missing one created. Returns what changed.
    pub fn repair_handles(
        &self,
        pick: impl Fn(&str, Option<&str>) -> bool,
    ) -> Result<Vec<HandleRepair>> {
        let mut actual: BTreeMap<String, (Option<String>, BTreeMap<String, u32>)> = BTreeMap::new();
        for allocation in self.allocations()? {
            let attr = allocation.attribute;
            let entry = actual.entry(attr.handle_id).or_default();
            entry.0 = entry
                .0
                .take()
                .or_else(|| attr.secondary.get("node").cloned());
            *entry.1.entry(allocation.block.to_string()).or_insert(0) += 1;
        }
        let documents: BTreeMap<String, Handle> = store::list::<Handle>(&self.ds, store::HANDLES)?
            .into_iter()
            .map(|d| (d.value.handle_id.clone(), d.value))
            .collect();
        let names: BTreeSet<&String> = actual.keys().chain(documents.keys()).collect();
        let mut repairs = Vec::new();
        for handle in names {
            let (held_node, held) = actual.get(handle).cloned().unwrap_or_default();
            let doc = documents.get(handle);
            let node = doc.and_then(|d| d.node.clone()).or(held_node);
            let recorded = doc.map(|d| d.block.clone()).unwrap_or_default();
            if recorded == held || !pick(handle, node.as_deref()) {
                continue;
            }
            self.write_handle(handle, node.as_deref(), &held)?;
            tracing::info!(%handle, ?recorded, actual = ?held, "repaired handle");
            repairs.push(HandleRepair {
                handle: handle.clone(),
                recorded,
                actual: held,
            });
        }
        Ok(repairs)
    }

    /// Stores `blocks` as the counts of `handle`; deletes the document when empty.
    fn write_handle(
        &self,
        handle: &str,
        node: Option<&str>,
        blocks: &BTreeMap<String, u32>,
    ) -> Result<()> {
        let key = store::handle_key(handle);
        let value = Handle {
            handle_id: handle.to_string(),
            block: blocks.clone(),
            node: node.map(str::to_string),
        };
        self.retry(|| match store::get::<Handle>(&self.ds, &key)? {
            None if blocks.is_empty() => Ok(()),
            None => store::create(&self.ds, &key, &value)
                .map(drop)
                .map_err(Into::into),
            Some(doc) if blocks.is_empty() => delete_if_present(&self.ds, &key, &doc.revision),
            Some(doc) => store::update(&self.ds, &key, &value, &doc.revision)
                .map(drop)
                .map_err(Into::into),
        })
    }

    /// Deletes the pending affinities of `node` whose block does not exist:
    /// claims whose process died between the two phases and that no later
    /// claim completed. Returns their blocks.
    pub fn drop_dead_claims(&self, node: &str) -> Result<Vec<IpNetwork>> {
        let mut dropped = Vec::new();
        for affinity in store::list::<BlockAffinity>(&self.ds, &store::affinity_prefix(node))? {
            let cidr = affinity.value.cidr;
            if affinity.value.state != AffinityState::Pending
                || store::get_block(&self.ds, &cidr)?.is_some()
            {
                continue;
            }
            match delete_if_present(&self.ds, &affinity.key, &affinity.revision) {
                Ok(()) => {}
                // Changed meanwhile: someone is working on it.
                Err(IpamError::Datastore(DatastoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
            }
            tracing::info!(%cidr, %node, "dropped a dead block claim");
            dropped.push(cidr);
        }
        Ok(dropped)
    }
}
