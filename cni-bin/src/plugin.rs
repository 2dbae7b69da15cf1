//! The `tabby` plugin: ADD, DEL, CHECK, GC and STATUS over the pod data
//! path of DESIGN.md (veth, proxy-ARP gateway, /32 host routes).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ipnetwork::IpNetwork;
use tabby_dataplane::{sysctl, Family, NetNs, Netlink, Route, Scope};
use tracing::{debug_span, info, warn};

use crate::env::{Command, Invocation};
use crate::error::{CniError, Code, Result};
use crate::ipam_backend::IpamBackend;
use crate::naming::{format_mac, host_veth_name, GATEWAY_V4, GATEWAY_V6, HOST_VETH_MAC};
use crate::rollback::{why, Rollback};
use crate::types::{
    mtu_from_file, CniResult, Interface, IpConfig, NetConf, RouteEntry, DEFAULT_MTU_FILE,
};
use crate::version::CniVersion;

/// The MTU when neither the config nor the uplink says.
const FALLBACK_MTU: u32 = 1500;

/// Runs one command; returns what goes on stdout.
pub fn run(inv: &Invocation, conf: &NetConf, version: CniVersion, stdin: &[u8]) -> Result<String> {
    match inv.command {
        Command::Add => add(inv, conf, version, stdin),
        Command::Del => crate::teardown::del(inv, conf, stdin).map(|()| String::new()),
        Command::Check => {
            require(version.supports_check(), version, "CHECK")?;
            check(inv, conf, stdin).map(|()| String::new())
        }
        Command::Gc => {
            require(version.supports_gc(), version, "GC")?;
            crate::teardown::gc(inv, conf, stdin).map(|()| String::new())
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
    if is_own_netns(&pod_ns)? {
        return Err(CniError::new(
            Code::InvalidEnv,
            format!(
                "CNI_NETNS {} is the plugin's own network namespace, the node's: a pod needs a namespace of its own",
                netns.display()
            ),
        ));
    }
    let ipam = debug_span!("ipam open").in_scope(|| IpamBackend::from_conf(conf, stdin))?;
    let pod = debug_span!("pod socket").in_scope(|| Netlink::in_netns(&pod_ns))?;
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
    let mtu_file = (conf.mtu_file.as_deref()).unwrap_or(Path::new(DEFAULT_MTU_FILE));
    let mtu = (conf.mtu)
        .or_else(|| mtu_from_file(mtu_file))
        .or_else(|| uplink_mtu(host))
        .unwrap_or(FALLBACK_MTU);
    Ok(AddPlan {
        pod_ns,
        pod,
        host_veth: host_veth_name(&inv.pod_identity(), &inv.ifname),
        mtu,
        ipam,
    })
}

/// Whether `ns` is the network namespace this process runs in (the node's),
/// by the namespace file's device and inode, as `/proc/self/ns/net` has them.
pub(crate) fn is_own_netns(ns: &NetNs) -> Result<bool> {
    let io = |what: &str, errno: nix::Error| {
        CniError::with_source(
            Code::IoFailure,
            what.to_string(),
            &std::io::Error::from(errno),
        )
    };
    let own =
        nix::sys::stat::stat("/proc/self/ns/net").map_err(|e| io("stat /proc/self/ns/net", e))?;
    let other = nix::sys::stat::fstat(ns).map_err(|e| {
        io(
            &format!("stat network namespace {}", ns.path().display()),
            e,
        )
    })?;
    Ok(own.st_dev == other.st_dev && own.st_ino == other.st_ino)
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

/// ADD. Each step logs its duration at `debug` when it ends (a span), as
/// DEL's do: `"log_level": "tabby_cni=debug"` in the config shows them.
fn add(inv: &Invocation, conf: &NetConf, version: CniVersion, stdin: &[u8]) -> Result<String> {
    let host = debug_span!("host socket").in_scope(Netlink::host)?;
    let plan = debug_span!("plan").in_scope(|| plan_add(inv, conf, stdin, &host))?;
    // A host veth of the same pod identity is left from an earlier sandbox
    // of this pod (the kubelet restarted it): it is dead, replace it.
    if debug_span!("stale host veth").in_scope(|| host.delete_link(&plan.host_veth))? {
        warn!(veth = %plan.host_veth, "removed a stale host veth of the same pod");
    }

    let mut rollback = Rollback::new();
    let attrs = attributes(inv, conf, &plan);
    let ipam_output = debug_span!("ipam assign").in_scope(|| plan.ipam.add(inv, conf, attrs))?;
    rollback.push("release IPAM allocation", || {
        plan.ipam.del(inv, conf).map(drop).map_err(why)
    });
    let (ipam_result, unsynced) = ipam_output.parse()?;
    let addrs: Vec<IpNetwork> = ipam_result
        .ips
        .iter()
        .map(|c| host_prefix(c.address.ip()))
        .collect();
    if addrs.is_empty() {
        return Err(CniError::new(Code::IoFailure, "IPAM returned no address"));
    }

    // The allocation reaches the disk on a thread of its own while the
    // interfaces are made. The result goes out only once both are done, so
    // no runtime is ever told an address that a crash could still free; if
    // either fails, the rollback undoes both (after the sync has ended).
    let step = tracing::Span::current();
    let (pod_link, routed) = std::thread::scope(|s| {
        let ipam = &plan.ipam;
        let synced = s.spawn(move || {
            debug_span!(parent: &step, "ipam sync").in_scope(|| ipam.sync(unsynced))
        });
        let wired = wire(&host, &plan, inv, conf, &addrs, &mut rollback);
        let synced = synced.join().unwrap_or_else(|_| {
            Err(CniError::new(
                Code::IoFailure,
                "the thread making the allocation durable panicked",
            ))
        });
        let wired = wired?;
        synced?;
        Ok::<_, CniError>(wired)
    })?;
    rollback.disarm();

    info!(pod = %inv.pod_identity(), veth = %plan.host_veth, ips = ?addrs, "pod attached");
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
        routes: routed
            .iter()
            .map(|a| RouteEntry {
                dst: default_net(a),
                gw: Some(gateway_for(a)),
            })
            .collect(),
        dns: ipam_result.dns,
    };
    Ok(result.to_json(version))
}

/// The interfaces of ADD: the veth pair, its host side, the pod side and
/// the host route, each registered in `rollback` once made. Returns the pod
/// link and the addresses that got the pod's routes.
fn wire<'r>(
    host: &'r Netlink,
    plan: &'r AddPlan<'_>,
    inv: &Invocation,
    conf: &NetConf,
    addrs: &[IpNetwork],
    rollback: &mut Rollback<'r>,
) -> Result<(tabby_dataplane::Link, Vec<IpNetwork>)> {
    let host_index = debug_span!("create veth").in_scope(|| {
        host.create_veth(
            &plan.host_veth,
            HOST_VETH_MAC,
            &inv.ifname,
            &plan.pod_ns,
            Some(plan.mtu),
        )
    })?;
    let veth = plan.host_veth.as_str();
    rollback.push("delete veth", || {
        host.delete_link(veth).map(drop).map_err(why)
    });
    debug_span!("host veth").in_scope(|| configure_host_veth(host, veth, host_index, addrs))?;

    let (pod_link, routed) = debug_span!("pod side")
        .in_scope(|| configure_pod(&plan.pod, &plan.pod_ns, inv, conf, addrs))?;
    debug_span!("host route").in_scope(|| {
        addrs.iter().try_for_each(|a| {
            host.replace_route(&Route::new(*a).dev(host_index).with_scope(Scope::Link))
        })
    })?;
    Ok((pod_link, routed))
}

fn attributes(inv: &Invocation, conf: &NetConf, plan: &AddPlan<'_>) -> BTreeMap<String, String> {
    let mut a = crate::tabby_ipam::allocation_attributes(inv, conf);
    a.insert("hostVeth".into(), plan.host_veth.clone());
    a
}

/// Host side: proxy ARP answers the pod's ARP for 169.254.1.1 with ee:ee:..;
/// no address; forwarding from the pod.
fn configure_host_veth(host: &Netlink, name: &str, index: u32, addrs: &[IpNetwork]) -> Result<()> {
    let _sysctls = debug_span!("host sysctls").entered();
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
    drop(_sysctls);
    host.set_up(index)?;
    Ok(())
}

/// Pod side: /32 addresses, the gateway route and the default route.
/// Returns the link and the addresses whose family got the routes: a
/// further interface of a pod that has them already (Multus) gets only its
/// address, and the pod keeps leaving through its first interface.
fn configure_pod(
    pod: &Netlink,
    pod_ns: &NetNs,
    inv: &Invocation,
    conf: &NetConf,
    addrs: &[IpNetwork],
) -> Result<(tabby_dataplane::Link, Vec<IpNetwork>)> {
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
    let mut routed = Vec::new();
    for a in first_of_each_family(addrs) {
        let gw = gateway_for(a);
        let gateway = Route::new(host_prefix(gw))
            .dev(link.index)
            .with_scope(Scope::Link);
        match pod.add_route(&gateway) {
            Ok(()) => {}
            Err(e) if e.is_exists() && gateway_via_another_veth(pod, gw, link.index)? => continue,
            Err(e) => return Err(e.into()),
        }
        pod.add_route(&Route::new(default_net(a)).via(gw).dev(link.index))?;
        routed.push(*a);
    }
    if !conf.container_settings.allow_ip_forwarding {
        debug_span!("pod ip_forward")
            .in_scope(|| pod_ns.run(|| sysctl::set("net/ipv4/ip_forward", "0")))??;
    }
    Ok((link, routed))
}

/// Whether the pod reaches `gw` through a veth other than `index`: an
/// interface an earlier ADD of this pod made (anything else is an error).
fn gateway_via_another_veth(pod: &Netlink, gw: IpAddr, index: u32) -> Result<bool> {
    let family = if gw.is_ipv4() { Family::V4 } else { Family::V6 };
    let oif = pod
        .routes(family)?
        .into_iter()
        .find(|r| r.dst == host_prefix(gw))
        .and_then(|r| r.oif)
        .filter(|&oif| oif != index);
    Ok(match oif {
        Some(oif) => pod
            .link_by_index(oif)?
            .is_some_and(|l| l.kind.as_deref() == Some("veth")),
        None => false,
    })
}

/// The first address of each family: one gateway and default route per family.
fn first_of_each_family(addrs: &[IpNetwork]) -> impl Iterator<Item = &IpNetwork> {
    let v4 = addrs.iter().find(|a| a.is_ipv4());
    let v6 = addrs.iter().find(|a| a.is_ipv6());
    v4.into_iter().chain(v6)
}

pub(crate) fn host_prefix(ip: IpAddr) -> IpNetwork {
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

/// Whether the host has a /32 (/128) route to one of `ips` through link `index`.
pub(crate) fn host_routes_via(host: &Netlink, index: u32, ips: &[IpAddr]) -> Result<bool> {
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
    // A further interface of a pod got no routes (its result says so).
    let routed = conf.prev_result()?.is_some_and(|r| !r.routes.is_empty());
    for ip in &ips {
        let want = host_prefix(*ip);
        if !have.contains(&want) {
            return fail(format!("{} has no address {want}", inv.ifname));
        }
        if !routed {
            continue;
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
    let veth = host_veth_name(&inv.pod_identity(), &inv.ifname);
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
