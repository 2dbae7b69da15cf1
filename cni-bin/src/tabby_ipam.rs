//! The `tabby-ipam` plugin's logic, shared by the `tabby-ipam` binary and
//! by `tabby`, which calls it in-process when `ipam.type` is `tabby-ipam`
//! (same code, one exec less per pod).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;
use tabby_ipam::report::{self, IpInfo, Snapshot};
use tabby_ipam::types::default_block_size;
use tabby_ipam::{AssignArgs, Datastore, FileDatastore, IpPool, Ipam, Released};

use crate::error::{CniError, Code, Result};
use crate::naming::GATEWAY_V4;
use crate::types::{CniResult, IpConfig, NetConf};

/// Default directory of the file datastore.
pub const DEFAULT_DATASTORE: &str = "/var/lib/tabby/datastore";

/// The `ipam` section for `tabby-ipam`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    /// Where IPAM state lives.
    #[serde(default)]
    pub datastore: DatastoreConf,
    /// A pool to create when the datastore has none.
    #[serde(default)]
    pub pool: Option<PoolConf>,
    /// Assign an IPv4 address (default true).
    #[serde(default = "yes", alias = "assign_ipv4")]
    pub assign_ipv4: bool,
    /// Assign an IPv6 address (default false).
    #[serde(default, alias = "assign_ipv6")]
    pub assign_ipv6: bool,
    /// Only these pools (CIDRs); empty: every enabled pool.
    #[serde(default, alias = "ipv4_pools")]
    pub ipv4_pools: Vec<IpNetwork>,
}

fn yes() -> bool {
    true
}

/// `ipam.datastore`.
#[derive(Debug, Clone, Deserialize)]
pub struct DatastoreConf {
    /// Backend type; this release has `file`.
    #[serde(rename = "type", default = "file_type")]
    pub kind: String,
    /// The file backend's directory.
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

fn file_type() -> String {
    "file".into()
}

fn default_path() -> PathBuf {
    DEFAULT_DATASTORE.into()
}

impl Default for DatastoreConf {
    fn default() -> Self {
        Self {
            kind: file_type(),
            path: default_path(),
        }
    }
}

/// `ipam.pool`: the pool created on first use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolConf {
    /// The pool CIDR.
    pub cidr: IpNetwork,
    /// Block prefix length (26 / 122 by default).
    #[serde(default)]
    pub block_size: Option<u8>,
    /// Masquerade traffic leaving the pools.
    #[serde(default)]
    pub nat_outgoing: bool,
}

/// An open `tabby-ipam` for one invocation.
pub struct TabbyIpam {
    ipam: Ipam<FileDatastore>,
    conf: IpamConf,
    node: String,
}

impl TabbyIpam {
    /// Validates the `ipam` section and opens the datastore (nothing is written yet).
    pub fn open(net: &NetConf) -> Result<Self> {
        let section = net.ipam.clone().ok_or_else(|| {
            CniError::new(Code::InvalidConfig, "network config has no ipam section")
        })?;
        let conf: IpamConf = serde_json::from_value(section).map_err(|e| {
            CniError::with_source(
                Code::InvalidConfig,
                "invalid ipam section for tabby-ipam",
                &e,
            )
        })?;
        if conf.datastore.kind != "file" {
            return Err(CniError::new(
                Code::UnsupportedField,
                format!(
                    "ipam.datastore.type {:?} is not supported; use \"file\"",
                    conf.datastore.kind
                ),
            ));
        }
        if !conf.assign_ipv4 && !conf.assign_ipv6 {
            return Err(CniError::new(
                Code::InvalidConfig,
                "ipam assigns neither IPv4 nor IPv6",
            ));
        }
        let ds = FileDatastore::open(&conf.datastore.path).map_err(|e| {
            CniError::with_source(
                Code::IoFailure,
                format!("open datastore {}", conf.datastore.path.display()),
                &e,
            )
        })?;
        Ok(Self {
            ipam: Ipam::new(ds),
            conf,
            node: net.node_name(),
        })
    }

    /// The IPAM engine.
    pub fn ipam(&self) -> &Ipam<FileDatastore> {
        &self.ipam
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn ensure_pool(&self) -> Result<()> {
        if let Some(p) = &self.conf.pool {
            let family = if p.cidr.is_ipv4() { "ipv4" } else { "ipv6" };
            let pool = IpPool {
                name: format!("default-{family}-ippool"),
                cidr: p.cidr,
                block_size: p.block_size.unwrap_or_else(|| default_block_size(&p.cidr)),
                ipip_mode: Default::default(),
                vxlan_mode: Default::default(),
                nat_outgoing: p.nat_outgoing,
                disabled: false,
                node_selector: "all()".into(),
            };
            self.ipam.ensure_default_pool(&pool)?;
        }
        Ok(())
    }

    /// Assigns addresses to `handle`: each with its block's prefix and the
    /// 169.254.1.1 gateway (so plain `ptp` builds the same data path).
    pub fn add(&self, handle: &str, attrs: BTreeMap<String, String>) -> Result<CniResult> {
        self.ensure_pool()?;
        let args = AssignArgs {
            handle: handle.to_string(),
            node: self.node.clone(),
            attrs,
            num_v4: u32::from(self.conf.assign_ipv4),
            num_v6: u32::from(self.conf.assign_ipv6),
            pools: self.conf.ipv4_pools.clone(),
        };
        let _serial = self.node_lock()?;
        let nets = self.ipam.assign(&args)?;
        let ips = nets
            .into_iter()
            .map(|address| IpConfig {
                address,
                gateway: address.is_ipv4().then_some(IpAddr::V4(GATEWAY_V4)),
                interface: None,
            })
            .collect();
        Ok(CniResult {
            ips,
            ..Default::default()
        })
    }

    /// Releases `handle`; a missing handle is success.
    pub fn del(&self, handle: &str) -> Result<Vec<Released>> {
        let _serial = self.node_lock()?;
        Ok(self.ipam.release_by_handle(handle)?)
    }

    /// Serializes this node's IPAM operations, like Calico's host-wide IPAM
    /// lock: a burst of pods on one node then takes turns instead of racing
    /// on the same block document and retrying (conflicts with other nodes
    /// are still settled by compare-and-swap).
    fn node_lock(&self) -> Result<Flock<std::fs::File>> {
        let path = self
            .conf
            .datastore
            .path
            .join(format!(".ipam-{}.lock", self.node));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                CniError::with_source(
                    Code::IoFailure,
                    format!("open IPAM lock {}", path.display()),
                    &e,
                )
            })?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            CniError::with_source(
                Code::IoFailure,
                format!("lock {}", path.display()),
                &std::io::Error::from(errno),
            )
        })
    }

    /// Verifies that `handle` still holds each of `ips`.
    pub fn check(&self, handle: &str, ips: &[IpAddr]) -> Result<()> {
        let snap = Snapshot::load(self.ipam.datastore())?;
        for ip in ips {
            let holder = match report::ip_info(&snap, *ip) {
                IpInfo::InUse { attribute, .. } => attribute.handle_id,
                IpInfo::NotAssigned { .. } => "nobody".to_string(),
                IpInfo::NotInPool => "no pool".to_string(),
            };
            if holder != handle {
                return Err(CniError::new(
                    Code::IoFailure,
                    format!("IPAM: {ip} is not allocated to {handle} (held by {holder})"),
                ));
            }
        }
        Ok(())
    }

    /// The addresses `handle` holds.
    pub fn addresses(&self, handle: &str) -> Result<Vec<IpAddr>> {
        Ok(self.ipam.addresses_of(handle)?)
    }

    /// GC: releases this node's allocations on this network whose container
    /// is not in `cni.dev/valid-attachments`. Other nodes' and other
    /// networks' allocations in a shared datastore are never touched.
    pub fn gc(&self, conf: &NetConf) -> Result<Vec<Released>> {
        let valid: HashSet<String> = conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| conf.handle(&a.container_id))
            .collect();
        let (node, network) = (self.node.as_str(), conf.name.as_str());
        let prefix = format!("{network}.");
        Ok(self.ipam.gc_where(|attr| {
            let on_node = attr.secondary.get("node").map(String::as_str) == Some(node);
            let on_network = match attr.secondary.get("network") {
                Some(n) => n == network,
                None => attr.handle_id.starts_with(&prefix),
            };
            on_node && on_network && !valid.contains(&attr.handle_id)
        })?)
    }

    /// STATUS: the datastore answers and some enabled pool has a free address.
    pub fn status(&self) -> Result<()> {
        self.ipam.datastore().ping().map_err(|e| {
            CniError::with_source(
                Code::NotAvailable,
                format!("datastore {} unreachable", self.ipam.datastore().describe()),
                &e,
            )
        })?;
        let pools = self.ipam.pools()?;
        if pools.iter().all(|p| p.disabled) && self.conf.pool.is_none() {
            return Err(CniError::new(
                Code::NotAvailable,
                "no enabled IP pool: create one with `tabbyctl pool create`",
            ));
        }
        let snap = Snapshot::load(self.ipam.datastore())?;
        let free: u128 = report::usage(&snap)
            .iter()
            .filter(|p| !p.pool.disabled)
            .map(|p| p.usage.free())
            .sum();
        if !pools.is_empty() && free == 0 {
            return Err(CniError::new(
                Code::NotAvailable,
                "every enabled IP pool is exhausted",
            ));
        }
        Ok(())
    }
}

/// `tabby-ipam` as a standalone IPAM plugin (under `ptp`, `bridge`, ...).
pub fn run(
    inv: &crate::env::Invocation,
    conf: &NetConf,
    version: crate::version::CniVersion,
) -> Result<String> {
    use crate::env::Command;
    let ipam = TabbyIpam::open(conf)?;
    let handle = conf.handle(&inv.container_id);
    match inv.command {
        Command::Add => Ok(ipam
            .add(&handle, allocation_attributes(inv, conf))?
            .to_json(version)),
        Command::Del => ipam.del(&handle).map(|_| String::new()),
        Command::Check => ipam
            .check(&handle, &conf.required_prev_ips()?)
            .map(|()| String::new()),
        Command::Gc => {
            if conf.valid_attachments.is_none() {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "GC needs cni.dev/valid-attachments",
                ));
            }
            ipam.gc(conf).map(|_| String::new())
        }
        Command::Status => ipam.status().map(|()| String::new()),
        Command::Version => Ok(crate::version::version_info()),
    }
}

/// The attributes stored with every allocation: who holds the address, for
/// `tabbyctl ipam show --ip`, `ipam check` and GC.
pub fn allocation_attributes(
    inv: &crate::env::Invocation,
    conf: &NetConf,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    a.insert("node".into(), conf.node_name());
    a.insert("network".into(), conf.name.clone());
    a.insert("containerID".into(), inv.container_id.clone());
    a.insert("ifname".into(), inv.ifname.clone());
    if let Some(ns) = &inv.netns {
        a.insert("netns".into(), ns.display().to_string());
    }
    if let (Some(ns), Some(pod)) = (inv.arg("K8S_POD_NAMESPACE"), inv.arg("K8S_POD_NAME")) {
        a.insert("namespace".into(), ns.into());
        a.insert("pod".into(), pod.into());
    }
    a
}
