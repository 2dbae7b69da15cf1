//! `tabbyctl ipam show|check|release`.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use tabby_ipam::report::{self, CheckReport, IpInfo, Liveness, PoolUsage, Snapshot, Usage};
use tabby_ipam::{AllocationAttribute, Datastore, Ipam};

use crate::table::{Align, Table};

#[derive(Debug, Subcommand)]
pub enum IpamCommand {
    /// Show pool usage (calicoctl's `ipam show`).
    Show {
        /// Also show every block, with the node it is affine to.
        #[arg(long)]
        show_blocks: bool,
        /// Show who holds one address instead.
        #[arg(long, conflicts_with = "show_blocks")]
        ip: Option<IpAddr>,
    },
    /// Report leaked addresses and inconsistent IPAM documents.
    Check {
        /// This node's name: only its allocations can be checked for liveness.
        #[arg(long, env = "NODENAME")]
        node: Option<String>,
        /// Repair what killed plugins of this node left: handles whose counts
        /// the blocks do not back (and handles of older releases, which name
        /// no node), and block claims never completed.
        #[arg(long)]
        fix: bool,
    },
    /// Release one address.
    Release {
        /// The address to release.
        #[arg(long)]
        ip: IpAddr,
    },
}

pub fn run(ipam: &Ipam<crate::Store>, cmd: IpamCommand) -> anyhow::Result<()> {
    let load = || Snapshot::load(ipam.datastore()).context("reading IPAM documents");
    match cmd {
        IpamCommand::Show { ip: Some(ip), .. } => {
            print!("{}", show_ip(ip, &report::ip_info(&load()?, ip)))
        }
        IpamCommand::Show {
            show_blocks,
            ip: None,
        } => {
            print!(
                "{}",
                usage_table(&report::usage(&load()?), show_blocks).boxed()
            );
        }
        IpamCommand::Check { node, fix } => {
            let node = match node {
                Some(node) => node,
                None => local_hostname().context("finding this node's name (pass --node)")?,
            };
            let snap = load()?;
            let report = report::check(&snap, |attr| liveness(attr, &node, Path::new("/")));
            print!("{}", check_text(&snap, &report, &node));
            if fix {
                print!("{}", fix_node(ipam, &node)?);
            }
        }
        IpamCommand::Release { ip } => {
            // Serialized with the plugin of the node holding the address.
            let _serial = match report::ip_info(&load()?, ip) {
                IpInfo::InUse { attribute, .. } => match attribute.secondary.get("node") {
                    Some(node) => Some(
                        ipam.datastore()
                            .node_lock(node)
                            .with_context(|| format!("taking the IPAM lock of node {node}"))?,
                    ),
                    None => None,
                },
                _ => None,
            };
            match ipam
                .release_ip(ip)
                .with_context(|| format!("releasing {ip}"))?
            {
                Some(released) => {
                    println!("Successfully released IP {ip} (handle {})", released.handle)
                }
                None => anyhow::bail!("IP {ip} is not assigned"),
            }
        }
    }
    Ok(())
}

/// `3 (1%)`.
fn with_percent(part: u128, usage: &Usage) -> String {
    format!("{part} ({}%)", usage.percent(part))
}

/// calicoctl's `ipam show [--show-blocks]` table, with an AFFINITY column for blocks.
fn usage_table(pools: &[PoolUsage], show_blocks: bool) -> Table {
    let mut columns = vec![("GROUPING", Align::Left), ("CIDR", Align::Left)];
    if show_blocks {
        columns.push(("AFFINITY", Align::Left));
    }
    columns.extend([
        ("IPS TOTAL", Align::Right),
        ("IPS IN USE", Align::Left),
        ("IPS FREE", Align::Left),
    ]);
    let mut table = Table::new(&columns);
    let mut add = |grouping: &str, cidr: String, affinity: Option<String>, usage: &Usage| {
        let mut row = vec![grouping.to_string(), cidr];
        if show_blocks {
            row.push(affinity.unwrap_or_default());
        }
        row.extend([
            usage.total.to_string(),
            with_percent(usage.in_use, usage),
            with_percent(usage.free(), usage),
        ]);
        table.row(row);
    };
    for pool in pools {
        add("IP Pool", pool.pool.cidr.to_string(), None, &pool.usage);
        if show_blocks {
            for block in &pool.blocks {
                let affinity = Some(
                    block
                        .node
                        .as_ref()
                        .map_or("(none)".to_string(), |n| format!("host:{n}")),
                );
                add("Block", block.cidr.to_string(), affinity, &block.usage);
            }
        }
    }
    table
}

fn attributes_text(attribute: &AllocationAttribute) -> String {
    let mut out = format!("Handle: {}\nAttributes:\n", attribute.handle_id);
    for (key, value) in &attribute.secondary {
        out.push_str(&format!("  {key}: {value}\n"));
    }
    out
}

/// `ipam show --ip=X`.
fn show_ip(ip: IpAddr, info: &IpInfo) -> String {
    match info {
        IpInfo::NotInPool => format!("IP {ip} is not assigned and is not in any IP pool\n"),
        IpInfo::NotAssigned { pool } => format!("IP {ip} is not assigned (pool {pool})\n"),
        IpInfo::InUse {
            pool,
            block,
            block_node,
            attribute,
        } => {
            let owner = block_node
                .as_deref()
                .map_or(String::new(), |n| format!(", affine to host:{n}"));
            format!(
                "IP {ip} is in use\nPool: {pool}\nBlock: {block}{owner}\n{}",
                attributes_text(attribute)
            )
        }
    }
}

/// Whether an allocation's attachment exists, judged from this node's
/// filesystem under `root`: its network namespace path and its host veth.
fn liveness(attr: &AllocationAttribute, local_node: &str, root: &Path) -> Liveness {
    let secondary = &attr.secondary;
    if secondary.get("node").map(String::as_str) != Some(local_node) {
        return Liveness::Unknown;
    }
    let Some(netns) = secondary.get("netns") else {
        return Liveness::Unknown;
    };
    let under_root = |p: &str| root.join(p.trim_start_matches('/'));
    if !under_root(netns).exists() {
        return Liveness::Dead;
    }
    match secondary.get("hostVeth") {
        Some(veth)
            if !veth.contains('/') && !under_root(&format!("sys/class/net/{veth}")).exists() =>
        {
            Liveness::Dead
        }
        _ => Liveness::Live,
    }
}

/// The `ipam check` report.
fn check_text(snap: &Snapshot, report: &CheckReport, node: &str) -> String {
    let mut out = String::from("Checking IPAM for inconsistencies...\n\n");
    out.push_str(&format!(
        "Found {} IP pools, {} IPAM blocks, {} affinities, {} handles, {} nodes.\n",
        snap.pools.len(),
        snap.blocks.len(),
        snap.affinities.len(),
        snap.handles.len(),
        snap.nodes.len()
    ));
    out.push_str(&format!(
        "Found {} allocated IPs: {} live on this node ({node}), {} not checkable from here.\n",
        report.allocations,
        report.live,
        report.unknown.len()
    ));
    if !report.unknown.is_empty() {
        out.push_str("  Allocations of other nodes (or without a netns attribute) are checked by running `tabbyctl ipam check` on their node.\n");
    }
    out.push('\n');
    for problem in &report.problems {
        out.push_str(&format!("  - {problem}\n"));
    }
    if !report.problems.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!(
        "Check complete; Found {} problems.\n",
        report.problems.len()
    ));
    out
}

/// `ipam check --fix`: under the node's IPAM lock (no ADD or DEL of that
/// node is half done meanwhile), makes its handles say what the blocks hold
/// and drops its claims whose block was never created.
fn fix_node(ipam: &Ipam<crate::Store>, node: &str) -> anyhow::Result<String> {
    let _serial = ipam
        .datastore()
        .node_lock(node)
        .with_context(|| format!("taking the IPAM lock of node {node}"))?;
    let repairs = ipam
        .repair_handles(|_, n| n.is_none_or(|n| n == node))
        .context("repairing handles")?;
    let claims = ipam
        .drop_dead_claims(node)
        .context("dropping dead block claims")?;
    let mut out = String::from("\nFixing what killed plugins of this node left...\n");
    for r in &repairs {
        let counts = |m: &std::collections::BTreeMap<String, u32>| {
            let parts: Vec<String> = m.iter().map(|(b, n)| format!("{n} in {b}")).collect();
            if parts.is_empty() {
                "nothing".to_string()
            } else {
                parts.join(", ")
            }
        };
        let verb = if r.actual.is_empty() {
            "deleted"
        } else {
            "rewrote"
        };
        out.push_str(&format!(
            "  - {verb} handle {}: it recorded {}, the blocks hold {}\n",
            r.handle,
            counts(&r.recorded),
            counts(&r.actual)
        ));
    }
    for cidr in &claims {
        out.push_str(&format!(
            "  - dropped node {node}'s unfinished claim of block {cidr}\n"
        ));
    }
    out.push_str(&format!(
        "Fixed {} handles and {} claims. Other nodes' handles are fixed on their node.\n",
        repairs.len(),
        claims.len()
    ));
    Ok(out)
}

/// This machine's host name, the default node name.
fn local_hostname() -> anyhow::Result<String> {
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(name) = std::fs::read_to_string(path) {
            let name = name.trim();
            if !name.is_empty() {
                return Ok(name.to_string());
            }
        }
    }
    anyhow::bail!("cannot read the host name")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn attr(pairs: &[(&str, &str)]) -> AllocationAttribute {
        AllocationAttribute {
            handle_id: "h".to_string(),
            secondary: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn liveness_follows_the_netns_and_host_veth() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("run/netns")).expect("dir");
        std::fs::write(root.path().join("run/netns/pod1"), b"").expect("netns");
        std::fs::create_dir_all(root.path().join("sys/class/net/tabby0123456789")).expect("veth");
        let live = attr(&[
            ("node", "a"),
            ("netns", "/run/netns/pod1"),
            ("hostVeth", "tabby0123456789"),
        ]);
        assert_eq!(liveness(&live, "a", root.path()), Liveness::Live);
        assert_eq!(liveness(&live, "b", root.path()), Liveness::Unknown);
        let no_veth = attr(&[
            ("node", "a"),
            ("netns", "/run/netns/pod1"),
            ("hostVeth", "tabbygone"),
        ]);
        assert_eq!(liveness(&no_veth, "a", root.path()), Liveness::Dead);
        let no_netns = attr(&[("node", "a"), ("netns", "/run/netns/gone")]);
        assert_eq!(liveness(&no_netns, "a", root.path()), Liveness::Dead);
        assert_eq!(
            liveness(&attr(&[("node", "a")]), "a", root.path()),
            Liveness::Unknown
        );
    }

    #[test]
    fn show_ip_names_the_handle_and_attributes() {
        let info = IpInfo::InUse {
            pool: "p".into(),
            block: "10.0.0.0/26".parse().expect("cidr"),
            block_node: Some("node-a".into()),
            attribute: attr(&[("pod", "web")]),
        };
        let text = show_ip("10.0.0.1".parse().expect("ip"), &info);
        assert!(text.starts_with("IP 10.0.0.1 is in use\n"));
        assert!(text.contains("Handle: h\n"));
        assert!(text.contains("  pod: web\n"));
        let free = show_ip(
            "10.0.0.2".parse().expect("ip"),
            &IpInfo::NotAssigned { pool: "p".into() },
        );
        assert!(free.starts_with("IP 10.0.0.2 is not assigned"));
    }
}
