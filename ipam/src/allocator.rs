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
//! never leave an address no handle knows ([`crate::repair`] puts such
//! handles right). An assign that fails after committing addresses releases
//! them again (a guard, so every error path does).
//!
//! [`Ipam::assign_unsynced`] does the same writes but leaves their last
//! step to the disk to [`Ipam::sync`] (the file backend's directory
//! fsyncs), so that a CNI ADD pays for it outside the node lock and beside
//! its netlink work. The writes are visible to every other assign at once,
//! so no assign can take the same address, with or without a crash in
//! between; the caller hands the addresses out only once `sync` returned.
//! Until then a crash (a power loss: a killed process loses nothing, its
//! renames are in the kernel) may lose either write: a lost block write
//! frees the address again, which nobody was told of; a handle kept
//! without its block write over-counts (its release finds nothing of its
//! own in the block, never another handle's address); a block write kept
//! without its handle write is an allocation no handle names, released by
//! GC or put right by [`crate::repair`], as an older version's would be.
//!
//! [`Ipam::write_handle_ahead`] takes the handle write out of the node lock
//! too: before the lock it adds the address to the handle in the block the
//! assign will most likely use, and the assign under the lock then writes
//! only the block when the guess was right and the handle document is
//! still the one written ahead (its revision: a GC's repair, which runs
//! under the lock, may have rewritten it). A missed guess is taken back
//! before the block write. Meanwhile the handle over-counts, as after a
//! crash between the handle and the block write, and the order stays
//! handle first, block second.
//!
//! Pool and configuration management lives in [`crate::pools`].

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::block::{block_of, ip_to_u128, normalize};
use crate::datastore::{Datastore, DatastoreError, Revision};
use crate::pools::reserved_addresses;
use crate::store::{self, Doc};
use crate::types::{AffinityState, Block, BlockAffinity, Handle, IpPool, IpamConfig};

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

/// The documents an assign wrote without waiting for the disk
/// ([`Ipam::assign_unsynced`]); [`Ipam::sync`] makes them durable.
#[must_use = "a crash may still lose this assign: sync it before handing its addresses out"]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unsynced {
    /// Keys written, handle first.
    keys: Vec<String>,
}

impl Unsynced {
    /// The keys whose writes may not be durable yet.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

/// A handle count written before the node lock ([`Ipam::write_handle_ahead`]),
/// for the assign that follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenAhead {
    /// The block guessed.
    block: IpNetwork,
    /// Addresses added to the handle in it.
    count: i64,
    /// The handle document's revision after the write.
    revision: Revision,
}

/// How an assign writes.
struct How {
    durability: Durability,
    /// The handle count written ahead, until an assign step settles it.
    ahead: Cell<Option<WrittenAhead>>,
}

/// When an assign's writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Before each write returns.
    Now,
    /// At [`Ipam::sync`].
    Deferred,
}

/// The IPAM engine over a datastore.
pub struct Ipam<D: Datastore> {
    pub(crate) ds: D,
}

/// The outcome of one assign step.
enum Step {
    /// Addresses were committed in one block.
    Assigned(IpNetwork, Vec<IpAddr>),
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
        let how = How {
            durability: Durability::Now,
            ahead: Cell::new(None),
        };
        self.assign_with(args, &how).map(|(nets, _)| nets)
    }

    /// Before the node lock: adds one address to `args.handle` in the
    /// node's first confirmed block with room, which an
    /// [`Ipam::assign_unsynced`] of `args` then most likely uses, so that
    /// under the lock only the block is written (see the module docs).
    /// Nothing is written, `None`, for more than one address or when the
    /// node has no block with room. Durable at the assign's [`Ipam::sync`].
    pub fn write_handle_ahead(&self, args: &AssignArgs) -> Result<Option<WrittenAhead>> {
        check_request(args)?;
        let family = match (args.num_v4, args.num_v6) {
            (1, 0) => 4,
            (0, 1) => 6,
            _ => return Ok(None),
        };
        let pools = match self.usable_pools(args, family) {
            Ok(pools) => pools,
            Err(IpamError::NoPool { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let reserved: Vec<IpAddr> = pools.iter().flat_map(reserved_addresses).collect();
        let Some(block) = self.first_block_with_room(&args.node, &pools, &reserved)? else {
            return Ok(None);
        };
        let node = Some(args.node.as_str());
        let written = self.handle_add_with(&args.handle, node, &block, 1, Durability::Deferred)?;
        Ok(written.map(|revision| WrittenAhead {
            block,
            count: 1,
            revision,
        }))
    }

    /// The node's first confirmed, live block of `pools` with a free
    /// address, as [`Ipam::assign`] would try them (read only).
    fn first_block_with_room(
        &self,
        node: &str,
        pools: &[IpPool],
        reserved: &[IpAddr],
    ) -> Result<Option<IpNetwork>> {
        let in_pools = |cidr: &IpNetwork| pools.iter().any(|p| p.cidr.contains(cidr.network()));
        let mut affinities: Vec<Doc<BlockAffinity>> =
            store::list(&self.ds, &store::affinity_prefix(node))?;
        affinities.retain(|a| a.value.state == AffinityState::Confirmed && in_pools(&a.value.cidr));
        affinities.sort_by_key(|a| ip_to_u128(a.value.cidr.network()));
        for affinity in affinities {
            if let Some(block) = store::get_block(&self.ds, &affinity.value.cidr)? {
                let b = &block.value;
                if b.node() == Some(node) && !b.deleted && b.assignable(reserved) > 0 {
                    return Ok(Some(b.cidr));
                }
            }
        }
        Ok(None)
    }

    /// [`Ipam::assign`] that does not wait for its handle and block writes
    /// to reach the disk: they are visible at once (no other assign takes
    /// these addresses), but only durable once [`Ipam::sync`] returned. Hand
    /// the addresses out only then, and release them if it fails; see the
    /// module documentation for what a crash in between leaves.
    ///
    /// `ahead` is what [`Ipam::write_handle_ahead`] wrote for this assign.
    pub fn assign_unsynced(
        &self,
        args: &AssignArgs,
        ahead: Option<WrittenAhead>,
    ) -> Result<(Vec<IpNetwork>, Unsynced)> {
        let how = How {
            durability: Durability::Deferred,
            ahead: Cell::new(ahead),
        };
        let (nets, blocks) = self.assign_with(args, &how)?;
        let mut keys = vec![store::handle_key(&args.handle)];
        for key in blocks.iter().map(store::block_key) {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok((nets, Unsynced { keys }))
    }

    /// Makes the writes of an [`Ipam::assign_unsynced`] durable.
    pub fn sync(&self, unsynced: Unsynced) -> Result<()> {
        Ok(self.ds.sync(&unsynced.keys)?)
    }

    /// Assigns; returns the addresses and the block of each.
    fn assign_with(
        &self,
        args: &AssignArgs,
        how: &How,
    ) -> Result<(Vec<IpNetwork>, Vec<IpNetwork>)> {
        let assigned = self.assign_steps(args, how);
        // A count written ahead that no step settled (an error, exhaustion).
        if let Some(ahead) = how.ahead.take() {
            let node = Some(args.node.as_str());
            if let Err(e) = self.take_back(ahead, &args.handle, node, how.durability) {
                tracing::warn!(handle = %args.handle, error = %crate::error_chain(&e), "handle count left too high");
            }
        }
        assigned
    }

    fn assign_steps(
        &self,
        args: &AssignArgs,
        how: &How,
    ) -> Result<(Vec<IpNetwork>, Vec<IpNetwork>)> {
        check_request(args)?;
        let mut args = args.clone();
        args.attrs
            .entry("node".to_string())
            .or_insert_with(|| args.node.clone());
        let mut committed = Committed {
            ipam: self,
            ips: Vec::new(),
        };
        let mut assigned = Vec::new();
        for (family, n) in [(4u8, args.num_v4), (6u8, args.num_v6)] {
            if n > 0 {
                let want = (family, n as usize);
                self.assign_family(&args, want, how, &mut committed, &mut assigned)?;
            }
        }
        let blocks = committed.ips.iter().map(|(block, _)| *block).collect();
        committed.keep();
        Ok((assigned, blocks))
    }

    /// Assigns `n` addresses of one family: each is recorded in `committed`
    /// as soon as its block is written, then appended to `out` with its prefix.
    fn assign_family(
        &self,
        args: &AssignArgs,
        (family, n): (u8, usize),
        how: &How,
        committed: &mut Committed<'_, D>,
        out: &mut Vec<IpNetwork>,
    ) -> Result<()> {
        let config = self.config()?;
        let pools = self.usable_pools(args, family)?;
        let reserved: Vec<IpAddr> = pools.iter().flat_map(reserved_addresses).collect();
        let mut got = 0;
        let mut backoff = Backoff::new();
        while got < n {
            let step = self.assign_step(args, &pools, &config, &reserved, n - got, how);
            if let Some(key) = conflict_key(&step) {
                backoff.conflict(key)?;
                continue;
            }
            match step? {
                Step::Assigned(block, ips) => {
                    committed.ips.extend(ips.iter().map(|ip| (block, *ip)));
                    for ip in ips {
                        out.push(with_block_prefix(&pools, family, ip)?);
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

    /// The enabled pools of `family` that `args` may use.
    fn usable_pools(&self, args: &AssignArgs, family: u8) -> Result<Vec<IpPool>> {
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
        Ok(pools)
    }

    /// One step: commit addresses in one block, or claim a block, or report exhaustion.
    fn assign_step(
        &self,
        args: &AssignArgs,
        pools: &[IpPool],
        config: &IpamConfig,
        reserved: &[IpAddr],
        want: usize,
        how: &How,
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
                    if !block.value.deleted && block.value.assignable(reserved) > 0 {
                        return self.assign_in_block(block, want, args, reserved, how);
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
                    && b.assignable(reserved) > 0
                    && b.node() != Some(args.node.as_str())
                {
                    tracing::info!(cidr = %b.cidr, owner = ?b.node(), node = %args.node, "borrowing an address");
                    return self.assign_in_block(block, want, args, reserved, how);
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
        reserved: &[IpAddr],
        how: &How,
    ) -> Result<Step> {
        let durability = how.durability;
        let Doc {
            key,
            value: mut updated,
            revision,
        } = block;
        let ips = updated.assign_except(want, &args.handle, &args.attrs, reserved);
        if ips.is_empty() {
            return Ok(Step::Assigned(updated.cidr, ips));
        }
        let count = ips.len() as i64;
        let node = Some(args.node.as_str());
        let written_ahead = match how.ahead.take() {
            Some(ahead) => {
                self.settle_ahead(ahead, &args.handle, node, &updated.cidr, count, durability)?
            }
            None => false,
        };
        if !written_ahead {
            self.handle_add_with(&args.handle, node, &updated.cidr, count, durability)?;
        }
        let written = match durability {
            Durability::Now => store::update(&self.ds, &key, &updated, &revision),
            Durability::Deferred => store::update_deferred(&self.ds, &key, &updated, &revision),
        };
        match written {
            Ok(_) => Ok(Step::Assigned(updated.cidr, ips)),
            Err(e) => {
                if let Err(undo) = self.handle_add(&args.handle, node, &updated.cidr, -count) {
                    tracing::warn!(handle = %args.handle, error = %crate::error_chain(&undo), "handle count left too high");
                }
                Err(e.into())
            }
        }
    }

    /// Whether the count written ahead is this step's: it guessed this
    /// block and count, and the handle document is still the one it wrote
    /// (a repair under the node lock may have rewritten it since). A guess
    /// that missed is taken back.
    fn settle_ahead(
        &self,
        ahead: WrittenAhead,
        handle: &str,
        node: Option<&str>,
        cidr: &IpNetwork,
        count: i64,
        durability: Durability,
    ) -> Result<bool> {
        if normalize(&ahead.block) == normalize(cidr) && ahead.count == count {
            if self.is_handle_at(handle, &ahead.revision)? {
                return Ok(true);
            }
            return Ok(false);
        }
        self.take_back(ahead, handle, node, durability)?;
        Ok(false)
    }

    /// Takes a count written ahead back, unless the handle document was
    /// rewritten since (by a repair: it then says what the blocks hold).
    fn take_back(
        &self,
        ahead: WrittenAhead,
        handle: &str,
        node: Option<&str>,
        durability: Durability,
    ) -> Result<()> {
        if self.is_handle_at(handle, &ahead.revision)? {
            self.handle_add_with(handle, node, &ahead.block, -ahead.count, durability)?;
        }
        Ok(())
    }

    /// Whether the document of `handle` is at `revision`.
    fn is_handle_at(&self, handle: &str, revision: &Revision) -> Result<bool> {
        let doc = self.ds.get(&store::handle_key(handle))?;
        Ok(doc.is_some_and(|d| d.revision == *revision))
    }

    /// Adds `delta` to the count of `handle` in block `cidr`, creating (for
    /// `node`) or deleting the handle document as needed.
    pub(crate) fn handle_add(
        &self,
        handle: &str,
        node: Option<&str>,
        cidr: &IpNetwork,
        delta: i64,
    ) -> Result<()> {
        self.handle_add_with(handle, node, cidr, delta, Durability::Now)
            .map(drop)
    }

    /// [`Ipam::handle_add`] whose create or update is durable at once or at
    /// [`Ipam::sync`] (a delete, the last release, always at once). Returns
    /// the document's new revision (`None`: deleted, or nothing to do).
    fn handle_add_with(
        &self,
        handle: &str,
        node: Option<&str>,
        cidr: &IpNetwork,
        delta: i64,
        durability: Durability,
    ) -> Result<Option<Revision>> {
        let key = store::handle_key(handle);
        let block = normalize(cidr).to_string();
        self.retry(|| {
            let Some(doc) = store::get::<Handle>(&self.ds, &key)? else {
                if delta > 0 {
                    let value = Handle {
                        handle_id: handle.to_string(),
                        block: BTreeMap::from([(block.clone(), delta as u32)]),
                        node: node.map(str::to_string),
                    };
                    let revision = match durability {
                        Durability::Now => store::create(&self.ds, &key, &value)?,
                        Durability::Deferred => store::create_deferred(&self.ds, &key, &value)?,
                    };
                    return Ok(Some(revision));
                }
                return Ok(None);
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
                delete_if_present(&self.ds, &key, &doc.revision).map(|()| None)
            } else {
                let written = match durability {
                    Durability::Now => store::update(&self.ds, &key, &value, &doc.revision),
                    Durability::Deferred => {
                        store::update_deferred(&self.ds, &key, &value, &doc.revision)
                    }
                };
                written.map(Some).map_err(Into::into)
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
            // A crash may bring the handle back: it then counts addresses
            // its blocks no longer give it, which the next release of the
            // handle or a repair removes.
            match self.ds.delete_relaxed(&key, &doc.revision) {
                Ok(()) | Err(DatastoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })?;
        Ok(released)
    }

    /// Applies `release` to block `cidr` and writes it back if it released anything.
    pub(crate) fn release_in_block(
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
            // Relaxed: a crash that undoes a release keeps the addresses
            // allocated to the gone attachment, for a retried DEL or GC.
            store::update_relaxed(&self.ds, &key, &block, &revision)?;
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
        self.release_ip_in(&cidr, ip)
    }

    /// Releases `ip` in block `cidr` (block first, then the handle's count).
    fn release_ip_in(&self, cidr: &IpNetwork, ip: IpAddr) -> Result<Option<Released>> {
        let released = self.retry(|| {
            let Some(Doc {
                key,
                value: mut block,
                revision,
            }) = store::get_block(&self.ds, cidr)?
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
            self.handle_add(&r.handle, None, cidr, -1)?;
        }
        Ok(released)
    }
}

/// Addresses an assign committed, released again unless it succeeds: on
/// every error path, early return and panic alike.
struct Committed<'a, D: Datastore> {
    ipam: &'a Ipam<D>,
    /// (block, address) in the order they were committed.
    ips: Vec<(IpNetwork, IpAddr)>,
}

impl<D: Datastore> Committed<'_, D> {
    /// The assign succeeded: keep everything.
    fn keep(mut self) {
        self.ips.clear();
    }
}

impl<D: Datastore> Drop for Committed<'_, D> {
    fn drop(&mut self) {
        for (block, ip) in self.ips.drain(..) {
            if let Err(e) = self.ipam.release_ip_in(&block, ip) {
                tracing::warn!(%ip, %block, error = %crate::error_chain(&e), "could not undo a failed assign");
            }
        }
    }
}

/// `ip` with the block size of its pool as prefix length.
fn with_block_prefix(pools: &[IpPool], family: u8, ip: IpAddr) -> Result<IpNetwork> {
    let prefix = pools
        .iter()
        .find(|p| p.cidr.contains(ip))
        .map_or(if family == 4 { 32 } else { 128 }, |p| p.block_size);
    IpNetwork::new(ip, prefix).map_err(|e| IpamError::InvalidPool {
        name: ip.to_string(),
        reason: e.to_string(),
    })
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
