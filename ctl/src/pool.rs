//! `tabbyctl pool create|list|delete`.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;
use tabby_ipam::types::default_block_size;
use tabby_ipam::{EncapMode, IpPool, Ipam};

use crate::table::{Align, Table};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create an IP pool.
    Create(CreateArgs),
    /// List IP pools.
    List,
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
            if args.ipip_mode != Mode::Never && args.vxlan_mode != Mode::Never {
                anyhow::bail!("a pool uses IPIP or VXLAN, not both: set one of --ipip-mode / --vxlan-mode to Never");
            }
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
