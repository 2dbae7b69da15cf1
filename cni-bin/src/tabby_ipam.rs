//! The `tabby-ipam` plugin's logic, shared by the `tabby-ipam` binary and
//! by `tabby`, which calls it in-process when `ipam.type` is `tabby-ipam`
//! (same code, one exec less per pod).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use tabby_ipam::report::{self, IpInfo, Snapshot};
use tabby_ipam::types::default_block_size;
use tabby_ipam::{
    AllocationAttribute, AssignArgs, Datastore, DatastoreConfig, FileDatastore, IpPool, Ipam,
    KubeDatastore, NodeLock, Released, Unsynced,
};

use crate::error::{CniError, Code, Result};
use crate::naming::GATEWAY_V4;
use crate::pod::PodIpam;
use crate::types::{validate_node_name, CniResult, IpConfig, NetConf};

/// Default directory of the file datastore.
pub const DEFAULT_DATASTORE: &str = tabby_ipam::DEFAULT_PATH;

/// The `ipam` section for `tabby-ipam`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    /// Where IPAM state lives: `{"type":"file","path":...}` or
    /// `{"type":"kubernetes","kubeconfig":...}`.
    #[serde(default)]
    pub datastore: DatastoreConfig,
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
    ipam: Ipam<Arc<dyn Datastore>>,
    /// The Kubernetes datastore again, for pod annotations.
    kube: Option<Arc<KubeDatastore>>,
    conf: IpamConf,
    /// The conflist's pool, validated.
    pool: Option<IpPool>,
    node: String,
}

/// An attachment GC releases: its handle and what its allocations record
/// (hostVeth, netns, ifname, ...), to remove its interfaces first.
#[derive(Debug, Clone)]
pub struct StaleAttachment {
    /// The IPAM handle.
    pub handle: String,
    /// The attributes of each of its allocations.
    pub attributes: Vec<BTreeMap<String, String>>,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// What the allocations GC keeps on this node record: interfaces that are
/// not to be removed even if a stale allocation names them too (a newer
/// sandbox of the same pod reuses its host veth name).
#[derive(Debug, Clone, Default)]
pub struct Kept {
    /// Host veth names.
    pub host_veths: HashSet<String>,
    /// (netns path, interface name) pairs.
    pub pod_interfaces: HashSet<(String, String)>,
}

impl Kept {
    fn record(&mut self, attrs: &BTreeMap<String, String>) {
        if let Some(veth) = attrs.get("hostVeth") {
            self.host_veths.insert(veth.clone());
        }
        if let (Some(netns), Some(ifname)) = (attrs.get("netns"), attrs.get("ifname")) {
            self.pod_interfaces.insert((netns.clone(), ifname.clone()));
        }
    }
}

/// A datastore type this build does not know is CNI error 2 (an unsupported
/// field, named with its value), not a generic invalid config.
fn check_datastore_type(section: &serde_json::Value) -> Result<()> {
    match section.pointer("/datastore/type").and_then(|t| t.as_str()) {
        Some(t) if !["file", "kubernetes"].contains(&t) => Err(CniError::new(
            Code::UnsupportedField,
            format!("unsupported ipam.datastore.type {t:?} (file or kubernetes)"),
        )),
        _ => Ok(()),
    }
}

impl TabbyIpam {
    /// Validates the `ipam` section and opens the datastore (nothing is written yet).
    pub fn open(net: &NetConf) -> Result<Self> {
        let section = net.ipam.clone().ok_or_else(|| {
            CniError::new(Code::InvalidConfig, "network config has no ipam section")
        })?;
        check_datastore_type(&section)?;
        let conf: IpamConf = serde_json::from_value(section).map_err(|e| {
            CniError::with_source(
                Code::InvalidConfig,
                "invalid ipam section for tabby-ipam",
                &e,
            )
        })?;
        if !conf.assign_ipv4 && !conf.assign_ipv6 {
            return Err(CniError::new(
                Code::InvalidConfig,
                "ipam assigns neither IPv4 nor IPv6",
            ));
        }
        let node = net.node_name();
        validate_node_name(&node)?;
        let pool = conf.pool.as_ref().map(default_pool).transpose()?;
        let (ds, kube) = open_datastore(&conf.datastore)?;
        Ok(Self {
            ipam: Ipam::new(ds),
            kube,
            conf,
            pool,
            node,
        })
    }

    /// The IPAM engine.
    pub fn ipam(&self) -> &Ipam<Arc<dyn Datastore>> {
        &self.ipam
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn ensure_pool(&self) -> Result<()> {
        if let Some(pool) = &self.pool {
            self.ipam.ensure_default_pool(pool)?;
        }
        Ok(())
    }

    /// Assigns addresses to `handle`: each with its block's prefix and the
    /// 169.254.1.1 gateway (so plain `ptp` builds the same data path).
    /// With the Kubernetes datastore, the pod named by `attrs` (namespace,
    /// pod) may choose pools or fixed addresses ([`crate::pod`]).
    ///
    /// Returns before the assignment is durable, with the node lock
    /// released: [`TabbyIpam::sync`] it before any result names the
    /// addresses (and release them if it fails). The disk's share of the
    /// work is then paid outside the lock, where the fsyncs of concurrent
    /// ADDs share journal commits instead of queueing one after another,
    /// and beside the caller's netlink work. No other assign can take the
    /// addresses meanwhile (the writes are visible at once); what a crash
    /// before the sync leaves is in [`tabby_ipam::allocator`]'s docs.
    pub fn add(
        &self,
        handle: &str,
        attrs: BTreeMap<String, String>,
    ) -> Result<(CniResult, Unsynced)> {
        tracing::debug_span!("ensure pool").in_scope(|| self.ensure_pool())?;
        let pod = self.pod_ipam(&attrs)?;
        let mut args = AssignArgs {
            handle: handle.to_string(),
            node: self.node.clone(),
            attrs,
            num_v4: u32::from(self.conf.assign_ipv4),
            num_v6: u32::from(self.conf.assign_ipv6),
            pools: self.conf.ipv4_pools.clone(),
        };
        if !pod.pools.is_empty() {
            args.pools = pod.resolve(&self.ipam.pools()?)?;
        }
        // The handle's write before the lock: under it, only the block's.
        let ahead = match pod.addrs.is_empty() {
            true => tracing::debug_span!("handle ahead")
                .in_scope(|| self.ipam.write_handle_ahead(&args))?,
            false => None,
        };
        let _serial = tracing::debug_span!("node lock").in_scope(|| self.node_lock())?;
        let (nets, unsynced) =
            tracing::debug_span!("allocate").in_scope(|| match pod.addrs.is_empty() {
                true => Ok::<_, CniError>(self.ipam.assign_unsynced(&args, ahead)?),
                // Fixed addresses (rare) are written durably at once.
                false => Ok((self.assign_fixed(&args, &pod.addrs)?, Unsynced::default())),
            })?;
        let ips = nets
            .into_iter()
            .map(|address| IpConfig {
                address,
                gateway: address.is_ipv4().then_some(IpAddr::V4(GATEWAY_V4)),
                interface: None,
            })
            .collect();
        let result = CniResult {
            ips,
            ..Default::default()
        };
        Ok((result, unsynced))
    }

    /// Makes an [`TabbyIpam::add`] durable.
    pub fn sync(&self, unsynced: Unsynced) -> Result<()> {
        self.ipam.sync(unsynced).map_err(|e| {
            CniError::with_source(
                Code::IoFailure,
                format!(
                    "make the allocation durable in {}",
                    self.ipam.datastore().describe()
                ),
                &e,
            )
        })
    }

    /// What the pod's annotations ask for (nothing without a Kubernetes
    /// datastore or a pod identity). A pod that is not there is an error:
    /// the kubelet creates the object before it asks for a network.
    fn pod_ipam(&self, attrs: &BTreeMap<String, String>) -> Result<PodIpam> {
        let (Some(kube), Some(namespace), Some(name)) =
            (&self.kube, attrs.get("namespace"), attrs.get("pod"))
        else {
            return Ok(PodIpam::default());
        };
        let annotations = kube.pod_annotations(namespace, name).map_err(|e| {
            CniError::with_source(
                Code::TryAgainLater,
                format!("read pod {namespace}/{name} from {}", kube.describe()),
                &e,
            )
        })?;
        let annotations = annotations.ok_or_else(|| {
            CniError::new(
                Code::TryAgainLater,
                format!(
                    "pod {namespace}/{name} does not exist in {}",
                    kube.describe()
                ),
            )
        })?;
        PodIpam::from_annotations(&annotations)
    }

    /// Assigns the pod's fixed addresses; on failure releases them again.
    fn assign_fixed(&self, args: &AssignArgs, addrs: &[IpAddr]) -> Result<Vec<IpNetwork>> {
        let mut nets = Vec::new();
        for ip in addrs {
            match self.ipam.assign_ip(args, *ip) {
                Ok(net) => nets.push(net),
                Err(e) => {
                    if !nets.is_empty() {
                        if let Err(undo) = self.ipam.release_by_handle(&args.handle) {
                            tracing::warn!(handle = %args.handle, error = %crate::error::chain(&undo), "could not undo a partial fixed assign");
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(nets)
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
    fn node_lock(&self) -> Result<NodeLock> {
        self.ipam.datastore().node_lock(&self.node).map_err(|e| {
            CniError::with_source(
                Code::IoFailure,
                format!("take the IPAM lock of node {}", self.node),
                &e,
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

    /// GC: releases this node's allocations on this network whose attachment
    /// is not in `cni.dev/valid-attachments`, each only after `teardown`
    /// removed its interfaces (an address is never free while an interface
    /// may still hold it: a failed teardown keeps the allocation for the next
    /// GC). Then puts right what killed plugins of this node left: handles
    /// the blocks do not back, claims never completed. Other nodes' and
    /// other networks' allocations in a shared datastore are never touched.
    ///
    /// Holds the node's IPAM lock throughout, so no ADD of this node
    /// allocates (and then creates its interfaces) in between.
    pub fn gc(
        &self,
        conf: &NetConf,
        mut teardown: impl FnMut(&StaleAttachment, &Kept) -> Result<()>,
    ) -> Result<Vec<Released>> {
        let _serial = self.node_lock()?;
        let (stale, kept) = self.stale_attachments(conf)?;
        let mut torn_down = BTreeSet::new();
        let mut failure = None;
        for attachment in stale.values() {
            match teardown(attachment, &kept) {
                Ok(()) => {
                    torn_down.insert(attachment.handle.clone());
                }
                Err(e) => {
                    tracing::warn!(handle = %attachment.handle, error = %e, "GC keeps an attachment whose interfaces could not be removed");
                    failure.get_or_insert(e);
                }
            }
        }
        let released = self.ipam.release_handles(&torn_down)?;
        let node = Some(self.node.as_str());
        for repair in self.ipam.repair_handles(|_, n| n == node)? {
            tracing::info!(handle = %repair.handle, recorded = ?repair.recorded, actual = ?repair.actual, "GC repaired a handle");
        }
        self.ipam.drop_dead_claims(&self.node)?;
        match failure {
            Some(e) => Err(e),
            None => Ok(released),
        }
    }

    /// This node's allocations on this network that no valid attachment
    /// owns, by handle; and what the other allocations of this node record.
    fn stale_attachments(
        &self,
        conf: &NetConf,
    ) -> Result<(BTreeMap<String, StaleAttachment>, Kept)> {
        let valid = ValidAttachments::new(conf);
        let (node, network) = (self.node.as_str(), conf.name.as_str());
        let prefix = format!("{network}.");
        let mut stale: BTreeMap<String, StaleAttachment> = BTreeMap::new();
        let mut kept = Kept::default();
        for allocation in self.ipam.allocations()? {
            let attr = &allocation.attribute;
            if attr.secondary.get("node").map(String::as_str) != Some(node) {
                continue;
            }
            let on_network = match attr.secondary.get("network") {
                Some(n) => n == network,
                None => attr.handle_id.starts_with(&prefix),
            };
            if !on_network || valid.holds(attr) {
                kept.record(&attr.secondary);
                continue;
            }
            let entry = stale
                .entry(attr.handle_id.clone())
                .or_insert_with(|| StaleAttachment {
                    handle: attr.handle_id.clone(),
                    attributes: Vec::new(),
                    ips: Vec::new(),
                });
            entry.attributes.push(attr.secondary.clone());
            entry.ips.push(allocation.ip);
        }
        Ok((stale, kept))
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

/// Opens the configured backend; the Kubernetes one is also returned
/// typed, for pod annotations.
type Opened = (Arc<dyn Datastore>, Option<Arc<KubeDatastore>>);

fn open_datastore(config: &DatastoreConfig) -> Result<Opened> {
    let failed = |what: String, e: &tabby_ipam::DatastoreError| {
        CniError::with_source(Code::IoFailure, format!("open datastore {what}"), e)
    };
    match config {
        DatastoreConfig::File { path } => {
            let ds =
                FileDatastore::open(path).map_err(|e| failed(path.display().to_string(), &e))?;
            Ok((Arc::new(ds), None))
        }
        DatastoreConfig::Kubernetes(options) => {
            let ds = KubeDatastore::open(options).map_err(|e| {
                let at = options.kubeconfig.as_ref().map_or_else(
                    || "kubernetes (inferred config)".to_string(),
                    |p| format!("kubernetes ({})", p.display()),
                );
                failed(at, &e)
            })?;
            let ds = Arc::new(ds);
            Ok((ds.clone(), Some(ds)))
        }
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
    let handle = conf.handle(&inv.container_id, &inv.ifname);
    match inv.command {
        Command::Add => {
            let (result, unsynced) = ipam.add(&handle, allocation_attributes(inv, conf))?;
            if let Err(e) = ipam.sync(unsynced) {
                if let Err(undo) = ipam.del(&handle) {
                    tracing::warn!(%handle, error = %undo, "could not release an allocation that did not reach the disk");
                }
                return Err(e);
            }
            Ok(result.to_json(version))
        }
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
            // Under another interface plugin, that plugin removes interfaces.
            ipam.gc(conf, |_, _| Ok(())).map(|_| String::new())
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

/// The `cni.dev/valid-attachments` of a GC.
struct ValidAttachments {
    handles: HashSet<String>,
    /// (containerID, ifname): also matches allocations of older releases,
    /// whose handle did not name the interface.
    pairs: HashSet<(String, String)>,
    /// Containers listed without an interface: all their interfaces stay.
    containers: HashSet<String>,
}

impl ValidAttachments {
    fn new(conf: &NetConf) -> Self {
        let mut valid = Self {
            handles: HashSet::new(),
            pairs: HashSet::new(),
            containers: HashSet::new(),
        };
        for a in conf.valid_attachments.iter().flatten() {
            if a.container_id.is_empty() {
                continue;
            }
            valid
                .handles
                .insert(conf.handle(&a.container_id, &a.ifname));
            valid
                .pairs
                .insert((a.container_id.clone(), a.ifname.clone()));
            if a.ifname.is_empty() {
                valid.containers.insert(a.container_id.clone());
            }
        }
        valid
    }

    /// Whether a valid attachment owns this allocation.
    fn holds(&self, attr: &AllocationAttribute) -> bool {
        let get = |k: &str| attr.secondary.get(k).cloned().unwrap_or_default();
        let (id, ifname) = (get("containerID"), get("ifname"));
        self.handles.contains(&attr.handle_id)
            || self.containers.contains(&id)
            || self.pairs.contains(&(id, ifname))
    }
}

/// The conflist's `ipam.pool` as the pool it creates, validated like any
/// pool so that a conflist naming an unusable range fails before anything
/// is written (and also when pools exist already).
fn default_pool(p: &PoolConf) -> Result<IpPool> {
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
    Ok(tabby_ipam::pools::validate_pool(&pool)?)
}
