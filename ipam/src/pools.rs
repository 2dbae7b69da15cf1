//! Pools and cluster settings: create, validate, list, delete.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::allocator::{delete_if_present, Ipam, IpamError, Result};
use crate::block::{family_bits, normalize};
use crate::datastore::{Datastore, DatastoreError};
use crate::store::{self, Doc};
use crate::types::{default_block_size, Block, BlockAffinity, IpPool, IpamConfig};

/// Smallest block prefix (largest block) allowed per family, as Calico:
/// a block is rewritten on every assign, so it must stay small.
const MIN_BLOCK_PREFIX_V4: u8 = 20;
const MIN_BLOCK_PREFIX_V6: u8 = 116;

/// Ranges no pod address may come from, with what they are. A pool that
/// overlaps one of them can never work (a pod on 127.0.0.1 or 224.0.0.1 is
/// unreachable, one on 169.254.1.1 is its own gateway).
const UNUSABLE_RANGES: [(&str, &str); 10] = [
    ("0.0.0.0/8", "\"this network\" range (RFC 1122)"),
    ("127.0.0.0/8", "loopback range"),
    (
        "169.254.0.0/16",
        "link-local range (the pods' gateway 169.254.1.1 is there)",
    ),
    ("224.0.0.0/4", "multicast range"),
    (
        "240.0.0.0/4",
        "reserved range (with the broadcast address 255.255.255.255)",
    ),
    ("::/128", "unspecified address"),
    ("::1/128", "loopback address"),
    ("::ffff:0:0/96", "reserved range of IPv4-mapped addresses"),
    (
        "fe80::/10",
        "link-local range (the pods' gateway fe80::ecee:eeff:feee:eeee is there)",
    ),
    ("ff00::/8", "multicast range"),
];

/// Addresses never handed out whatever the pool: the pods' gateways. Only
/// a pool stored before pools were validated can contain them.
const GATEWAYS: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 1, 1)),
    IpAddr::V6(std::net::Ipv6Addr::new(
        0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee,
    )),
];

/// Why no pool may cover `cidr`, if it overlaps a range pods cannot use.
pub fn unusable_range(cidr: &IpNetwork) -> Option<String> {
    if cidr.prefix() == 0 {
        return Some(format!(
            "{cidr} is the default route, not a range of pod addresses"
        ));
    }
    UNUSABLE_RANGES.iter().find_map(|(range, what)| {
        let range: IpNetwork = range.parse().ok()?;
        overlaps(cidr, &range).then(|| format!("{cidr} overlaps {range}, the {what}"))
    })
}

/// The addresses of `pool` that are never handed out: the pods' gateways
/// and, for an IPv4 pool smaller than a block (/27 to /30), its network and
/// broadcast addresses, which such a slice of a subnet keeps as a subnet
/// would. Larger pools hand out every address, as Calico's do: they are
/// routed as /32s, not subnets. A /31 or /32 pool has neither (RFC 3021).
pub fn reserved_addresses(pool: &IpPool) -> Vec<IpAddr> {
    let mut reserved: Vec<IpAddr> = GATEWAYS
        .iter()
        .copied()
        .filter(|ip| pool.cidr.contains(*ip))
        .collect();
    if let IpNetwork::V4(v4) = pool.cidr {
        if (default_block_size(&pool.cidr) + 1..=30).contains(&v4.prefix()) {
            reserved.push(IpAddr::V4(v4.network()));
            reserved.push(IpAddr::V4(v4.broadcast()));
        }
    }
    reserved
}

/// Why the pool's encapsulation cannot work, if it cannot: IPIP and VXLAN
/// on one pool (Calico refuses it too), or either on an IPv6 pool.
pub fn encapsulation_problem(pool: &IpPool) -> Option<String> {
    let never = crate::types::EncapMode::Never;
    if pool.ipip_mode != never && pool.vxlan_mode != never {
        return Some(format!(
            "ipipMode {:?} and vxlanMode {:?}: a pool uses IPIP or VXLAN, not both; set one of them to Never",
            pool.ipip_mode, pool.vxlan_mode
        ));
    }
    if pool.cidr.is_ipv6() && pool.ipip_mode != never {
        return Some("ipipMode must be Never on an IPv6 pool (IPIP carries IPv4)".to_string());
    }
    None
}

/// Checks a pool definition; returns it with its CIDR's host bits cleared.
pub fn validate_pool(pool: &IpPool) -> Result<IpPool> {
    let invalid = |reason: String| IpamError::InvalidPool {
        name: pool.name.clone(),
        reason,
    };
    if let Some(reason) = unusable_range(&pool.cidr) {
        return Err(invalid(reason));
    }
    if let Some(reason) = encapsulation_problem(pool) {
        return Err(invalid(reason));
    }
    let name_ok = !pool.name.is_empty()
        && pool.name.len() <= 253
        && !pool.name.starts_with('.')
        && pool
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !name_ok {
        return Err(invalid(
            "the name must be 1-253 letters, digits, '-', '.' or '_'".to_string(),
        ));
    }
    let bits = family_bits(&pool.cidr);
    let min_block = if bits == 32 {
        MIN_BLOCK_PREFIX_V4
    } else {
        MIN_BLOCK_PREFIX_V6
    };
    let prefix = pool.cidr.prefix();
    if pool.block_size < prefix || pool.block_size > bits {
        return Err(invalid(format!(
            "block size {} must be between the pool's prefix /{prefix} and /{bits}",
            pool.block_size
        )));
    }
    if pool.block_size < min_block {
        return Err(invalid(format!(
            "block size {} is too large a block: use /{min_block} to /{bits}",
            pool.block_size
        )));
    }
    let mut normalized = pool.clone();
    normalized.cidr = normalize(&pool.cidr);
    Ok(normalized)
}

/// Whether two networks share any address.
fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

impl<D: Datastore> Ipam<D> {
    /// Cluster IPAM settings (defaults when none are stored).
    pub fn config(&self) -> Result<IpamConfig> {
        Ok(store::get::<IpamConfig>(&self.ds, store::CONFIG_KEY)?
            .map(|d| d.value)
            .unwrap_or_default())
    }

    /// Stores cluster IPAM settings.
    pub fn set_config(&self, config: &IpamConfig) -> Result<()> {
        self.retry(|| {
            match store::get::<IpamConfig>(&self.ds, store::CONFIG_KEY)? {
                None => store::create(&self.ds, store::CONFIG_KEY, config)?,
                Some(doc) => store::update(&self.ds, store::CONFIG_KEY, config, &doc.revision)?,
            };
            Ok(())
        })
    }

    /// Every pool, sorted by name.
    pub fn pools(&self) -> Result<Vec<IpPool>> {
        let mut pools: Vec<IpPool> = store::list::<IpPool>(&self.ds, store::POOLS)?
            .into_iter()
            .map(|d| d.value)
            .collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pools)
    }

    /// Creates a pool; rejects a duplicate name or an overlapping CIDR.
    ///
    /// The overlap check reads the pools before creating; two operators
    /// creating overlapping pools under different names at the same instant
    /// could both succeed.
    pub fn create_pool(&self, pool: &IpPool) -> Result<()> {
        let pool = validate_pool(pool)?;
        for existing in self.pools()? {
            if existing.name == pool.name || overlaps(&existing.cidr, &pool.cidr) {
                return Err(IpamError::PoolExists {
                    name: pool.name.clone(),
                    existing: existing.name,
                });
            }
        }
        match store::create(&self.ds, &store::pool_key(&pool.name), &pool) {
            Ok(_) => {
                tracing::info!(name = %pool.name, cidr = %pool.cidr, "created IP pool");
                Ok(())
            }
            Err(DatastoreError::Conflict { .. }) => Err(IpamError::PoolExists {
                name: pool.name.clone(),
                existing: pool.name.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates `pool` only if no pool exists at all (the conflist's `ipam.pool`).
    /// Safe when several processes race: exactly one pool results (they
    /// all create the same key, so only one create wins).
    pub fn ensure_default_pool(&self, pool: &IpPool) -> Result<()> {
        if !self.ds.list(store::POOLS)?.is_empty() {
            return Ok(());
        }
        match self.create_pool(pool) {
            Err(IpamError::PoolExists { .. }) => Ok(()),
            other => other,
        }
    }

    /// Deletes a pool by name; refuses while any of its blocks holds an allocation.
    ///
    /// The pool is disabled first so that no new block is claimed from it,
    /// then its (empty) blocks and their affinities are deleted, then the pool.
    pub fn delete_pool(&self, name: &str) -> Result<()> {
        let key = store::pool_key(name);
        let Some(original) = store::get::<IpPool>(&self.ds, &key)? else {
            return Err(IpamError::PoolNotFound {
                name: name.to_string(),
            });
        };
        let cidr = original.value.cidr;
        let pool_blocks = || -> Result<Vec<Doc<Block>>> {
            let mut blocks = Vec::new();
            for block in store::list::<Block>(&self.ds, store::BLOCKS)? {
                if cidr.contains(block.value.cidr.network()) {
                    blocks.push(store::checked_block(block)?);
                }
            }
            Ok(blocks)
        };
        let in_use = |blocks: &[Doc<Block>]| blocks.iter().map(|b| b.value.in_use()).sum::<usize>();
        let count = in_use(&pool_blocks()?);
        if count > 0 {
            return Err(IpamError::PoolInUse {
                name: name.to_string(),
                in_use: count,
            });
        }

        let mut disabled = original.value.clone();
        disabled.disabled = true;
        store::update(&self.ds, &key, &disabled, &original.revision)?;
        let emptied = self.retry(|| {
            let blocks = pool_blocks()?;
            let count = in_use(&blocks);
            if count > 0 {
                return Ok(Some(count));
            }
            for block in &blocks {
                delete_if_present(&self.ds, &block.key, &block.revision)?;
            }
            Ok(None)
        });
        if let Ok(Some(count)) | Err(IpamError::PoolInUse { in_use: count, .. }) = emptied {
            // An assign won the race: give the pool back as it was.
            self.retry(|| {
                let Some(doc) = store::get::<IpPool>(&self.ds, &key)? else {
                    return Ok(());
                };
                store::update(&self.ds, &key, &original.value, &doc.revision)?;
                Ok(())
            })?;
            return Err(IpamError::PoolInUse {
                name: name.to_string(),
                in_use: count,
            });
        }
        emptied?;

        for affinity in store::list::<BlockAffinity>(&self.ds, store::AFFINITIES)? {
            if cidr.contains(affinity.value.cidr.network()) {
                delete_if_present(&self.ds, &affinity.key, &affinity.revision)?;
            }
        }
        self.retry(|| {
            let Some(doc) = store::get::<IpPool>(&self.ds, &key)? else {
                return Ok(());
            };
            delete_if_present(&self.ds, &key, &doc.revision)
        })?;
        tracing::info!(%name, %cidr, "deleted IP pool");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EncapMode;

    fn pool(ipip: EncapMode, vxlan: EncapMode) -> IpPool {
        IpPool {
            ipip_mode: ipip,
            vxlan_mode: vxlan,
            ..IpPool::new("p", "10.244.0.0/16".parse().unwrap())
        }
    }

    #[test]
    fn a_pool_with_both_ipip_and_vxlan_is_refused_with_a_clear_message() {
        let err = validate_pool(&pool(EncapMode::Always, EncapMode::CrossSubnet)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("IPIP or VXLAN, not both"), "{msg}");
        for (ipip, vxlan) in [
            (EncapMode::Always, EncapMode::Never),
            (EncapMode::Never, EncapMode::CrossSubnet),
            (EncapMode::Never, EncapMode::Never),
        ] {
            validate_pool(&pool(ipip, vxlan)).unwrap();
        }
        let mut v6 = pool(EncapMode::Always, EncapMode::Never);
        v6.cidr = "fd00::/64".parse().unwrap();
        v6.block_size = 122;
        assert!(encapsulation_problem(&v6).unwrap().contains("IPv6"));
    }
}
