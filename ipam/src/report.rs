//! Usage and consistency reports for `tabbyctl ipam show|check`.
//!
//! [`Snapshot::load`] reads every IPAM document once; everything else is a
//! pure function over the snapshot, so tests build snapshots by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::block::{block_of, net_size};
use crate::datastore::{Datastore, Result};
use crate::store;
use crate::types::{
    AffinityState, AllocationAttribute, Block, BlockAffinity, Handle, IpPool, Node,
};

/// Every IPAM document, read once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Pools, by name.
    pub pools: Vec<IpPool>,
    /// Blocks, by CIDR key.
    pub blocks: Vec<Block>,
    /// Affinities of every node.
    pub affinities: Vec<BlockAffinity>,
    /// Handles.
    pub handles: Vec<Handle>,
    /// Registered nodes.
    pub nodes: Vec<Node>,
}

impl Snapshot {
    /// Reads every document from `ds`.
    pub fn load(ds: &impl Datastore) -> Result<Self> {
        let blocks = store::list::<Block>(ds, store::BLOCKS)?
            .into_iter()
            .map(|b| store::checked_block(b).map(|b| b.value))
            .collect::<Result<_>>()?;
        Ok(Self {
            pools: values(ds, store::POOLS)?,
            blocks,
            affinities: values(ds, store::AFFINITIES)?,
            handles: values(ds, store::HANDLES)?,
            nodes: values(ds, store::NODES)?,
        })
    }

    /// The pool containing `ip`.
    pub fn pool_of(&self, ip: IpAddr) -> Option<&IpPool> {
        self.pools.iter().find(|p| p.cidr.contains(ip))
    }
}

/// The decoded documents under `prefix`.
fn values<T: serde::de::DeserializeOwned>(ds: &impl Datastore, prefix: &str) -> Result<Vec<T>> {
    Ok(store::list::<T>(ds, prefix)?
        .into_iter()
        .map(|d| d.value)
        .collect())
}

/// Address counts of a pool or a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Addresses in the range.
    pub total: u128,
    /// Addresses allocated.
    pub in_use: u128,
}

impl Usage {
    /// Addresses free.
    pub fn free(&self) -> u128 {
        self.total.saturating_sub(self.in_use)
    }

    /// `part` as a whole percentage of the total, rounded to the nearest as
    /// calicoctl prints it (4 of 256 is 2%, 255 of 256 is 100%).
    pub fn percent(&self, part: u128) -> u128 {
        if self.total == 0 {
            return 0;
        }
        (part as f64 * 100.0 / self.total as f64).round() as u128
    }
}

/// One block's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUsage {
    /// The block.
    pub cidr: IpNetwork,
    /// The node it is affine to.
    pub node: Option<String>,
    /// Its counts.
    pub usage: Usage,
}

/// One pool's usage with its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    /// The pool.
    pub pool: IpPool,
    /// Pool-wide counts (addresses outside any block are free).
    pub usage: Usage,
    /// Its blocks, in address order.
    pub blocks: Vec<BlockUsage>,
}

/// Usage of every pool. Addresses never handed out (see
/// [`crate::pools::reserved_addresses`]) are not counted, unless an older
/// release allocated them.
pub fn usage(snap: &Snapshot) -> Vec<PoolUsage> {
    snap.pools
        .iter()
        .map(|pool| {
            let reserved = crate::pools::reserved_addresses(pool);
            let allocated = |ip: &IpAddr| {
                snap.blocks
                    .iter()
                    .any(|b| b.cidr.contains(*ip) && b.attribute_of(*ip).is_some())
            };
            let unusable: Vec<IpAddr> = reserved.into_iter().filter(|ip| !allocated(ip)).collect();
            let mut blocks: Vec<BlockUsage> = snap
                .blocks
                .iter()
                .filter(|b| pool.cidr.contains(b.cidr.network()))
                .map(|b| BlockUsage {
                    cidr: b.cidr,
                    node: b.node().map(str::to_string),
                    usage: Usage {
                        total: (b.in_use() + b.assignable(&unusable)) as u128,
                        in_use: b.in_use() as u128,
                    },
                })
                .collect();
            blocks.sort_by_key(|b| crate::block::ip_to_u128(b.cidr.network()));
            let in_use = blocks.iter().map(|b| b.usage.in_use).sum();
            PoolUsage {
                pool: pool.clone(),
                usage: Usage {
                    total: net_size(&pool.cidr) - unusable.len() as u128,
                    in_use,
                },
                blocks,
            }
        })
        .collect()
}

/// What is known about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpInfo {
    /// No pool contains it.
    NotInPool,
    /// In a pool, but free.
    NotAssigned {
        /// The pool's name.
        pool: String,
    },
    /// Allocated.
    InUse {
        /// The pool's name.
        pool: String,
        /// The block holding it.
        block: IpNetwork,
        /// The node the block is affine to (the address may be borrowed).
        block_node: Option<String>,
        /// Handle and attributes.
        attribute: AllocationAttribute,
    },
}

/// Looks `ip` up.
pub fn ip_info(snap: &Snapshot, ip: IpAddr) -> IpInfo {
    let Some(pool) = snap.pool_of(ip) else {
        return IpInfo::NotInPool;
    };
    let block_cidr = block_of(&pool.cidr, pool.block_size, ip);
    let found = snap
        .blocks
        .iter()
        .find(|b| Some(b.cidr) == block_cidr || b.cidr.contains(ip))
        .and_then(|b| b.attribute_of(ip).map(|a| (b, a)));
    match found {
        Some((block, attribute)) => IpInfo::InUse {
            pool: pool.name.clone(),
            block: block.cidr,
            block_node: block.node().map(str::to_string),
            attribute: attribute.clone(),
        },
        None => IpInfo::NotAssigned {
            pool: pool.name.clone(),
        },
    }
}

/// Whether an allocation's attachment still exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The attachment exists.
    Live,
    /// The attachment is gone: the address leaked.
    Dead,
    /// Cannot tell from here (another node's allocation, no attributes).
    Unknown,
}

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The address.
    pub ip: IpAddr,
    /// Its block.
    pub block: IpNetwork,
    /// Handle and attributes.
    pub attribute: AllocationAttribute,
}

/// One inconsistency found by [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The allocation's attachment (netns, host veth) is gone.
    LeakedAllocation(Allocation),
    /// A block is affine to a node that is not registered.
    BlockOfUnknownNode {
        /// The block.
        block: IpNetwork,
        /// The unknown node.
        node: String,
    },
    /// A block lies in no pool (its pool was deleted).
    BlockOutsidePools {
        /// The block.
        block: IpNetwork,
    },
    /// An affinity names a block that does not exist.
    AffinityWithoutBlock(BlockAffinity),
    /// A confirmed affinity names a block affine to another node.
    AffinityMismatch {
        /// The affinity.
        affinity: BlockAffinity,
        /// The block's actual affinity.
        block_affinity: Option<String>,
    },
    /// A handle's recorded count for a block differs from the block's table.
    HandleCountMismatch {
        /// The handle.
        handle: String,
        /// The block.
        block: String,
        /// What the handle document says.
        recorded: u32,
        /// What the block holds.
        actual: u32,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::LeakedAllocation(a) => {
                write!(f, "IP {} (block {}) is allocated to handle {} but its attachment is gone", a.ip, a.block, a.attribute.handle_id)?;
                let pod = (a.attribute.secondary.get("namespace"), a.attribute.secondary.get("pod"));
                if let (Some(ns), Some(pod)) = pod {
                    write!(f, " (pod {ns}/{pod})")?;
                }
                Ok(())
            }
            Problem::BlockOfUnknownNode { block, node } => {
                write!(f, "block {block} is affine to node {node}, which is not registered")
            }
            Problem::BlockOutsidePools { block } => write!(f, "block {block} is in no IP pool"),
            Problem::AffinityWithoutBlock(a) => {
                write!(f, "node {} has a {:?} affinity to block {}, which does not exist", a.node, a.state, a.cidr)
            }
            Problem::AffinityMismatch { affinity, block_affinity } => write!(
                f,
                "node {} has a confirmed affinity to block {}, but the block says {}",
                affinity.node,
                affinity.cidr,
                block_affinity.as_deref().unwrap_or("no affinity")
            ),
            Problem::HandleCountMismatch { handle, block, recorded, actual } => write!(
                f,
                "handle {handle} records {recorded} addresses in block {block}, the block holds {actual}"
            ),
        }
    }
}

/// The result of [`check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Allocations examined.
    pub allocations: usize,
    /// Allocations whose attachment exists.
    pub live: usize,
    /// Allocations whose liveness cannot be told from here.
    pub unknown: Vec<Allocation>,
    /// Every inconsistency found.
    pub problems: Vec<Problem>,
}

/// Checks every allocation with `is_live` and the documents against each other.
pub fn check(snap: &Snapshot, is_live: impl Fn(&AllocationAttribute) -> Liveness) -> CheckReport {
    let mut report = CheckReport::default();
    let nodes: BTreeSet<&str> = snap.nodes.iter().map(|n| n.name.as_str()).collect();
    // (handle, block) -> count, from the blocks and from the handles.
    let mut actual: BTreeMap<(String, String), u32> = BTreeMap::new();
    for block in &snap.blocks {
        if !snap
            .pools
            .iter()
            .any(|p| p.cidr.contains(block.cidr.network()))
        {
            report
                .problems
                .push(Problem::BlockOutsidePools { block: block.cidr });
        }
        if let Some(node) = block.node() {
            if !nodes.contains(node) {
                report.problems.push(Problem::BlockOfUnknownNode {
                    block: block.cidr,
                    node: node.to_string(),
                });
            }
        }
        for (handle, count) in block.handle_counts() {
            actual.insert((handle, block.cidr.to_string()), count);
        }
        for (ip, attribute) in block.allocated() {
            report.allocations += 1;
            let allocation = Allocation {
                ip,
                block: block.cidr,
                attribute: attribute.clone(),
            };
            match is_live(attribute) {
                Liveness::Live => report.live += 1,
                Liveness::Dead => report.problems.push(Problem::LeakedAllocation(allocation)),
                Liveness::Unknown => report.unknown.push(allocation),
            }
        }
    }
    for affinity in &snap.affinities {
        match snap.blocks.iter().find(|b| b.cidr == affinity.cidr) {
            None => report
                .problems
                .push(Problem::AffinityWithoutBlock(affinity.clone())),
            Some(block)
                if affinity.state == AffinityState::Confirmed
                    && block.node() != Some(&affinity.node) =>
            {
                report.problems.push(Problem::AffinityMismatch {
                    affinity: affinity.clone(),
                    block_affinity: block.affinity.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let mut recorded: BTreeMap<(String, String), u32> = BTreeMap::new();
    for handle in &snap.handles {
        for (block, count) in &handle.block {
            recorded.insert((handle.handle_id.clone(), block.clone()), *count);
        }
    }
    let keys: BTreeSet<&(String, String)> = actual.keys().chain(recorded.keys()).collect();
    for key in keys {
        let (a, r) = (
            actual.get(key).copied().unwrap_or(0),
            recorded.get(key).copied().unwrap_or(0),
        );
        if a != r {
            report.problems.push(Problem::HandleCountMismatch {
                handle: key.0.clone(),
                block: key.1.clone(),
                recorded: r,
                actual: a,
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pool(cidr: &str, block_size: u8) -> IpPool {
        IpPool {
            block_size,
            ..IpPool::new("p", cidr.parse().expect("cidr"))
        }
    }

    fn snapshot() -> Snapshot {
        let mut a = Block::new("10.0.0.0/26".parse().expect("cidr"), Some("node-a"));
        let attrs = BTreeMap::from([("netns".to_string(), "/gone".to_string())]);
        a.assign(2, "h1", &attrs);
        a.assign(1, "h2", &BTreeMap::new());
        let ghost = Block::new("10.0.0.64/26".parse().expect("cidr"), Some("ghost"));
        Snapshot {
            pools: vec![pool("10.0.0.0/24", 26)],
            blocks: vec![ghost, a],
            affinities: vec![
                BlockAffinity {
                    node: "node-a".into(),
                    cidr: "10.0.0.0/26".parse().expect("cidr"),
                    state: AffinityState::Confirmed,
                },
                BlockAffinity {
                    node: "node-b".into(),
                    cidr: "10.0.0.128/26".parse().expect("cidr"),
                    state: AffinityState::Pending,
                },
            ],
            handles: vec![
                Handle {
                    handle_id: "h1".into(),
                    block: BTreeMap::from([("10.0.0.0/26".to_string(), 2)]),
                    node: None,
                },
                Handle {
                    handle_id: "h2".into(),
                    block: BTreeMap::from([("10.0.0.0/26".to_string(), 3)]),
                    node: None,
                },
            ],
            nodes: vec![Node {
                name: "node-a".into(),
                address: None,
                asn: None,
                labels: BTreeMap::new(),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn usage_counts_pools_and_blocks_in_address_order() {
        let pools = usage(&snapshot());
        assert_eq!(pools.len(), 1);
        assert_eq!(
            pools[0].usage,
            Usage {
                total: 256,
                in_use: 3
            }
        );
        assert_eq!(pools[0].usage.percent(3), 1);
        assert_eq!(pools[0].usage.percent(253), 99);
        assert_eq!(pools[0].blocks[0].cidr.to_string(), "10.0.0.0/26");
        assert_eq!(pools[0].blocks[0].node.as_deref(), Some("node-a"));
        assert_eq!(pools[0].blocks[1].usage.in_use, 0);
        assert_eq!(
            Usage {
                total: 256,
                in_use: 4
            }
            .percent(4),
            2
        );
        assert_eq!(
            Usage {
                total: 256,
                in_use: 4
            }
            .percent(252),
            98
        );
    }

    #[test]
    fn ip_info_tells_in_use_free_and_foreign_addresses_apart() {
        let snap = snapshot();
        match ip_info(&snap, "10.0.0.1".parse().expect("ip")) {
            IpInfo::InUse {
                attribute,
                block_node,
                ..
            } => {
                assert_eq!(attribute.handle_id, "h1");
                assert_eq!(block_node.as_deref(), Some("node-a"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ip_info(&snap, "10.0.0.9".parse().expect("ip")),
            IpInfo::NotAssigned { pool: "p".into() }
        );
        assert_eq!(
            ip_info(&snap, "10.0.1.9".parse().expect("ip")),
            IpInfo::NotInPool
        );
    }

    #[test]
    fn check_finds_leaks_unknown_nodes_lost_affinities_and_bad_counts() {
        let report = check(&snapshot(), |a| {
            if a.secondary.contains_key("netns") {
                Liveness::Dead
            } else {
                Liveness::Unknown
            }
        });
        assert_eq!(report.allocations, 3);
        assert_eq!(report.unknown.len(), 1);
        let text: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 5, "{text:#?}");
        assert!(
            text.iter()
                .filter(|t| t.contains("attachment is gone"))
                .count()
                == 2
        );
        assert!(text
            .iter()
            .any(|t| t.contains("node ghost, which is not registered")));
        assert!(text
            .iter()
            .any(|t| t.contains("10.0.0.128/26, which does not exist")));
        assert!(text.iter().any(
            |t| t.contains("handle h2 records 3 addresses in block 10.0.0.0/26, the block holds 1")
        ));
    }
}
