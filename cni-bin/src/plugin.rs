//! The `tabby` plugin: ADD, DEL, CHECK, GC and STATUS over the pod data
//! path of DESIGN.md (veth, proxy-ARP gateway, /32 host routes).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tabby_dataplane::{sysctl, Family, NetNs, Netlink, Route, Scope};
use tracing::{info, warn};

use crate::env::{Command, Invocation};
use crate::error::{CniError, Code, Result};
use crate::ipam_backend::IpamBackend;
use crate::naming::{format_mac, host_veth_name, GATEWAY_V4, GATEWAY_V6, HOST_VETH_MAC};
use crate::rollback::{why, Rollback};
use crate::types::{CniResult, Interface, IpConfig, NetConf, RouteEntry};
use crate::version::CniVersion;

/// The MTU when neither the config nor the uplink says.
const FALLBACK_MTU: u32 = 1500;

/// Runs one command; returns what goes on stdout.
pub fn run(inv: &Invocation, conf: &NetConf, version: CniVersion, stdin: &[u8]) -> Result<String> {
    match inv.command {
        Command::Add => add(inv, conf, version, stdin),
        Command::Del => del(inv, conf, stdin).map(|()| String::new()),
        Command::Check => {
            require(version.supports_check(), version, "CHECK")?;
            check(inv, conf, stdin).map(|()| String::new())
        }
        Command::Gc => {
            require(version.supports_gc(), version, "GC")?;
            gc(inv, conf, stdin).map(|()| String::new())
        }
        Command::Status => {
            require(version.supports_gc(), version, "STATUS")?;
            IpamBackend::from_conf(conf, stdin)?
                .status(inv)
                .map(|()| String::new())
        }
        Command::Version => Ok(crate::version::version_info()),
    }
}

fn require(ok: bool, version: CniVersion, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{what} needs cniVersion 0.4.0 or later (1.1.0 for GC/STATUS), config has {}",
                version.as_str()
            ),
        ))
    }
}

/// What ADD learned before changing anything.
struct AddPlan<'a> {
    pod_ns: NetNs,
    pod: Netlink,
    host_veth: String,
    mtu: u32,
    ipam: IpamBackend<'a>,
}

fn plan_add<'a>(
    inv: &Invocation,
    conf: &NetConf,
    stdin: &'a [u8],
    host: &Netlink,
) -> Result<AddPlan<'a>> {
    let netns = inv
        .netns
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_NETNS is required for ADD"))?;
    let pod_ns = NetNs::open(netns)?;
    let ipam = IpamBackend::from_conf(conf, stdin)?;
    let pod = Netlink::in_netns(&pod_ns)?;
    if pod.link(&inv.ifname)?.is_some() {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "interface {} already exists in {}: was ADD called twice without DEL?",
                inv.ifname,
                netns.display()
            ),
        ));
    }
    let mtu = match conf.mtu {
        Some(m) => m,
        None => uplink_mtu(host).unwrap_or(FALLBACK_MTU),
    };
    Ok(AddPlan {
        pod_ns,
        pod,
        host_veth: host_veth_name(&inv.pod_identity()),
        mtu,
        ipam,
    })
}

/// The MTU of the interface holding the IPv4 default route.
fn uplink_mtu(host: &Netlink) -> Option<u32> {
    let routes = host.routes(Family::V4).ok()?;
    let oif = routes.iter().find(|r| r.dst.prefix() == 0)?.oif?;
    host.links()
        .ok()?
        .into_iter()
        .find(|l| l.index == oif)
        .map(|l| l.mtu)
}

fn add(inv: &Invocation, conf: &NetConf, version: CniVersion, stdin: &[u8]) -> Result<String> {
    let host = Netlink::host()?;
    let plan = plan_add(inv, conf, stdin, &host)?;
    // A host veth of the same pod identity is left from an earlier sandbox
    // of this pod (the kubelet restarted it): it is dead, replace it.
    if host.delete_link(&plan.host_veth)? {
        warn!(veth = %plan.host_veth, "removed a stale host veth of the same pod");
    }

    let mut rollback = Rollback::new();
    let attrs = attributes(inv, conf, &plan);
    let ipam_output = plan.ipam.add(inv, conf, attrs)?;
    rollback.push("release IPAM allocation", || {
        plan.ipam.del(inv, conf).map(drop).map_err(why)
    });
    let ipam_result = ipam_output.parse()?;
    let addrs: Vec<IpNetwork> = ipam_result
        .ips
        .iter()
        .map(|c| host_prefix(c.address.ip()))
        .collect();
    if addrs.is_empty() {
        return Err(CniError::new(Code::IoFailure, "IPAM returned no address"));
    }

    let host_index = host.create_veth(
        &plan.host_veth,
        HOST_VETH_MAC,
        &inv.ifname,
        &plan.pod_ns,
        Some(plan.mtu),
    )?;
    let veth = plan.host_veth.as_str();
    rollback.push("delete veth", || {
        host.delete_link(veth).map(drop).map_err(why)
    });
    configure_host_veth(&host, veth, host_index, &addrs)?;

    let pod_link = configure_pod(&plan.pod, &plan.pod_ns, inv, conf, &addrs)?;
    for a in &addrs {
        host.replace_route(&Route::new(*a).dev(host_index).with_scope(Scope::Link))?;
    }
    rollback.disarm();

    info!(pod = %inv.pod_identity(), veth, ips = ?addrs, "pod attached");
    let result = CniResult {
        interfaces: vec![
            Interface {
                name: plan.host_veth.clone(),
                mac: Some(format_mac(&HOST_VETH_MAC)),
                mtu: Some(plan.mtu),
                sandbox: None,
            },
            Interface {
                name: inv.ifname.clone(),
                mac: pod_link.mac.as_ref().map(format_mac),
                mtu: Some(plan.mtu),
                sandbox: Some(plan.pod_ns.path().display().to_string()),
            },
        ],
        ips: addrs
            .iter()
            .map(|a| IpConfig {
                address: *a,
                gateway: Some(gateway_for(a)),
                interface: Some(1),
            })
            .collect(),
        routes: first_of_each_family(&addrs)
            .map(|a| RouteEntry {
                dst: default_net(a),
                gw: Some(gateway_for(a)),
            })
            .collect(),
        dns: ipam_result.dns,
    };
    Ok(result.to_json(version))
}

fn attributes(inv: &Invocation, conf: &NetConf, plan: &AddPlan<'_>) -> BTreeMap<String, String> {
    let mut a = crate::tabby_ipam::allocation_attributes(inv, conf);
    a.insert("hostVeth".into(), plan.host_veth.clone());
    a
}

/// Host side: proxy ARP answers the pod's ARP for 169.254.1.1 with ee:ee:..;
/// no address; forwarding from the pod.
fn configure_host_veth(host: &Netlink, name: &str, index: u32, addrs: &[IpNetwork]) -> Result<()> {
    sysctl::set(&format!("net/ipv4/conf/{name}/proxy_arp"), "1")?;
    sysctl::set(&format!("net/ipv4/neigh/{name}/proxy_delay"), "0")?;
    sysctl::set(&format!("net/ipv4/conf/{name}/forwarding"), "1")?;
    if addrs.iter().any(IpNetwork::is_ipv6) {
        sysctl::set(&format!("net/ipv6/conf/{name}/accept_ra"), "0")?;
        sysctl::set(&format!("net/ipv6/conf/{name}/forwarding"), "1")?;
    } else if let Err(e) = sysctl::set(&format!("net/ipv6/conf/{name}/accept_ra"), "0") {
        // IPv6 may be disabled on the host; not needed for an IPv4-only pod.
        tracing::debug!(error = %tabby_errors::chain(&e), "accept_ra not set");
    }
    host.set_up(index)?;
    Ok(())
}

/// Pod side: /32 addresses, the gateway route and the default route.
fn configure_pod(
    pod: &Netlink,
    pod_ns: &NetNs,
    inv: &Invocation,
    conf: &NetConf,
    addrs: &[IpNetwork],
) -> Result<tabby_dataplane::Link> {
    let link = pod.link(&inv.ifname)?.ok_or_else(|| {
        CniError::new(
            Code::IoFailure,
            format!(
                "{} vanished from {} right after it was created",
                inv.ifname,
                pod_ns.path().display()
            ),
        )
    })?;
    if addrs.iter().any(IpNetwork::is_ipv6) {
        let name = inv.ifname.clone();
        pod_ns.run(|| sysctl::set(&format!("net/ipv6/conf/{name}/accept_dad"), "0"))??;
    }
    pod.set_up(link.index)?;
    for a in addrs {
        pod.add_address(link.index, *a)?;
    }
    for a in first_of_each_family(addrs) {
        let gw = gateway_for(a);
        pod.add_route(
            &Route::new(host_prefix(gw))
                .dev(link.index)
                .with_scope(Scope::Link),
        )?;
        pod.add_route(&Route::new(default_net(a)).via(gw).dev(link.index))?;
    }
    if !conf.container_settings.allow_ip_forwarding {
        pod_ns.run(|| sysctl::set("net/ipv4/ip_forward", "0"))??;
    }
    Ok(link)
}

/// The first address of each family: one gateway and default route per family.
fn first_of_each_family(addrs: &[IpNetwork]) -> impl Iterator<Item = &IpNetwork> {
    let v4 = addrs.iter().find(|a| a.is_ipv4());
    let v6 = addrs.iter().find(|a| a.is_ipv6());
    v4.into_iter().chain(v6)
}

fn host_prefix(ip: IpAddr) -> IpNetwork {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(ip, len).expect("a full-length prefix is always valid")
}

fn default_net(a: &IpNetwork) -> IpNetwork {
    let any: IpAddr = if a.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    IpNetwork::new(any, 0).expect("a zero-length prefix is always valid")
}

fn gateway_for(a: &IpNetwork) -> IpAddr {
    if a.is_ipv4() {
        IpAddr::V4(GATEWAY_V4)
    } else {
        IpAddr::V6(GATEWAY_V6)
    }
}

/// DEL: success when things are already gone. The interfaces go first and
/// the addresses are released only once no interface can still hold them:
/// if removing an interface fails, DEL fails and the runtime retries.
fn del(inv: &Invocation, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    let ipam = IpamBackend::from_conf(conf, stdin)?;
    let host = Netlink::host()?;
    if let Some(path) = &inv.netns {
        match NetNs::open(path)
            .and_then(|ns| Netlink::in_netns(&ns))
            .and_then(|pod| pod.delete_link(&inv.ifname))
        {
            Ok(_) => {}
            // A netns that is gone, or a path the runtime already unmounted.
            Err(e) if e.is_not_found() || matches!(e, tabby_dataplane::Error::NotANetns { .. }) => {
            }
            Err(e) => return Err(e.into()),
        }
    }
    // With the netns gone first (some runtimes delete it before DEL), the
    // host end may survive. Delete it only if it still routes one of this
    // container's addresses, so a newer sandbox of the same pod is left alone.
    let mut ips = conf.prev_ips();
    ips.extend(ipam.addresses(inv, conf)?);
    let veth = host_veth_name(&inv.pod_identity());
    delete_veth_if_routing(&host, &veth, ips.iter())?;
    let released = ipam.del(inv, conf)?;
    info!(container = %inv.container_id, released = ?released, "pod detached");
    Ok(())
}

fn delete_veth_if_routing<'i>(
    host: &Netlink,
    veth: &str,
    ips: impl Iterator<Item = &'i IpAddr>,
) -> Result<()> {
    let Some(link) = host.link(veth)? else {
        return Ok(());
    };
    let ips: Vec<IpAddr> = ips.copied().collect();
    let owns = host_routes_via(host, link.index, &ips)?;
    if owns {
        host.delete_link(veth)?;
    }
    Ok(())
}

fn host_routes_via(host: &Netlink, index: u32, ips: &[IpAddr]) -> Result<bool> {
    for fam in [Family::V4, Family::V6] {
        if host
            .routes(fam)?
            .iter()
            .any(|r| r.oif == Some(index) && ips.iter().any(|ip| r.dst == host_prefix(*ip)))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// CHECK: the pod interface, its addresses and routes, the host veth and route, the allocation.
fn check(inv: &Invocation, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    let ips = conf.required_prev_ips()?;
    let ipam = IpamBackend::from_conf(conf, stdin)?;
    let netns = inv
        .netns
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_NETNS is required for CHECK"))?;
    let pod_ns = NetNs::open(netns)?;
    let pod = Netlink::in_netns(&pod_ns)?;
    let fail = |what: String| Err(CniError::new(Code::IoFailure, what));
    let Some(link) = pod.link(&inv.ifname)? else {
        return fail(format!(
            "{} is missing from {}",
            inv.ifname,
            netns.display()
        ));
    };
    if !link.up {
        return fail(format!("{} in {} is down", inv.ifname, netns.display()));
    }
    let have = pod.addresses(link.index)?;
    let mut pod_routes = pod.routes(Family::V4)?;
    pod_routes.extend(pod.routes(Family::V6)?);
    for ip in &ips {
        let want = host_prefix(*ip);
        if !have.contains(&want) {
            return fail(format!("{} has no address {want}", inv.ifname));
        }
        let gw = gateway_for(&want);
        if !pod_routes
            .iter()
            .any(|r| r.dst == host_prefix(gw) && r.oif == Some(link.index))
        {
            return fail(format!(
                "pod route `{gw} dev {} scope link` is missing",
                inv.ifname
            ));
        }
        if !pod_routes
            .iter()
            .any(|r| r.dst == default_net(&want) && r.gateway == Some(gw))
        {
            return fail(format!("pod default route via {gw} is missing"));
        }
    }
    let host = Netlink::host()?;
    let veth = host_veth_name(&inv.pod_identity());
    let Some(hl) = host.link(&veth)? else {
        return fail(format!("host veth {veth} is missing"));
    };
    for ip in &ips {
        if !host_routes_via(&host, hl.index, std::slice::from_ref(ip))? {
            return fail(format!(
                "host route `{} dev {veth} scope link` is missing",
                host_prefix(*ip)
            ));
        }
    }
    ipam.check(inv, conf, &ips)
}

/// GC: release allocations of containers not in `cni.dev/valid-attachments`,
/// and remove host veths still routing a released address.
fn gc(inv: &Invocation, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    if conf.valid_attachments.is_none() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "GC needs cni.dev/valid-attachments (an empty list releases everything of this node)",
        ));
    }
    let ipam = IpamBackend::from_conf(conf, stdin)?;
    let released = ipam.gc(inv, conf)?;
    if released.is_empty() {
        return Ok(());
    }
    let host = Netlink::host()?;
    for link in host
        .links()?
        .into_iter()
        .filter(|l| l.name.starts_with(crate::naming::HOST_VETH_PREFIX))
    {
        if host_routes_via(&host, link.index, &released)? {
            host.delete_link(&link.name)?;
        }
    }
    info!(released = ?released, "gc released stale allocations");
    Ok(())
}
