//! Pure block arithmetic: ordinals and addresses, and the per-block
//! allocation table (no I/O).
//!
//! A block's ordinal `i` is the address `network(block) + i`. The table maps
//! each ordinal to an index into the block's attributes (one entry per
//! handle, shared by that handle's ordinals). Free ordinals are handed out
//! in `unallocated` order and a released ordinal goes to the back, so an
//! address is not reused right after it was freed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::types::{AllocationAttribute, Block};

/// The address as an integer (IPv4 in the low 32 bits).
pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address `offset` after `base`, in `base`'s family; `None` on overflow.
pub fn ip_add(base: IpAddr, offset: u128) -> Option<IpAddr> {
    let sum = ip_to_u128(base).checked_add(offset)?;
    Some(match base {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(sum).ok()?)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(sum)),
    })
}

/// Bits in an address of this network's family.
pub fn family_bits(net: &IpNetwork) -> u8 {
    if net.is_ipv4() {
        32
    } else {
        128
    }
}

/// Number of addresses in `net` (saturating at `u128::MAX` for `::/0`).
pub fn net_size(net: &IpNetwork) -> u128 {
    let host_bits = u32::from(family_bits(net) - net.prefix());
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

/// `net` with its host bits cleared.
pub fn normalize(net: &IpNetwork) -> IpNetwork {
    // The prefix is valid for the family, so `new` cannot fail.
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(*net)
}

/// The datastore key form of a CIDR: `/` becomes `-` (`10.244.0.0-26`).
pub fn cidr_key(net: &IpNetwork) -> String {
    format!("{}-{}", net.network(), net.prefix())
}

/// Parses [`cidr_key`]'s form back (also accepts `a.b.c.d/n`).
pub fn parse_cidr_key(key: &str) -> Option<IpNetwork> {
    let (ip, prefix) = key.rsplit_once('-').or_else(|| key.rsplit_once('/'))?;
    IpNetwork::new(ip.parse().ok()?, prefix.parse().ok()?).ok()
}

/// The `block_size` block of `pool` that contains `ip`, if `pool` contains it.
pub fn block_of(pool: &IpNetwork, block_size: u8, ip: IpAddr) -> Option<IpNetwork> {
    if !pool.contains(ip) || block_size < pool.prefix() || block_size > family_bits(pool) {
        return None;
    }
    IpNetwork::new(ip, block_size)
        .ok()
        .map(|net| normalize(&net))
}

/// The `index`-th `block_size` block of `pool`; `None` past the end.
pub fn nth_block(pool: &IpNetwork, block_size: u8, index: u128) -> Option<IpNetwork> {
    let bits = family_bits(pool);
    if block_size < pool.prefix() || block_size > bits {
        return None;
    }
    let count = 1u128
        .checked_shl(u32::from(block_size - pool.prefix()))
        .unwrap_or(u128::MAX);
    if index >= count {
        return None;
    }
    let stride = 1u128.checked_shl(u32::from(bits - block_size)).unwrap_or(0);
    let base = ip_add(pool.network(), index.checked_mul(stride)?)?;
    IpNetwork::new(base, block_size).ok()
}

/// The node name in a block affinity `host:<node>`.
pub fn affinity_node(affinity: &str) -> Option<&str> {
    affinity.strip_prefix("host:")
}

impl Block {
    /// A new empty block, affine to `node` when given.
    pub fn new(cidr: IpNetwork, node: Option<&str>) -> Self {
        let cidr = normalize(&cidr);
        let size = usize::try_from(net_size(&cidr)).unwrap_or(0);
        Self {
            cidr,
            affinity: node.map(|n| format!("host:{n}")),
            strict_affinity: node.is_some(),
            allocations: vec![None; size],
            unallocated: (0..size).collect(),
            attributes: Vec::new(),
            deleted: false,
        }
    }

    /// The node this block is affine to.
    pub fn node(&self) -> Option<&str> {
        self.affinity.as_deref().and_then(affinity_node)
    }

    /// Checks the table is consistent (after reading it from storage).
    pub fn validate(&self) -> Result<(), String> {
        let size = net_size(&self.cidr);
        if size != self.allocations.len() as u128 {
            return Err(format!(
                "{} has {} allocation slots",
                self.cidr,
                self.allocations.len()
            ));
        }
        if let Some(bad) = self
            .allocations
            .iter()
            .flatten()
            .find(|&&a| a >= self.attributes.len())
        {
            return Err(format!("allocation points at missing attribute {bad}"));
        }
        let mut seen = vec![false; self.allocations.len()];
        for &ordinal in &self.unallocated {
            match (self.allocations.get(ordinal), seen.get_mut(ordinal)) {
                (Some(None), Some(flag)) if !*flag => *flag = true,
                _ => {
                    return Err(format!(
                        "unallocated ordinal {ordinal} is invalid or in use"
                    ))
                }
            }
        }
        if self.unallocated.len() != self.free() {
            return Err("unallocated list does not match the free slots".to_string());
        }
        Ok(())
    }

    /// Addresses in the block.
    pub fn total(&self) -> usize {
        self.allocations.len()
    }

    /// Addresses allocated.
    pub fn in_use(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_some()).count()
    }

    /// Addresses free.
    pub fn free(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_none()).count()
    }

    /// The address of `ordinal`.
    pub fn ip_at(&self, ordinal: usize) -> Option<IpAddr> {
        if ordinal >= self.allocations.len() {
            return None;
        }
        ip_add(self.cidr.network(), ordinal as u128)
    }

    /// The ordinal of `ip`, if the block contains it.
    pub fn ordinal_of(&self, ip: IpAddr) -> Option<usize> {
        if !self.cidr.contains(ip) {
            return None;
        }
        let offset = ip_to_u128(ip) - ip_to_u128(self.cidr.network());
        usize::try_from(offset)
            .ok()
            .filter(|&o| o < self.allocations.len())
    }

    /// The attributes of the allocation of `ip`, if allocated.
    pub fn attribute_of(&self, ip: IpAddr) -> Option<&AllocationAttribute> {
        let index = (*self.allocations.get(self.ordinal_of(ip)?)?)?;
        self.attributes.get(index)
    }

    /// Every allocated address with its attributes, in address order.
    pub fn allocated(&self) -> impl Iterator<Item = (IpAddr, &AllocationAttribute)> + '_ {
        self.allocations
            .iter()
            .enumerate()
            .filter_map(|(ordinal, slot)| {
                let attr = self.attributes.get((*slot)?)?;
                Some((self.ip_at(ordinal)?, attr))
            })
    }

    /// How many addresses each handle holds here.
    pub fn handle_counts(&self) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for (_, attr) in self.allocated() {
            *counts.entry(attr.handle_id.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Free addresses that are not `reserved`: what [`Block::assign_except`] can hand out.
    pub fn assignable(&self, reserved: &[IpAddr]) -> usize {
        self.unallocated
            .iter()
            .filter(|&&o| !self.ip_at(o).is_some_and(|ip| reserved.contains(&ip)))
            .count()
    }

    /// Allocates up to `n` free addresses to `handle` (fewer if the block is full).
    pub fn assign(
        &mut self,
        n: usize,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Vec<IpAddr> {
        self.assign_except(n, handle, attrs, &[])
    }

    /// Like [`Block::assign`], but never hands out an address of `reserved`
    /// (those stay free, in their place in the queue).
    pub fn assign_except(
        &mut self,
        n: usize,
        handle: &str,
        attrs: &BTreeMap<String, String>,
        reserved: &[IpAddr],
    ) -> Vec<IpAddr> {
        let mut ordinals = Vec::with_capacity(n);
        let mut kept = Vec::with_capacity(self.unallocated.len());
        for &ordinal in &self.unallocated {
            let usable = !self.ip_at(ordinal).is_some_and(|ip| reserved.contains(&ip));
            if usable && ordinals.len() < n {
                ordinals.push(ordinal);
            } else {
                kept.push(ordinal);
            }
        }
        let take = ordinals.len();
        if take == 0 {
            return Vec::new();
        }
        self.unallocated = kept;
        let index = self.attributes.len();
        self.attributes.push(AllocationAttribute {
            handle_id: handle.to_string(),
            secondary: attrs.clone(),
        });
        let mut ips = Vec::with_capacity(take);
        for ordinal in ordinals {
            if let Some(slot) = self.allocations.get_mut(ordinal) {
                *slot = Some(index);
            }
            if let Some(ip) = self.ip_at(ordinal) {
                ips.push(ip);
            }
        }
        ips
    }

    /// Allocates exactly `ip` to `handle`; `Err` names the handle holding
    /// it already (`Ok(false)`: `ip` is not in this block).
    pub fn assign_ip(
        &mut self,
        ip: IpAddr,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<bool, String> {
        let Some(ordinal) = self.ordinal_of(ip) else {
            return Ok(false);
        };
        if let Some(holder) = self.slot_handle(ordinal) {
            return Err(holder.to_string());
        }
        let index = self.attributes.len();
        self.attributes.push(AllocationAttribute {
            handle_id: handle.to_string(),
            secondary: attrs.clone(),
        });
        self.unallocated.retain(|&o| o != ordinal);
        if let Some(slot) = self.allocations.get_mut(ordinal) {
            *slot = Some(index);
        }
        Ok(true)
    }

    /// Releases every address of `handle`; returns them.
    pub fn release_handle(&mut self, handle: &str) -> Vec<IpAddr> {
        let ordinals: Vec<usize> = (0..self.allocations.len())
            .filter(|&o| self.slot_handle(o) == Some(handle))
            .collect();
        let ips = ordinals.iter().filter_map(|&o| self.ip_at(o)).collect();
        for ordinal in ordinals {
            self.free_ordinal(ordinal);
        }
        self.compact_attributes();
        ips
    }

    /// Releases `ip`; returns the handle that held it, `None` if it was free.
    pub fn release_ip(&mut self, ip: IpAddr) -> Option<String> {
        let ordinal = self.ordinal_of(ip)?;
        let handle = self.slot_handle(ordinal)?.to_string();
        self.free_ordinal(ordinal);
        self.compact_attributes();
        Some(handle)
    }

    fn slot_handle(&self, ordinal: usize) -> Option<&str> {
        let index = (*self.allocations.get(ordinal)?)?;
        self.attributes.get(index).map(|a| a.handle_id.as_str())
    }

    fn free_ordinal(&mut self, ordinal: usize) {
        if let Some(slot) = self.allocations.get_mut(ordinal) {
            if slot.take().is_some() {
                self.unallocated.push(ordinal);
            }
        }
    }

    /// Drops attributes no ordinal points at and renumbers the rest.
    fn compact_attributes(&mut self) {
        let mut used = vec![false; self.attributes.len()];
        for &index in self.allocations.iter().flatten() {
            if let Some(flag) = used.get_mut(index) {
                *flag = true;
            }
        }
        let mut remap = vec![None; self.attributes.len()];
        let mut kept = Vec::new();
        for (old, attr) in std::mem::take(&mut self.attributes).into_iter().enumerate() {
            if used[old] {
                remap[old] = Some(kept.len());
                kept.push(attr);
            }
        }
        self.attributes = kept;
        for slot in &mut self.allocations {
            *slot = slot.and_then(|old| remap.get(old).copied().flatten());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().expect("cidr")
    }

    fn attrs() -> BTreeMap<String, String> {
        BTreeMap::from([("pod".to_string(), "p".to_string())])
    }

    #[test]
    fn ordinals_map_to_addresses_both_ways() {
        let block = Block::new(net("10.244.1.64/26"), Some("node-a"));
        assert_eq!(block.total(), 64);
        assert_eq!(block.ip_at(0), Some("10.244.1.64".parse().expect("ip")));
        assert_eq!(block.ip_at(63), Some("10.244.1.127".parse().expect("ip")));
        assert_eq!(block.ip_at(64), None);
        assert_eq!(
            block.ordinal_of("10.244.1.70".parse().expect("ip")),
            Some(6)
        );
        assert_eq!(block.ordinal_of("10.244.1.128".parse().expect("ip")), None);
        assert_eq!(block.node(), Some("node-a"));
        let v6 = Block::new(net("fd00::40/122"), None);
        assert_eq!(v6.total(), 64);
        assert_eq!(v6.ip_at(1), Some("fd00::41".parse().expect("ip")));
    }

    #[test]
    fn blocks_of_a_pool_are_enumerated_in_order() {
        let pool = net("10.244.0.0/24");
        assert_eq!(nth_block(&pool, 26, 0), Some(net("10.244.0.0/26")));
        assert_eq!(nth_block(&pool, 26, 3), Some(net("10.244.0.192/26")));
        assert_eq!(nth_block(&pool, 26, 4), None);
        assert_eq!(
            block_of(&pool, 26, "10.244.0.77".parse().expect("ip")),
            Some(net("10.244.0.64/26"))
        );
        assert_eq!(
            block_of(&pool, 26, "10.245.0.77".parse().expect("ip")),
            None
        );
        assert_eq!(
            nth_block(&net("fd00::/64"), 122, 2),
            Some(net("fd00::80/122"))
        );
    }

    #[test]
    fn cidr_keys_round_trip() {
        for s in ["10.244.0.0/26", "fd00::/122"] {
            assert_eq!(parse_cidr_key(&cidr_key(&net(s))), Some(net(s)));
        }
        assert_eq!(cidr_key(&net("10.244.0.0/26")), "10.244.0.0-26");
    }

    #[test]
    fn assign_and_release_keep_the_table_consistent() {
        let mut block = Block::new(net("10.0.0.0/29"), Some("n"));
        let a = block.assign(2, "h1", &attrs());
        let b = block.assign(1, "h2", &attrs());
        assert_eq!(a.len(), 2);
        assert_eq!(b, vec!["10.0.0.2".parse::<IpAddr>().expect("ip")]);
        assert_eq!(block.in_use(), 3);
        assert_eq!(block.handle_counts().get("h1"), Some(&2));
        assert_eq!(block.release_handle("h1"), a);
        assert_eq!(block.in_use(), 1);
        assert_eq!(block.attributes.len(), 1);
        assert_eq!(
            block.attribute_of(b[0]).map(|a| a.handle_id.as_str()),
            Some("h2")
        );
        assert_eq!(block.release_ip(b[0]), Some("h2".to_string()));
        assert_eq!(block.release_ip(b[0]), None);
        assert_eq!(block.in_use(), 0);
        block.validate().expect("valid");
        // Freed addresses go to the back of the queue.
        let next = block.assign(1, "h3", &attrs());
        assert_eq!(next, vec!["10.0.0.3".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn assign_stops_at_a_full_block() {
        let mut block = Block::new(net("10.0.0.0/30"), None);
        assert_eq!(block.assign(10, "h", &attrs()).len(), 4);
        assert!(block.assign(1, "h2", &attrs()).is_empty());
        assert_eq!(block.free(), 0);
        block.validate().expect("valid");
    }

    #[test]
    fn validate_rejects_inconsistent_tables() {
        let mut block = Block::new(net("10.0.0.0/30"), None);
        block.allocations[0] = Some(5);
        assert!(block.validate().is_err());
        let mut block = Block::new(net("10.0.0.0/30"), None);
        block.unallocated.push(0);
        assert!(block.validate().is_err());
        let mut block = Block::new(net("10.0.0.0/30"), None);
        block.allocations.pop();
        assert!(block.validate().is_err());
    }
}
