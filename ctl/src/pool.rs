//! `tabbyctl pool create|list|update|delete`.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;
use tabby_ipam::pools::validate_pool;
use tabby_ipam::types::default_block_size;
use tabby_ipam::{store, DatastoreError, EncapMode, IpPool, Ipam};

use crate::table::{Align, Table};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create an IP pool.
    Create(CreateArgs),
    /// List IP pools.
    List,
    /// Change a pool's encapsulation, natOutgoing or disabled flag in place
    /// (the agents follow: routes change, pods keep their addresses).
    Update(UpdateArgs),
    /// Delete an IP pool (refused while any of its addresses is allocated).
    Delete {
        /// The pool's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The pool's name, e.g. default-ipv4-ippool.
    #[arg(long)]
    name: String,
    /// The pool's CIDR, e.g. 10.244.0.0/16.
    #[arg(long)]
    cidr: IpNetwork,
    /// Prefix length of the per-node blocks (default 26 for IPv4, 122 for IPv6).
    #[arg(long)]
    block_size: Option<u8>,
    /// Masquerade traffic from the pool that leaves all pools.
    #[arg(long)]
    nat_outgoing: bool,
    /// IPIP encapsulation between nodes.
    #[arg(long, value_enum, default_value_t = Mode::Never, ignore_case = true)]
    ipip_mode: Mode,
    /// VXLAN encapsulation between nodes.
    #[arg(long, value_enum, default_value_t = Mode::Never, ignore_case = true)]
    vxlan_mode: Mode,
    /// Create the pool disabled (no new addresses are handed out from it).
    #[arg(long)]
    disabled: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The pool's name.
    name: String,
    /// VXLAN encapsulation between nodes.
    #[arg(long, value_enum, ignore_case = true)]
    vxlan_mode: Option<Mode>,
    /// IPIP encapsulation between nodes.
    #[arg(long, value_enum, ignore_case = true)]
    ipip_mode: Option<Mode>,
    /// Masquerade traffic from the pool that leaves all pools.
    #[arg(long, action = clap::ArgAction::Set)]
    nat_outgoing: Option<bool>,
    /// Hand out no new addresses from the pool.
    #[arg(long, action = clap::ArgAction::Set)]
    disabled: Option<bool>,
}

impl UpdateArgs {
    /// `pool` with the requested fields changed.
    fn apply(&self, pool: &IpPool) -> IpPool {
        let mut new = pool.clone();
        if let Some(m) = self.vxlan_mode {
            new.vxlan_mode = m.into();
        }
        if let Some(m) = self.ipip_mode {
            new.ipip_mode = m.into();
        }
        if let Some(b) = self.nat_outgoing {
            new.nat_outgoing = b;
        }
        if let Some(b) = self.disabled {
            new.disabled = b;
        }
        new
    }
}

/// How many times `pool update` re-reads the pool after losing a race.
const UPDATE_ATTEMPTS: usize = 10;

/// Reads the pool, changes it and writes it back at the revision it read
/// (compare-and-swap), re-reading when another writer got there first.
/// Returns the pool as stored and whether anything changed.
fn update(ipam: &Ipam<crate::Store>, args: &UpdateArgs) -> anyhow::Result<(IpPool, bool)> {
    let ds = ipam.datastore();
    let key = store::pool_key(&args.name);
    for _ in 0..UPDATE_ATTEMPTS {
        let doc = store::get::<IpPool>(ds, &key)?
            .with_context(|| format!("no IP pool {} (tabbyctl pool list)", args.name))?;
        let new = args.apply(&doc.value);
        if new == doc.value {
            return Ok((new, false));
        }
        let new = validate_pool(&new)?;
        match store::update(ds, &key, &new, &doc.revision) {
            Ok(_) => return Ok((new, true)),
            Err(DatastoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!(
        "pool {} kept changing under us ({UPDATE_ATTEMPTS} conflicts): try again",
        args.name
    )
}

/// An encapsulation mode as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "PascalCase")]
enum Mode {
    Never,
    Always,
    CrossSubnet,
}

impl From<Mode> for EncapMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Never => EncapMode::Never,
            Mode::Always => EncapMode::Always,
            Mode::CrossSubnet => EncapMode::CrossSubnet,
        }
    }
}

pub fn run(ipam: &Ipam<crate::Store>, cmd: PoolCommand) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::Create(args) => {
            let pool = IpPool {
                name: args.name.clone(),
                cidr: args.cidr,
                block_size: args
                    .block_size
                    .unwrap_or_else(|| default_block_size(&args.cidr)),
                ipip_mode: args.ipip_mode.into(),
                vxlan_mode: args.vxlan_mode.into(),
                nat_outgoing: args.nat_outgoing,
                disabled: args.disabled,
                node_selector: "all()".to_string(),
            };
            ipam.create_pool(&pool)
                .with_context(|| format!("creating pool {}", args.name))?;
            println!("Successfully created IP pool {}", args.name);
        }
        PoolCommand::List => print!("{}", list_table(&ipam.pools()?).plain()),
        PoolCommand::Update(args) => {
            let (pool, changed) =
                update(ipam, &args).with_context(|| format!("updating pool {}", args.name))?;
            let what = if changed {
                "Successfully updated"
            } else {
                "Unchanged:"
            };
            println!(
                "{what} IP pool {} (ipipMode {:?}, vxlanMode {:?}, natOutgoing {}, disabled {})",
                pool.name, pool.ipip_mode, pool.vxlan_mode, pool.nat_outgoing, pool.disabled
            );
        }
        PoolCommand::Delete { name } => {
            ipam.delete_pool(&name)
                .with_context(|| format!("deleting pool {name}"))?;
            println!("Successfully deleted IP pool {name}");
        }
    }
    Ok(())
}

fn mode(m: EncapMode) -> String {
    format!("{m:?}")
}

/// `calicoctl get ippool -o wide`'s columns.
fn list_table(pools: &[IpPool]) -> Table {
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("CIDR", Align::Left),
        ("BLOCKSIZE", Align::Left),
        ("NAT", Align::Left),
        ("IPIPMODE", Align::Left),
        ("VXLANMODE", Align::Left),
        ("DISABLED", Align::Left),
        ("SELECTOR", Align::Left),
    ]);
    for p in pools {
        table.row(vec![
            p.name.clone(),
            p.cidr.to_string(),
            p.block_size.to_string(),
            p.nat_outgoing.to_string(),
            mode(p.ipip_mode),
            mode(p.vxlan_mode),
            p.disabled.to_string(),
            p.node_selector.clone(),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tabby_ipam::datastore::{Entry, Result};
    use tabby_ipam::{Datastore, MemDatastore, NodeLock, Revision};

    use super::*;

    /// A datastore where another writer disables the pool just before our
    /// first update lands, so that update meets a conflict.
    struct RacingWriter {
        inner: MemDatastore,
        raced: AtomicBool,
    }

    impl Datastore for RacingWriter {
        fn get(&self, key: &str) -> Result<Option<Entry>> {
            self.inner.get(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
            self.inner.list(prefix)
        }
        fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
            self.inner.create(key, value)
        }
        fn update(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
            if !self.raced.swap(true, Ordering::SeqCst) {
                let doc = store::get::<IpPool>(&self.inner, key)?.unwrap();
                let mut theirs = doc.value.clone();
                theirs.disabled = true;
                store::update(&self.inner, key, &theirs, &doc.revision)?;
            }
            self.inner.update(key, value, expected)
        }
        fn delete(&self, key: &str, expected: &Revision) -> Result<()> {
            self.inner.delete(key, expected)
        }
        fn ping(&self) -> Result<()> {
            self.inner.ping()
        }
        fn describe(&self) -> String {
            "racing".into()
        }
        fn node_lock(&self, node: &str) -> Result<NodeLock> {
            self.inner.node_lock(node)
        }
    }

    fn pool() -> IpPool {
        IpPool::new("default-ipv4-ippool", "10.244.0.0/16".parse().unwrap())
    }

    fn args(vxlan: Option<Mode>, ipip: Option<Mode>) -> UpdateArgs {
        UpdateArgs {
            name: "default-ipv4-ippool".into(),
            vxlan_mode: vxlan,
            ipip_mode: ipip,
            nat_outgoing: Some(true),
            disabled: None,
        }
    }

    #[test]
    fn an_update_that_loses_a_race_rereads_and_keeps_the_other_writers_change() {
        let store: crate::Store = Box::new(RacingWriter {
            inner: MemDatastore::new(),
            raced: AtomicBool::new(false),
        });
        let ipam = Ipam::new(store);
        ipam.create_pool(&pool()).unwrap();
        let (stored, changed) = update(&ipam, &args(Some(Mode::CrossSubnet), None)).unwrap();
        assert!(changed);
        let now = ipam.pools().unwrap().remove(0);
        assert_eq!(now, stored);
        assert_eq!(now.vxlan_mode, EncapMode::CrossSubnet);
        assert!(now.nat_outgoing, "our change");
        assert!(now.disabled, "the other writer's change");
    }

    #[test]
    fn an_update_that_would_turn_on_both_encapsulations_is_refused_and_changes_nothing() {
        let ipam = Ipam::new(Box::new(MemDatastore::new()) as crate::Store);
        let mut vxlan = pool();
        vxlan.vxlan_mode = EncapMode::Always;
        ipam.create_pool(&vxlan).unwrap();
        let err = update(&ipam, &args(None, Some(Mode::Always))).unwrap_err();
        assert!(format!("{err:#}").contains("not both"), "{err:#}");
        assert_eq!(ipam.pools().unwrap(), vec![vxlan.clone()]);
        // Switching over in one update is fine.
        let (stored, _) = update(&ipam, &args(Some(Mode::Never), Some(Mode::Always))).unwrap();
        assert_eq!(
            (stored.ipip_mode, stored.vxlan_mode),
            (EncapMode::Always, EncapMode::Never)
        );
        let missing = UpdateArgs {
            name: "nope".into(),
            ..args(None, None)
        };
        assert!(format!("{:#}", update(&ipam, &missing).unwrap_err()).contains("no IP pool nope"));
    }
}
