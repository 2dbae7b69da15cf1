//! DEL and GC of the `tabby` plugin: interfaces go first, addresses are
//! released only once no interface can still hold them, and nothing of the
//! node itself is ever removed.

use std::net::IpAddr;
use std::path::Path;

use tabby_dataplane::{Deletion, LinkWatch, NetNs, Netlink};
use tracing::{debug_span, info, warn};

use crate::env::Invocation;
use crate::error::{CniError, Code, Result};
use crate::ipam_backend::IpamBackend;
use crate::naming::{host_veth_name, HOST_VETH_PREFIX};
use crate::plugin::{host_routes_via, is_own_netns};
use crate::tabby_ipam::{Kept, StaleAttachment};
use crate::types::NetConf;

/// DEL: success when things are already gone. If removing an interface
/// fails, DEL fails and the runtime retries.
///
/// The pod interface's delete runs on a thread of its own: once the kernel
/// has unlisted the veth pair (its addresses and routes are gone; the kernel
/// then still waits ~20 ms for RCU before it frees it), the addresses are
/// released while it finishes, and DEL returns when both are done.
pub fn del(inv: &Invocation, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    let ipam = IpamBackend::from_conf(conf, stdin)?;
    let host = Netlink::host()?;
    let removal = match &inv.netns {
        Some(path) => debug_span!("delete pod interface")
            .in_scope(|| start_pod_interface_removal(path, &inv.ifname))?,
        None => None,
    };
    // With the netns gone first (some runtimes delete it before DEL), the
    // host end may survive. Delete it only if it still routes one of this
    // attachment's addresses, so a newer sandbox of the same pod is left alone.
    let mut ips = conf.prev_ips();
    ips.extend(debug_span!("ipam addresses").in_scope(|| ipam.addresses(inv, conf))?);
    let veth = host_veth_name(&inv.pod_identity(), &inv.ifname);
    debug_span!("host veth").in_scope(|| delete_veth_if_routing(&host, &veth, &ips))?;
    let released = debug_span!("ipam release").in_scope(|| ipam.del(inv, conf))?;
    if let Some(removal) = removal {
        debug_span!("pod interface deleted").in_scope(|| removal.wait())?;
    }
    info!(container = %inv.container_id, ifname = %inv.ifname, released = ?released, "pod detached");
    Ok(())
}

/// A socket in the pod namespace at `path` (with the namespace); `None`
/// when the namespace is gone (or a path the runtime already unmounted),
/// and for the plugin's own namespace: the node's interfaces (its uplink)
/// are never a pod's.
fn pod_netlink(path: &Path) -> Result<Option<(NetNs, Netlink)>> {
    let ns = match NetNs::open(path) {
        Ok(ns) => ns,
        Err(e) if e.is_not_found() || matches!(e, tabby_dataplane::Error::NotANetns { .. }) => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    if is_own_netns(&ns)? {
        warn!(netns = %path.display(), "the node's own namespace is no pod's: its interfaces stay");
        return Ok(None);
    }
    let netlink = Netlink::in_netns(&ns)?;
    Ok(Some((ns, netlink)))
}

/// DEL's pod side: the runtime names the attachment's interface. Returns
/// once the kernel has unlisted it, with the delete still finishing; `None`
/// when there is nothing to delete. A delete that failed before unlisting
/// is the error here, so nothing is released.
fn start_pod_interface_removal(path: &Path, ifname: &str) -> Result<Option<Deletion>> {
    let Some((ns, pod)) = pod_netlink(path)? else {
        return Ok(None);
    };
    let Some(link) = pod.link(ifname)? else {
        return Ok(None);
    };
    let watch = LinkWatch::open_in(&ns)?;
    let deletion = pod.delete_link_detached(link.index, &watch)?;
    if deletion.unlisted {
        return Ok(Some(deletion));
    }
    deletion.wait()?;
    Ok(None)
}

/// GC's pod side, from what an allocation recorded: only a veth (a
/// namespace path may have been reused since; anything else is not ours).
fn remove_recorded_pod_veth(path: &Path, ifname: &str) -> Result<()> {
    let Some((_, pod)) = pod_netlink(path)? else {
        return Ok(());
    };
    match pod.link(ifname)? {
        Some(link) if link.kind.as_deref() == Some("veth") => {
            pod.delete_link(ifname)?;
        }
        Some(link) => {
            warn!(netns = %path.display(), ifname, kind = ?link.kind, "not a veth: not Tabby's, left alone");
        }
        None => {}
    }
    Ok(())
}

fn delete_veth_if_routing(host: &Netlink, veth: &str, ips: &[IpAddr]) -> Result<()> {
    let Some(link) = host.link(veth)? else {
        return Ok(());
    };
    if host_routes_via(host, link.index, ips)? {
        host.delete_link(veth)?;
    }
    Ok(())
}

/// GC: releases the allocations of attachments not in
/// `cni.dev/valid-attachments`, each after removing its interfaces as its
/// allocation recorded them (ADD records them before creating them, so an
/// ADD killed at any point leaves nothing GC cannot find).
pub fn gc(inv: &Invocation, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    if conf.valid_attachments.is_none() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "GC needs cni.dev/valid-attachments (an empty list releases everything of this node)",
        ));
    }
    let ipam = IpamBackend::from_conf(conf, stdin)?;
    let host = Netlink::host()?;
    let released = ipam.gc(inv, conf, |stale, kept| {
        remove_interfaces(&host, stale, kept)
    })?;
    if !released.is_empty() {
        info!(released = ?released, "gc released stale allocations");
    }
    Ok(())
}

/// Removes the host veth and the pod interface of a stale attachment,
/// unless an allocation GC keeps records the same one.
fn remove_interfaces(host: &Netlink, stale: &StaleAttachment, kept: &Kept) -> Result<()> {
    for attrs in &stale.attributes {
        match attrs.get("hostVeth") {
            Some(veth) if veth.starts_with(HOST_VETH_PREFIX) && !kept.host_veths.contains(veth) => {
                if host.delete_link(veth)? {
                    info!(handle = %stale.handle, veth, "gc removed a host veth");
                }
            }
            Some(_) => {}
            // Recorded by a release that did not name its veth: find it by its routes.
            None => remove_veths_routing(host, &stale.ips)?,
        }
        if let (Some(netns), Some(ifname)) = (attrs.get("netns"), attrs.get("ifname")) {
            if !kept
                .pod_interfaces
                .contains(&(netns.clone(), ifname.clone()))
            {
                remove_recorded_pod_veth(Path::new(netns), ifname)?;
            }
        }
    }
    Ok(())
}

fn remove_veths_routing(host: &Netlink, ips: &[IpAddr]) -> Result<()> {
    for link in host
        .links()?
        .into_iter()
        .filter(|l| l.name.starts_with(HOST_VETH_PREFIX))
    {
        if host_routes_via(host, link.index, ips)? {
            host.delete_link(&link.name)?;
        }
    }
    Ok(())
}
