//! Assigning one named address (Calico's `AssignIP`; the pod annotation
//! `tabby.dev/ipAddrs`).
//!
//! The address must lie in an enabled pool. Its block is used whoever it is
//! affine to; a block that does not exist yet is claimed for the asking node
//! first (the same two-phase claim as [`Ipam::assign`], so a race with
//! another node is settled by whoever creates the block). The write is the
//! same compare-and-swap as every assign: handle first, then the block.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::allocator::{check_request, conflict_key, AssignArgs, Backoff, Ipam, IpamError, Result};
use crate::block::block_of;
use crate::datastore::{Datastore, DatastoreError};
use crate::store::{self, Doc};

impl<D: Datastore> Ipam<D> {
    /// Assigns exactly `ip` to `args.handle` (the counts and pools of
    /// `args` are ignored). Returns it with its block's prefix length.
    /// Asking again for an address the handle already holds is success;
    /// one held by another handle is [`IpamError::InUse`].
    pub fn assign_ip(&self, args: &AssignArgs, ip: IpAddr) -> Result<IpNetwork> {
        check_request(args)?;
        let pool = self
            .pools()?
            .into_iter()
            .find(|p| !p.disabled && p.cidr.contains(ip))
            .ok_or(IpamError::NotInPool { ip })?;
        let cidr = block_of(&pool.cidr, pool.block_size, ip).ok_or(IpamError::NotInPool { ip })?;
        let mut args = args.clone();
        args.attrs
            .entry("node".to_string())
            .or_insert_with(|| args.node.clone());
        let mut backoff = Backoff::new();
        loop {
            let step = self.fixed_step(&args, ip, &cidr);
            if let Some(key) = conflict_key(&step) {
                backoff.conflict(key)?;
                continue;
            }
            if step? {
                return IpNetwork::new(ip, pool.block_size).map_err(|e| IpamError::InvalidPool {
                    name: pool.name.clone(),
                    reason: e.to_string(),
                });
            }
        }
    }

    /// One attempt: `true` when `ip` is now held by the handle, `false`
    /// when the block was just claimed (go again).
    fn fixed_step(&self, args: &AssignArgs, ip: IpAddr, cidr: &IpNetwork) -> Result<bool> {
        let Some(block) = store::get_block(&self.ds, cidr)? else {
            self.try_claim(&args.node, cidr)?;
            return Ok(false);
        };
        let Doc {
            key,
            value: mut updated,
            revision,
        } = store::checked_block(block)?;
        if updated.deleted {
            // Being released right now: wait for it like for any writer.
            return Err(DatastoreError::Conflict { key }.into());
        }
        match updated.assign_ip(ip, &args.handle, &args.attrs) {
            Ok(true) => {}
            Ok(false) => return Err(IpamError::NotInPool { ip }),
            Err(holder) if holder == args.handle => return Ok(true),
            Err(holder) => return Err(IpamError::InUse { ip, holder }),
        }
        self.handle_add(&args.handle, Some(args.node.as_str()), &updated.cidr, 1)?;
        match store::update(&self.ds, &key, &updated, &revision) {
            Ok(_) => Ok(true),
            Err(e) => {
                if let Err(undo) =
                    self.handle_add(&args.handle, Some(args.node.as_str()), &updated.cidr, -1)
                {
                    tracing::warn!(handle = %args.handle, error = %undo, "handle count left too high");
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::mem::MemDatastore;
    use crate::types::IpPool;

    fn ipam() -> Ipam<MemDatastore> {
        let ipam = Ipam::new(MemDatastore::new());
        let pool: IpPool = serde_json::from_value(serde_json::json!({
            "name": "p", "cidr": "10.70.0.0/24", "blockSize": 28
        }))
        .unwrap();
        ipam.create_pool(&pool).unwrap();
        ipam
    }

    fn args(handle: &str, node: &str) -> AssignArgs {
        AssignArgs {
            handle: handle.into(),
            node: node.into(),
            attrs: BTreeMap::new(),
            num_v4: 1,
            num_v6: 0,
            pools: Vec::new(),
        }
    }

    #[test]
    fn a_fixed_address_is_assigned_once_and_then_refused_to_others() {
        let ipam = ipam();
        let ip: IpAddr = "10.70.0.37".parse().unwrap();
        let net = ipam.assign_ip(&args("net.a", "n1"), ip).unwrap();
        assert_eq!(net.to_string(), "10.70.0.37/28");
        assert_eq!(ipam.assign_ip(&args("net.a", "n1"), ip).unwrap(), net);
        let err = ipam.assign_ip(&args("net.b", "n2"), ip).unwrap_err();
        assert!(
            matches!(&err, IpamError::InUse { holder, .. } if holder == "net.a"),
            "{err}"
        );
        assert_eq!(ipam.addresses_of("net.a").unwrap(), vec![ip]);
        // The block was claimed for n1; an automatic assign there skips the fixed address.
        let auto = ipam.assign(&args("net.c", "n1")).unwrap();
        assert_eq!(auto[0].ip().to_string(), "10.70.0.32");
        let next = ipam.assign(&args("net.d", "n1")).unwrap();
        assert_ne!(next[0].ip(), ip);
        assert_eq!(ipam.release_by_handle("net.a").unwrap().len(), 1);
        assert!(ipam.addresses_of("net.a").unwrap().is_empty());
    }

    #[test]
    fn an_address_outside_every_pool_is_refused() {
        let ipam = ipam();
        let err = ipam
            .assign_ip(&args("net.a", "n1"), "10.71.0.1".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, IpamError::NotInPool { .. }), "{err}");
    }
}
