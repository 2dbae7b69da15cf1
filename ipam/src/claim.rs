//! Claiming blocks for a node: the two-phase affinity protocol.
//!
//! ```text
//! affinities/<node>/<block>  Pending      (create; an existing one is our node's claim too)
//! blocks/<block>             host:<node>  (create: the winner of a race is whoever creates it)
//! affinities/<node>/<block>  Confirmed    (only once the block document names the node)
//! ```
//!
//! The block document is the arbiter: it is created once, naming one node,
//! and its affinity never changes afterwards, so a block is never confirmed
//! for two nodes. A claim is per node, not per process: when two processes
//! of one node race, whichever creates the block wins for both, and a
//! process that died between the phases leaves a pending affinity that the
//! next assign on that node resolves.

use ipnetwork::IpNetwork;

use crate::allocator::{delete_if_present, Ipam, Result};
use crate::block::{nth_block, parse_cidr_key};
use crate::datastore::{Datastore, DatastoreError};
use crate::store;
use crate::types::{AffinityState, Block, BlockAffinity, IpPool, Node};

impl<D: Datastore> Ipam<D> {
    /// Claims the first free block of `pools` for `node`; `None` when every
    /// block of every pool exists already.
    pub(crate) fn claim_block(&self, node: &str, pools: &[IpPool]) -> Result<Option<IpNetwork>> {
        let existing: std::collections::HashSet<IpNetwork> = self
            .ds
            .list(store::BLOCKS)?
            .iter()
            .filter_map(|e| e.key.strip_prefix(store::BLOCKS).and_then(parse_cidr_key))
            .collect();
        for pool in pools {
            for index in 0u128.. {
                let Some(cidr) = nth_block(&pool.cidr, pool.block_size, index) else {
                    break;
                };
                if existing.contains(&cidr) {
                    continue;
                }
                if self.try_claim(node, &cidr)? {
                    tracing::info!(%cidr, %node, pool = %pool.name, "claimed block");
                    return Ok(Some(cidr));
                }
            }
        }
        Ok(None)
    }

    /// Runs the two phases for one block; `false` when another node owns it.
    pub(crate) fn try_claim(&self, node: &str, cidr: &IpNetwork) -> Result<bool> {
        self.register_node(node)?;
        let affinity_key = store::affinity_key(node, cidr);
        let pending = BlockAffinity {
            node: node.to_string(),
            cidr: *cidr,
            state: AffinityState::Pending,
        };
        match store::create(&self.ds, &affinity_key, &pending) {
            Ok(_) | Err(DatastoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        match store::create(
            &self.ds,
            &store::block_key(cidr),
            &Block::new(*cidr, Some(node)),
        ) {
            Ok(_) => {}
            Err(DatastoreError::Conflict { .. }) => {
                let ours =
                    store::get_block(&self.ds, cidr)?.is_some_and(|b| b.value.node() == Some(node));
                if !ours {
                    self.drop_affinity(node, cidr, false)?;
                    return Ok(false);
                }
            }
            Err(e) => {
                if let Err(undo) = self.drop_affinity(node, cidr, false) {
                    tracing::warn!(%cidr, %node, error = %crate::error_chain(&undo), "pending affinity left behind");
                }
                return Err(e.into());
            }
        }
        self.confirm_affinity(node, cidr)?;
        Ok(true)
    }

    /// Settles a pending affinity of `node`: confirms it when the block names
    /// the node (`true`), drops it when the block is another node's, and
    /// leaves it when the block does not exist yet (a claim in progress, or
    /// one that the next [`Self::claim_block`] completes).
    pub(crate) fn resolve_pending(&self, node: &str, cidr: &IpNetwork) -> Result<bool> {
        match store::get_block(&self.ds, cidr)? {
            Some(block) if block.value.node() == Some(node) => {
                self.confirm_affinity(node, cidr)?;
                Ok(true)
            }
            Some(_) => {
                self.drop_affinity(node, cidr, false)?;
                Ok(false)
            }
            None => Ok(false),
        }
    }

    /// Marks the affinity of `node` to `cidr` confirmed (creating it if missing).
    fn confirm_affinity(&self, node: &str, cidr: &IpNetwork) -> Result<()> {
        let key = store::affinity_key(node, cidr);
        let confirmed = BlockAffinity {
            node: node.to_string(),
            cidr: *cidr,
            state: AffinityState::Confirmed,
        };
        self.retry(|| match store::get::<BlockAffinity>(&self.ds, &key)? {
            None => store::create(&self.ds, &key, &confirmed)
                .map(drop)
                .map_err(Into::into),
            Some(doc) if doc.value.state == AffinityState::Confirmed => Ok(()),
            Some(doc) => store::update(&self.ds, &key, &confirmed, &doc.revision)
                .map(drop)
                .map_err(Into::into),
        })
    }

    /// Deletes the affinity of `node` to `cidr`; a confirmed one only if `even_confirmed`.
    pub(crate) fn drop_affinity(
        &self,
        node: &str,
        cidr: &IpNetwork,
        even_confirmed: bool,
    ) -> Result<()> {
        let key = store::affinity_key(node, cidr);
        self.retry(|| match store::get::<BlockAffinity>(&self.ds, &key)? {
            None => Ok(()),
            Some(doc) if doc.value.state == AffinityState::Confirmed && !even_confirmed => Ok(()),
            Some(doc) => delete_if_present(&self.ds, &key, &doc.revision),
        })
    }

    /// Creates `nodes/<node>` if it does not exist.
    pub(crate) fn register_node(&self, node: &str) -> Result<()> {
        let key = store::node_key(node);
        if self.ds.get(&key)?.is_some() {
            return Ok(());
        }
        let doc = Node {
            name: node.to_string(),
            address: None,
            asn: None,
            labels: Default::default(),
            ..Default::default()
        };
        match store::create(&self.ds, &key, &doc) {
            Ok(_) | Err(DatastoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
