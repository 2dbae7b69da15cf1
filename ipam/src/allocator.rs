//! Assign, release and garbage-collect addresses over a [`Datastore`].
//!
//! CONTRACT (used by cni-bin and ctl; keep the signatures).
//!
//! Every write is a compare-and-swap; a conflict re-reads and retries (at
//! most [`MAX_ATTEMPTS`] times per operation, with a randomized backoff), it
//! never overwrites. Assign works in steps that each commit at most one
//! block, so a retry never hands out an address twice:
//!
//! 1. the node's confirmed affine blocks ([`crate::claim`] resolves pending ones);
//! 2. else claim a free block of an enabled pool (two-phase: affinity
//!    `Pending`, create the block document naming the node, affinity
//!    `Confirmed`), and go back to 1;
//! 3. else, unless `strictAffinity`, borrow from another node's block.
//!
//! The handle document is incremented before the block is written and
//! decremented if that write fails, so a crash can over-count a handle but
//! never leave an address no handle knows.
//!
//! Pool and configuration management lives in [`crate::pools`].

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::block::{block_of, ip_to_u128, normalize};
use crate::datastore::{Datastore, DatastoreError};
use crate::store::{self, Doc};
use crate::types::{
    AffinityState, AllocationAttribute, Block, BlockAffinity, Handle, IpPool, IpamConfig,
};

/// How many conflicting attempts an operation makes before giving up.
pub const MAX_ATTEMPTS: u32 = 100;

/// Errors of IPAM operations, each with a message an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// No enabled pool of the requested family exists.
    #[error("no enabled IP pool for IPv{family}: create one with `tabbyctl pool create`")]
    NoPool {
        /// 4 or 6.
        family: u8,
    },
    /// Every address of every usable pool is taken.
    #[error("IP pool exhausted: no free address in {pools} for node {node}")]
    Exhausted {
        /// The pools that were tried, comma separated.
        pools: String,
        /// The node asking.
        node: String,
    },
    /// Retries on datastore conflicts ran out.
    #[error("gave up after {attempts} datastore conflicts on {key}; retry later")]
    ConflictStorm {
        /// How many attempts were made.
        attempts: u32,
        /// The last contended key.
        key: String,
    },
    /// An address that is not in any pool was named.
    #[error("{ip} is not in any IP pool")]
    NotInPool {
        /// The address.
        ip: IpAddr,
    },
    /// A pool definition is invalid.
    #[error("invalid IP pool {name}: {reason}")]
    InvalidPool {
        /// The pool name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A pool with this name or an overlapping CIDR already exists.
    #[error("IP pool {name} conflicts with existing pool {existing}")]
    PoolExists {
        /// The new pool.
        name: String,
        /// The existing pool.
        existing: String,
    },
    /// No pool has this name.
    #[error("IP pool {name} not found")]
    PoolNotFound {
        /// The name asked for.
        name: String,
    },
    /// A pool still has allocations and cannot be deleted.
    #[error("IP pool {name} still has {in_use} allocated addresses: release them first")]
    PoolInUse {
        /// The pool.
        name: String,
        /// Addresses still allocated.
        in_use: usize,
    },
    /// A fixed address asked for is held by another handle.
    #[error("{ip} is already allocated to {holder}")]
    InUse {
        /// The address.
        ip: IpAddr,
        /// The handle holding it.
        holder: String,
    },
    /// The request itself is invalid (empty handle or node name, ...).
    #[error("invalid IPAM request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

/// Result alias for IPAM operations.
pub type Result<T, E = IpamError> = std::result::Result<T, E>;

/// What to assign.
#[derive(Debug, Clone)]
pub struct AssignArgs {
    /// Owner of the allocation: `<network>.<containerID>`.
    pub handle: String,
    /// The node asking; its affine blocks are tried first.
    pub node: String,
    /// Attributes stored with the allocation (pod, namespace, netns, ifname, ...).
    pub attrs: BTreeMap<String, String>,
    /// Number of IPv4 addresses wanted (0 or 1 in practice).
    pub num_v4: u32,
    /// Number of IPv6 addresses wanted.
    pub num_v6: u32,
    /// Restrict to these pools (by CIDR); empty = every enabled pool.
    pub pools: Vec<IpNetwork>,
}

/// One released address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The address.
    pub ip: IpAddr,
    /// The handle that held it.
    pub handle: String,
}

/// The IPAM engine over a datastore.
pub struct Ipam<D: Datastore> {
    pub(crate) ds: D,
}

/// The outcome of one assign step.
enum Step {
    /// Addresses were committed in one block.
    Assigned(Vec<IpAddr>),
    /// The node gained (or confirmed) a block: try again.
    Claimed,
    /// Nothing is left for this node.
    Exhausted,
}

/// Counts conflicts of one operation and sleeps a little between attempts.
pub(crate) struct Backoff {
    attempts: u32,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { attempts: 0 }
    }

    /// Records a conflict on `key`: sleeps, or gives up with `ConflictStorm`.
    pub(crate) fn conflict(&mut self, key: String) -> Result<()> {
        self.attempts += 1;
        if self.attempts >= MAX_ATTEMPTS {
            return Err(IpamError::ConflictStorm {
                attempts: self.attempts,
                key,
            });
        }
        tracing::debug!(%key, attempt = self.attempts, "datastore conflict, retrying");
        let ceiling_us = 100u64 << self.attempts.min(6);
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(self.attempts);
        std::thread::sleep(Duration::from_micros(hasher.finish() % ceiling_us));
        Ok(())
    }
}

/// Refuses an empty handle or node name, or one with a '/'.
pub(crate) fn check_request(args: &AssignArgs) -> Result<()> {
    for (what, value) in [("handle", &args.handle), ("node", &args.node)] {
        if value.is_empty() || value.contains('/') {
            return Err(IpamError::InvalidRequest {
                reason: format!("{what} {value:?} must be non-empty and contain no '/'"),
            });
        }
    }
    Ok(())
}

/// The key of a datastore conflict, if `result` is one.
pub(crate) fn conflict_key<T>(result: &Result<T>) -> Option<String> {
    match result {
        Err(IpamError::Datastore(DatastoreError::Conflict { key })) => Some(key.clone()),
        _ => None,
    }
}

impl<D: Datastore> Ipam<D> {
    /// Wraps a datastore.
    pub fn new(ds: D) -> Self {
        Self { ds }
    }

    /// The underlying datastore.
    pub fn datastore(&self) -> &D {
        &self.ds
    }

    /// Runs `op` until it does not end in a datastore conflict.
    pub(crate) fn retry<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        let mut backoff = Backoff::new();
        loop {
            let result = op();
            match conflict_key(&result) {
                Some(key) => backoff.conflict(key)?,
                None => return result,
            }
        }
    }

    /// Assigns addresses to `args.handle`. Returns each address with its block's prefix length.
    /// Idempotent per handle is NOT required: callers release on failure.
    ///
    /// On failure, the addresses this call already assigned are released again.
    pub fn assign(&self, args: &AssignArgs) -> Result<Vec<IpNetwork>> {
        check_request(args)?;
        let mut args = args.clone();
        args.attrs
            .entry("node".to_string())
            .or_insert_with(|| args.node.clone());
        let mut assigned = Vec::new();
        let mut result = Ok(());
        for (family, n) in [(4u8, args.num_v4), (6u8, args.num_v6)] {
            if n > 0 {
                result = self.assign_family(&args, family, n as usize, &mut assigned);
                if result.is_err() {
                    break;
                }
            }
        }
        if let Err(e) = result {
            for net in &assigned {
                if let Err(undo) = self.release_ip(net.ip()) {
                    tracing::warn!(ip = %net.ip(), error = %undo, "could not undo a partial assign");
                }
            }
            return Err(e);
        }
        Ok(assigned)
    }

    /// Assigns `n` addresses of one family, appending them to `out` as they commit.
    fn assign_family(
        &self,
        args: &AssignArgs,
        family: u8,
        n: usize,
        out: &mut Vec<IpNetwork>,
    ) -> Result<()> {
        let config = self.config()?;
        // `pools` restricts each family only when it names pools of that family.
        let wanted: Vec<IpNetwork> = args
            .pools
            .iter()
            .map(normalize)
            .filter(|w| w.is_ipv4() == (family == 4))
            .collect();
        let pools: Vec<IpPool> = self
            .pools()?
            .into_iter()
            .filter(|p| !p.disabled && p.cidr.is_ipv4() == (family == 4))
            .filter(|p| wanted.is_empty() || wanted.contains(&p.cidr))
            .collect();
        if pools.is_empty() {
            return Err(IpamError::NoPool { family });
        }
        let mut got = 0;
        let mut backoff = Backoff::new();
        while got < n {
            let step = self.assign_step(args, &pools, &config, n - got);
            if let Some(key) = conflict_key(&step) {
                backoff.conflict(key)?;
                continue;
            }
            match step? {
                Step::Assigned(ips) => {
                    for ip in ips {
                        let prefix = pools
                            .iter()
                            .find(|p| p.cidr.contains(ip))
                            .map_or(if family == 4 { 32 } else { 128 }, |p| p.block_size);
                        let net =
                            IpNetwork::new(ip, prefix).map_err(|e| IpamError::InvalidPool {
                                name: ip.to_string(),
                                reason: e.to_string(),
                            })?;
                        out.push(net);
                        got += 1;
                    }
                }
                Step::Claimed => {}
                Step::Exhausted => {
                    let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                    return Err(IpamError::Exhausted {
                        pools: names.join(", "),
                        node: args.node.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// One step: commit addresses in one block, or claim a block, or report exhaustion.
    fn assign_step(
        &self,
        args: &AssignArgs,
        pools: &[IpPool],
        config: &IpamConfig,
        want: usize,
    ) -> Result<Step> {
        let in_pools = |cidr: &IpNetwork| pools.iter().any(|p| p.cidr.contains(cidr.network()));
        let mut affinities: Vec<Doc<BlockAffinity>> =
            store::list(&self.ds, &store::affinity_prefix(&args.node))?;
        affinities.retain(|a| in_pools(&a.value.cidr));
        affinities.sort_by_key(|a| ip_to_u128(a.value.cidr.network()));

        for affinity in &affinities {
            let cidr = affinity.value.cidr;
            match affinity.value.state {
                AffinityState::Confirmed => {
                    let Some(block) = store::get_block(&self.ds, &cidr)? else {
                        tracing::info!(%cidr, node = %args.node, "dropping affinity to a missing block");
                        self.drop_affinity(&args.node, &cidr, true)?;
                        continue;
                    };
                    if block.value.node() != Some(args.node.as_str()) {
                        tracing::warn!(%cidr, node = %args.node, "dropping affinity to another node's block");
                        self.drop_affinity(&args.node, &cidr, true)?;
                        continue;
                    }
                    if !block.value.deleted && block.value.free() > 0 {
                        return Ok(Step::Assigned(self.assign_in_block(block, want, args)?));
                    }
                }
                AffinityState::Pending => {
                    if self.resolve_pending(&args.node, &cidr)? {
                        return Ok(Step::Claimed);
                    }
                }
                AffinityState::PendingDeletion => {}
            }
        }

        let confirmed = affinities
            .iter()
            .filter(|a| a.value.state == AffinityState::Confirmed)
            .count();
        let may_claim =
            config.max_blocks_per_host == 0 || confirmed < config.max_blocks_per_host as usize;
        if may_claim && self.claim_block(&args.node, pools)?.is_some() {
            return Ok(Step::Claimed);
        }

        if !config.strict_affinity {
            let blocks: Vec<Doc<Block>> = store::list(&self.ds, store::BLOCKS)?;
            for block in blocks {
                let block = store::checked_block(block)?;
                let b = &block.value;
                if in_pools(&b.cidr)
                    && !b.deleted
                    && b.free() > 0
                    && b.node() != Some(args.node.as_str())
                {
                    tracing::info!(cidr = %b.cidr, owner = ?b.node(), node = %args.node, "borrowing an address");
                    return Ok(Step::Assigned(self.assign_in_block(block, want, args)?));
                }
            }
        }
        Ok(Step::Exhausted)
    }

    /// Allocates up to `want` addresses in `block` (handle first, then the block).
    fn assign_in_block(
        &self,
        block: Doc<Block>,
        want: usize,
        args: &AssignArgs,
    ) -> Result<Vec<IpAddr>> {
        let Doc {
            key,
            value: mut updated,
            revision,
        } = block;
        let ips = updated.assign(want, &args.handle, &args.attrs);
        if ips.is_empty() {
            return Ok(ips);
        }
        let count = ips.len() as i64;
        self.handle_add(&args.handle, &updated.cidr, count)?;
        match store::update(&self.ds, &key, &updated, &revision) {
            Ok(_) => Ok(ips),
            Err(e) => {
                if let Err(undo) = self.handle_add(&args.handle, &updated.cidr, -count) {
                    tracing::warn!(handle = %args.handle, error = %undo, "handle count left too high");
                }
                Err(e.into())
            }
        }
    }

    /// Adds `delta` to the count of `handle` in block `cidr`, creating or
    /// deleting the handle document as needed.
    pub(crate) fn handle_add(&self, handle: &str, cidr: &IpNetwork, delta: i64) -> Result<()> {
        let key = store::handle_key(handle);
        let block = normalize(cidr).to_string();
        self.retry(|| {
            let Some(doc) = store::get::<Handle>(&self.ds, &key)? else {
                if delta > 0 {
                    let value = Handle {
                        handle_id: handle.to_string(),
                        block: BTreeMap::from([(block.clone(), delta as u32)]),
                    };
                    store::create(&self.ds, &key, &value)?;
                }
                return Ok(());
            };
            let mut value = doc.value;
            let count = value.block.get(&block).copied().unwrap_or(0) as i64 + delta;
            if count > 0 {
                value
                    .block
                    .insert(block.clone(), u32::try_from(count).unwrap_or(u32::MAX));
            } else {
                value.block.remove(&block);
            }
            if value.block.is_empty() {
                delete_if_present(&self.ds, &key, &doc.revision)
            } else {
                store::update(&self.ds, &key, &value, &doc.revision)
                    .map(drop)
                    .map_err(Into::into)
            }
        })
    }

    /// Releases every address held by `handle`; a missing handle is `Ok(vec![])`.
    pub fn release_by_handle(&self, handle: &str) -> Result<Vec<Released>> {
        let key = store::handle_key(handle);
        let mut released = Vec::new();
        self.retry(|| {
            let Some(doc) = store::get::<Handle>(&self.ds, &key)? else {
                return Ok(());
            };
            for block_cidr in doc.value.block.keys() {
                let Ok(cidr) = block_cidr.parse::<IpNetwork>() else {
                    tracing::warn!(%handle, block = %block_cidr, "handle names an invalid block");
                    continue;
                };
                released.extend(self.release_in_block(
                    &cidr,
                    |b| b.release_handle(handle),
                    handle,
                )?);
            }
            delete_if_present(&self.ds, &key, &doc.revision)
        })?;
        Ok(released)
    }

    /// Applies `release` to block `cidr` and writes it back if it released anything.
    fn release_in_block(
        &self,
        cidr: &IpNetwork,
        release: impl FnOnce(&mut Block) -> Vec<IpAddr>,
        handle: &str,
    ) -> Result<Vec<Released>> {
        let Some(Doc {
            key,
            value: mut block,
            revision,
        }) = store::get_block(&self.ds, cidr)?
        else {
            return Ok(Vec::new());
        };
        let ips = release(&mut block);
        if !ips.is_empty() {
            // Empty affine blocks stay affine; releasing them after a grace
            // period (so their routes do not flap) is left to the node agent.
            store::update(&self.ds, &key, &block, &revision)?;
        }
        Ok(ips
            .into_iter()
            .map(|ip| Released {
                ip,
                handle: handle.to_string(),
            })
            .collect())
    }

    /// Releases one address; `Ok(None)` when it was not allocated.
    pub fn release_ip(&self, ip: IpAddr) -> Result<Option<Released>> {
        let pools = self.pools()?;
        let cidr = pools
            .iter()
            .find_map(|p| block_of(&p.cidr, p.block_size, ip))
            .ok_or(IpamError::NotInPool { ip })?;
        let released = self.retry(|| {
            let Some(Doc {
                key,
                value: mut block,
                revision,
            }) = store::get_block(&self.ds, &cidr)?
            else {
                return Ok(None);
            };
            let Some(handle) = block.release_ip(ip) else {
                return Ok(None);
            };
            store::update(&self.ds, &key, &block, &revision)?;
            Ok(Some(Released { ip, handle }))
        })?;
        if let Some(r) = &released {
            self.handle_add(&r.handle, &cidr, -1)?;
        }
        Ok(released)
    }

    /// Releases every handle that starts with `handle_prefix` and is not in `valid`.
    ///
    /// Also sweeps the blocks for allocations of such handles that have no
    /// handle document (left by a crash or an older version).
    pub fn gc(&self, handle_prefix: &str, valid: &HashSet<String>) -> Result<Vec<Released>> {
        let stale = |h: &str| h.starts_with(handle_prefix) && !valid.contains(h);
        let mut released = Vec::new();
        for doc in store::list::<Handle>(&self.ds, store::HANDLES)? {
            if stale(&doc.value.handle_id) {
                released.extend(self.release_by_handle(&doc.value.handle_id)?);
            }
        }
        for entry in self.ds.list(store::BLOCKS)? {
            let block = store::checked_block(store::decode::<Block>(entry)?)?;
            let orphans: HashSet<String> = block
                .value
                .handle_counts()
                .into_keys()
                .filter(|h| stale(h))
                .collect();
            for handle in orphans {
                let cidr = block.value.cidr;
                released.extend(self.retry(|| {
                    self.release_in_block(&cidr, |b| b.release_handle(&handle), &handle)
                })?);
            }
        }
        Ok(released)
    }
}

impl<D: Datastore> Ipam<D> {
    /// The addresses `handle` holds (none when the handle does not exist).
    pub fn addresses_of(&self, handle: &str) -> Result<Vec<IpAddr>> {
        let Some(doc) = store::get::<Handle>(&self.ds, &store::handle_key(handle))? else {
            return Ok(Vec::new());
        };
        let mut ips = Vec::new();
        for cidr in doc
            .value
            .block
            .keys()
            .filter_map(|k| k.parse::<IpNetwork>().ok())
        {
            if let Some(block) = store::get_block(&self.ds, &cidr)? {
                ips.extend(
                    block
                        .value
                        .allocated()
                        .filter(|(_, a)| a.handle_id == handle)
                        .map(|(ip, _)| ip),
                );
            }
        }
        Ok(ips)
    }

    /// Releases every handle that holds an allocation `stale` accepts, judged
    /// by the allocation's handle and attributes (e.g. its node and network),
    /// so a node's runtime can collect its own garbage without touching other
    /// nodes' or other networks' addresses.
    pub fn gc_where(&self, stale: impl Fn(&AllocationAttribute) -> bool) -> Result<Vec<Released>> {
        let mut handles = std::collections::BTreeSet::new();
        for entry in self.ds.list(store::BLOCKS)? {
            let block = store::checked_block(store::decode::<Block>(entry)?)?;
            handles.extend(
                block
                    .value
                    .allocated()
                    .filter(|(_, a)| stale(a))
                    .map(|(_, a)| a.handle_id.clone()),
            );
        }
        let mut released = Vec::new();
        for handle in &handles {
            released.extend(self.release_by_handle(handle)?);
        }
        // Allocations of those handles that had no handle document (a crash).
        for entry in self.ds.list(store::BLOCKS)? {
            let block = store::checked_block(store::decode::<Block>(entry)?)?;
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
}

/// Deletes `key` at `revision`; a document already gone is fine.
pub(crate) fn delete_if_present(
    ds: &impl Datastore,
    key: &str,
    revision: &crate::Revision,
) -> Result<()> {
    match ds.delete(key, revision) {
        Ok(()) | Err(DatastoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
