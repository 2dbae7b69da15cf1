//! One encapsulation pass: plan from the view, tunnel addresses through
//! IPAM, devices through netlink, the MTU file; hands the routes part to
//! the route thread ([`EncapRoutes`]) and a status for `node status`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use tabby_dataplane::{Netlink, Route};
use tabby_errors::chain;
use tabby_ipam::datastore::Datastore;

use super::device::{sync_ipip, sync_vxlan, VxlanWant};
use super::plan::{format_mac, plan, Encap, Hop, Resolver};
use super::tunnel::{self, Tunnels};
use super::{EncapError, IPIP_DEVICE, VXLAN_DEVICE};
use crate::desired::{ClusterView, RTPROT_TABBY};

/// What the kernel routes need of the encapsulation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncapRoutes {
    /// Routes of remote prefixes through a tunnel, from the datastore.
    pub routes: BTreeMap<IpNetwork, Hop>,
    /// Resolves what BGP learned.
    pub resolver: Resolver,
    /// The index of `vxlan.tabby`, when it is up.
    pub vxlan: Option<u32>,
    /// The index of `tunl0`, when it is up.
    pub ipip: Option<u32>,
}

impl EncapRoutes {
    /// The kernel route of `hop`; `None` when its device is missing.
    pub fn route_of(&self, prefix: IpNetwork, hop: Hop, uplink: u32) -> Option<Route> {
        let (via, dev, onlink) = match hop {
            Hop::Native(nh) => (nh, uplink, false),
            Hop::Ipip(nh) => (IpAddr::V4(nh), self.ipip?, true),
            Hop::Vxlan(t) => (IpAddr::V4(t), self.vxlan?, true),
        };
        let r = Route::new(prefix)
            .via(via)
            .dev(dev)
            .with_protocol(RTPROT_TABBY);
        Some(if onlink { r.with_onlink() } else { r })
    }

    /// The tunnel route the datastore asks for `prefix`, if its device is up.
    pub fn planned(&self, prefix: IpNetwork, uplink: u32) -> Option<Route> {
        self.route_of(prefix, *self.routes.get(&prefix)?, uplink)
    }

    /// The route of `prefix` learned with next hop `nh`: through a tunnel
    /// when its pool says so (and the device is up), else native.
    pub fn learned(&self, prefix: IpNetwork, nh: IpAddr, uplink: u32) -> Option<Route> {
        let hop = self.resolver.resolve(prefix, nh);
        self.route_of(prefix, hop, uplink)
            .or_else(|| self.route_of(prefix, Hop::Native(nh), uplink))
    }
}

/// One pool's encapsulation, for `node status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolEncap {
    /// The pool.
    pub name: String,
    /// Its CIDR.
    pub cidr: String,
    /// `ipip Always`, `vxlan CrossSubnet`, `none`.
    pub encapsulation: String,
    /// Whether traffic leaving the pools is masqueraded.
    pub nat_outgoing: bool,
}

/// One tunnel device, for `node status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelRow {
    /// `vxlan.tabby` or `tunl0`.
    pub device: String,
    /// Its address, once allocated.
    pub address: Option<String>,
    /// Its MAC (VXLAN).
    pub mac: Option<String>,
    /// Its MTU.
    pub mtu: u32,
    /// `up`, or what went wrong.
    pub state: String,
}

/// The encapsulation part of `node status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncapStatus {
    /// Per pool.
    pub pools: Vec<PoolEncap>,
    /// Per tunnel device wanted.
    pub tunnels: Vec<TunnelRow>,
    /// The MTU written for pods.
    pub pod_mtu: u32,
    /// What failed in the last pass (none when all is well).
    pub errors: Vec<String>,
}

/// The settings and memory of the encapsulation; one per agent. Each
/// pass opens its own netlink socket (a [`Netlink`] owns a runtime, which
/// must not be dropped on the agent's async workers).
pub struct Encapsulation {
    me: String,
    local: IpAddr,
    uplink: u32,
    mtu_file: PathBuf,
    written_mtu: Option<u32>,
    last_errors: Vec<String>,
}

impl Encapsulation {
    /// Settings for node `me` at `local` over `uplink`.
    pub fn new(me: &str, local: IpAddr, uplink: u32, mtu_file: PathBuf) -> Self {
        Encapsulation {
            me: me.to_string(),
            local,
            uplink,
            mtu_file,
            written_mtu: None,
            last_errors: Vec::new(),
        }
    }

    /// One pass over `view`: blocks (netlink and datastore writes).
    pub fn sync<D: Datastore>(
        &mut self,
        ds: &Arc<D>,
        view: &ClusterView,
    ) -> (EncapRoutes, EncapStatus) {
        let nl = match Netlink::host() {
            Ok(nl) => nl,
            Err(source) => {
                let e = EncapError::Device {
                    what: "open a netlink socket".into(),
                    source,
                };
                let t = self.published(view);
                let status = self.status(view, &t, &EncapRoutes::default(), 0, 0, vec![e]);
                return (EncapRoutes::default(), status);
            }
        };
        let plan = plan(view, &self.me);
        let mut errors = Vec::new();
        let tunnels = tunnel::ensure(ds, view, &self.me).unwrap_or_else(|e| {
            errors.push(e);
            self.published(view)
        });
        let uplink_mtu = match nl.link_by_index(self.uplink) {
            Ok(Some(l)) => l.mtu,
            _ => 1500,
        };
        let mut out = EncapRoutes {
            routes: plan.routes,
            resolver: plan.resolver,
            ..EncapRoutes::default()
        };
        let vxlan = (plan.devices.contains(&Encap::Vxlan))
            .then(|| self.vxlan_want(&tunnels, uplink_mtu, plan.vteps));
        let vxlan = match vxlan {
            Some(Err(e)) => Err(e),
            Some(Ok(w)) => sync_vxlan(&nl, Some(&w)),
            None => sync_vxlan(&nl, None),
        };
        out.vxlan = vxlan.unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let ipip = (plan.devices.contains(&Encap::Ipip)).then_some((tunnels.ipip, uplink_mtu - 20));
        out.ipip = sync_ipip(&nl, ipip).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let overhead = plan.devices.iter().map(|e| e.overhead()).max().unwrap_or(0);
        let pod_mtu = uplink_mtu.saturating_sub(overhead);
        if let Err(e) = self.write_mtu(pod_mtu) {
            errors.push(e);
        }
        let status = self.status(view, &tunnels, &out, pod_mtu, uplink_mtu, errors);
        (out, status)
    }

    /// The tunnel facts the view holds (when ensuring them failed).
    fn published(&self, view: &ClusterView) -> Tunnels {
        let node = view.snapshot.nodes.iter().find(|n| n.name == self.me);
        Tunnels {
            vxlan: node.and_then(|n| n.ipv4_vxlan_tunnel_addr),
            ipip: node.and_then(|n| n.ipv4_ipip_tunnel_addr),
            mac: (node.and_then(|n| super::plan::parse_mac(n.vxlan_tunnel_mac_addr.as_deref()?)))
                .unwrap_or_else(|| super::plan::mac_for_node(&self.me)),
        }
    }

    fn vxlan_want(
        &self,
        t: &Tunnels,
        uplink_mtu: u32,
        vteps: std::collections::BTreeSet<super::Vtep>,
    ) -> Result<VxlanWant, EncapError> {
        let IpAddr::V4(local) = self.local else {
            return Err(EncapError::Ipv6Underlay);
        };
        Ok(VxlanWant {
            spec: VxlanWant::spec(local, self.uplink),
            mac: t.mac,
            mtu: uplink_mtu - 50,
            addr: t.vxlan,
            vteps,
        })
    }

    /// Writes the pods' MTU atomically when it changed.
    fn write_mtu(&mut self, mtu: u32) -> Result<(), EncapError> {
        if self.written_mtu == Some(mtu) {
            return Ok(());
        }
        write_atomic(&self.mtu_file, format!("{mtu}\n").as_bytes()).map_err(|source| {
            EncapError::MtuFile {
                path: self.mtu_file.display().to_string(),
                source,
            }
        })?;
        tracing::info!(mtu, file = %self.mtu_file.display(), "pod MTU written");
        self.written_mtu = Some(mtu);
        Ok(())
    }

    fn status(
        &mut self,
        view: &ClusterView,
        t: &Tunnels,
        routes: &EncapRoutes,
        pod_mtu: u32,
        uplink_mtu: u32,
        errors: Vec<EncapError>,
    ) -> EncapStatus {
        let errors: Vec<String> = errors.iter().map(|e| chain(e).to_string()).collect();
        if errors != self.last_errors {
            for e in &errors {
                tracing::warn!(error = %e, "encapsulation");
            }
            self.last_errors = errors.clone();
        }
        let enabled = super::plan::enabled(&view.snapshot.pools);
        let mut tunnels = Vec::new();
        let row = |device: &str, addr: Option<Ipv4Addr>, mac, mtu, index: Option<u32>| TunnelRow {
            device: device.into(),
            address: addr.map(|a| a.to_string()),
            mac,
            mtu,
            state: if index.is_some() {
                "up".into()
            } else {
                "missing".into()
            },
        };
        if enabled.contains(&Encap::Vxlan) {
            tunnels.push(row(
                VXLAN_DEVICE,
                t.vxlan,
                Some(format_mac(t.mac)),
                uplink_mtu - 50,
                routes.vxlan,
            ));
        }
        if enabled.contains(&Encap::Ipip) {
            tunnels.push(row(IPIP_DEVICE, t.ipip, None, uplink_mtu - 20, routes.ipip));
        }
        EncapStatus {
            pools: view.snapshot.pools.iter().map(pool_encap).collect(),
            tunnels,
            pod_mtu,
            errors,
        }
    }
}

fn pool_encap(p: &tabby_ipam::IpPool) -> PoolEncap {
    use tabby_ipam::EncapMode::Never;
    let encapsulation = match (p.ipip_mode, p.vxlan_mode) {
        (Never, Never) => "none".to_string(),
        (m, Never) => format!("ipip {m:?}"),
        (_, m) => format!("vxlan {m:?}"),
    };
    PoolEncap {
        name: p.name.clone(),
        cidr: p.cidr.to_string(),
        encapsulation,
        nat_outgoing: p.nat_outgoing,
    }
}

/// Writes `path` through a temporary file and a rename, so a reader sees
/// the old content or the new, never a part.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
