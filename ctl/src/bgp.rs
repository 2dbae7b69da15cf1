//! `tabbyctl bgp peer create|list|delete`, `tabbyctl bgp filter
//! create|list|delete` and `tabbyctl bgp config set|show`: Calico's BGPPeer,
//! BGPFilter and BGPConfiguration resources in Tabby's datastore.

use std::net::IpAddr;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use tabby_ipam::resources::{self, BgpConfiguration, BgpPeer, ResourceError};
use tabby_ipam::DatastoreError;

use crate::table::{Align, Table};

mod filter;

pub use filter::FilterCommand;

#[derive(Debug, Subcommand)]
pub enum BgpCommand {
    /// Explicit BGP peers (external routers, route reflectors).
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Import and export filters that peers name (Calico's BGPFilter).
    #[command(subcommand)]
    Filter(FilterCommand),
    /// Cluster BGP settings.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Create a peer: global, or for one node with --node.
    Create(PeerArgs),
    /// List peers.
    List,
    /// Delete a peer.
    Delete {
        /// The peer's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Unique name.
    #[arg(long)]
    name: String,
    /// The peer's address.
    #[arg(long)]
    peer_ip: IpAddr,
    /// The peer's AS number.
    #[arg(long)]
    as_number: u32,
    /// Only this node peers with it (a node-specific peer).
    #[arg(long)]
    node: Option<String>,
    /// TCP MD5 password.
    #[arg(long)]
    password: Option<String>,
    /// A BGP filter for this peer's routes, by name; repeat for more, tried in order.
    #[arg(long = "filter", value_name = "NAME")]
    filters: Vec<String>,
    /// Most prefixes the peer may announce; more resets the session (Cease 6/1).
    #[arg(long)]
    max_prefix: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Change the cluster AS number and/or the node-to-node mesh.
    Set {
        /// The default AS of every node.
        #[arg(long)]
        as_number: Option<u32>,
        /// Full-mesh iBGP among nodes.
        #[arg(long, value_enum)]
        node_to_node_mesh: Option<OnOff>,
    },
    /// Show the cluster BGP settings.
    Show,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

pub fn run(ds: &crate::Store, cmd: BgpCommand) -> anyhow::Result<()> {
    match cmd {
        BgpCommand::Peer(PeerCommand::Create(a)) => {
            let peer = BgpPeer {
                name: a.name,
                peer_ip: a.peer_ip,
                as_number: a.as_number,
                node: a.node,
                password: a.password,
                filters: a.filters,
                max_prefix: a.max_prefix,
            };
            match resources::create_bgp_peer(ds, &peer) {
                Err(ResourceError::Datastore(DatastoreError::Conflict { .. })) => {
                    anyhow::bail!("BGP peer {} already exists", peer.name)
                }
                r => r.context("create BGP peer")?,
            }
            println!("Successfully created BGP peer {}", peer.name);
        }
        BgpCommand::Peer(PeerCommand::List) => {
            let mut t = Table::new(&[
                ("NAME", Align::Left),
                ("PEERIP", Align::Left),
                ("NODE", Align::Left),
                ("ASN", Align::Right),
                ("MAXPREFIX", Align::Right),
                ("FILTERS", Align::Left),
            ]);
            for p in resources::bgp_peers(ds)? {
                t.row(vec![
                    p.name,
                    p.peer_ip.to_string(),
                    p.node.unwrap_or_else(|| "(global)".into()),
                    p.as_number.to_string(),
                    p.max_prefix.map_or_else(|| "-".into(), |m| m.to_string()),
                    if p.filters.is_empty() {
                        "-".into()
                    } else {
                        p.filters.join(",")
                    },
                ]);
            }
            print!("{}", t.plain());
        }
        BgpCommand::Peer(PeerCommand::Delete { name }) => {
            if !resources::delete_bgp_peer(ds, &name)? {
                anyhow::bail!("BGP peer {name} does not exist");
            }
            println!("Successfully deleted BGP peer {name}");
        }
        BgpCommand::Config(ConfigCommand::Set {
            as_number,
            node_to_node_mesh,
        }) => {
            let mut c = resources::bgp_config(ds)?;
            if let Some(a) = as_number {
                c.as_number = a;
            }
            if let Some(m) = node_to_node_mesh {
                c.node_to_node_mesh = matches!(m, OnOff::On);
            }
            resources::set_bgp_config(ds, &c).context("store BGP configuration")?;
            show(&c);
        }
        BgpCommand::Config(ConfigCommand::Show) => show(&resources::bgp_config(ds)?),
        BgpCommand::Filter(cmd) => filter::run(ds, cmd)?,
    }
    Ok(())
}

fn show(c: &BgpConfiguration) {
    println!(
        "asNumber: {}\nnodeToNodeMeshEnabled: {}",
        c.as_number, c.node_to_node_mesh
    );
}
