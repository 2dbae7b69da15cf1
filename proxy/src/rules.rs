//! Rule generation: from service ports to iptables rules, as plain data.
//!
//! The layout is kube-proxy's iptables mode under a `TABBY-` prefix. Every
//! rule is written in the canonical order `iptables-save` prints (addresses,
//! protocol, then matches, then the target), so the generated text reads the
//! same as `iptables -t nat -S` on a programmed node.
//!
//! ```text
//! nat PREROUTING/OUTPUT -> TABBY-SERVICES -> TABBY-SVC-x  (cluster IP; first rule marks off-cluster sources)
//!                                          -> TABBY-EXT-x  (external IPs, LB IPs; via TABBY-FW-x with source ranges)
//!                                          -> TABBY-NODEPORTS -> TABBY-EXT-x   (last rule, dst-type LOCAL)
//! TABBY-EXT-x -> TABBY-MARK-MASQ, then TABBY-SVC-x (Cluster) or TABBY-SVL-x (Local)
//! TABBY-SVC-x / TABBY-SVL-x -> TABBY-SEP-y (recent check for affinity, then statistic 1/(n-i), last plain)
//! TABBY-SEP-y -> TABBY-MARK-MASQ for hairpin, DNAT to the endpoint (recent --set for affinity)
//! nat POSTROUTING -> TABBY-POSTROUTING: MASQUERADE marked packets, clearing the mark
//! filter: TABBY-SERVICES / TABBY-EXTERNAL-SERVICES reject services without endpoints,
//!         TABBY-NODEPORTS accepts health check node ports, TABBY-FORWARD accepts marked traffic,
//!         TABBY-PROXY-FIREWALL drops load balancer traffic outside the source ranges.
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::chains::{
    dispatch_chain, dst, endpoint_chain, ext_chain, fw_chain, internal_masq_rule, l4, Plan,
    PortChains,
};
use super::model::{self, Endpoint, NodeFacts, Protocol, ServiceKey, ServicePortInfo};
use super::names::{self, MARK_MASQ};

/// Options of the proxy that shape the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOptions {
    /// The mark bit that asks TABBY-POSTROUTING to masquerade (kube-proxy: 0x4000).
    pub masquerade_mark: u32,
    /// Masquerade every packet sent to a cluster IP, not just off-cluster ones.
    pub masquerade_all: bool,
    /// Add `--random-fully` to MASQUERADE.
    pub random_fully: bool,
    /// Let node ports answer on 127.0.0.0/8 (needs `route_localnet=1`); off by default.
    pub localhost_nodeports: bool,
    /// Addresses node ports answer on; empty means every local address.
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// Above this many endpoints in total, per-endpoint comments are dropped
    /// to shrink the payload (kube-proxy's "large cluster mode").
    pub large_cluster_endpoints: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            masquerade_mark: 0x4000,
            masquerade_all: false,
            random_fully: true,
            localhost_nodeports: false,
            nodeport_addresses: Vec::new(),
            large_cluster_endpoints: 1000,
        }
    }
}

/// One chain and its rules (each a full `-A CHAIN ...` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Chain name.
    pub name: String,
    /// Rules in order, each starting with `-A <name>`.
    pub rules: Vec<String>,
}

/// Everything generated for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortRules {
    /// The service port the rules implement.
    pub info: ServicePortInfo,
    /// Rules appended to nat TABBY-SERVICES.
    pub nat_services: Vec<String>,
    /// Rules appended to nat TABBY-NODEPORTS.
    pub nat_nodeports: Vec<String>,
    /// Rules appended to filter TABBY-SERVICES.
    pub filter_services: Vec<String>,
    /// Rules appended to filter TABBY-EXTERNAL-SERVICES.
    pub filter_external: Vec<String>,
    /// Rules appended to filter TABBY-NODEPORTS.
    pub filter_nodeports: Vec<String>,
    /// Rules appended to filter TABBY-PROXY-FIREWALL.
    pub filter_firewall: Vec<String>,
    /// The per-service nat chains (SVC, SVL, EXT, FW, SEP) this port owns.
    pub chains: Vec<Chain>,
    /// Endpoints the rules DNAT to (`ip:port`), for conntrack cleanup.
    pub reachable: Vec<Endpoint>,
}

/// Identity of a service port: service, port name, protocol.
pub type PortKey = (ServiceKey, String, Protocol);

/// The full desired state: every service port's rules plus the fixed chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// Rules per service port, ordered by key. Shared so that an unchanged
    /// port can be carried from one sync to the next without a copy.
    pub ports: BTreeMap<PortKey, Arc<ServicePortRules>>,
    /// Rules of nat TABBY-POSTROUTING.
    pub nat_postrouting: Vec<String>,
    /// Rules of nat TABBY-MARK-MASQ.
    pub nat_mark_masq: Vec<String>,
    /// The last rules of nat TABBY-SERVICES (the jump to TABBY-NODEPORTS).
    pub nat_services_tail: Vec<String>,
    /// Rules of filter TABBY-FORWARD.
    pub filter_forward: Vec<String>,
}

/// What rule generation needs besides the service port.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The node.
    pub node: &'a NodeFacts,
    /// The options.
    pub opts: &'a ProxyOptions,
    /// Drop per-endpoint comments (large cluster mode).
    pub large_cluster: bool,
}

/// Generate the whole rule set from Services and EndpointSlices.
pub fn generate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeFacts,
    opts: &ProxyOptions,
) -> RuleSet {
    let mut by_service: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(name) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(model::SERVICE_NAME_LABEL))
        {
            let key = ServiceKey {
                namespace: s
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                name: name.clone(),
            };
            by_service.entry(key).or_default().push(s);
        }
    }
    let infos: Vec<ServicePortInfo> = services
        .iter()
        .flat_map(|svc| {
            let key = ServiceKey::of(&svc.metadata);
            let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            model::service_ports(svc, slices, node)
        })
        .collect();
    let total: usize = infos.iter().map(|i| i.endpoints.len()).sum();
    let ctx = Ctx {
        node,
        opts,
        large_cluster: total > opts.large_cluster_endpoints,
    };
    let mut set = RuleSet::empty(opts);
    for info in infos {
        set.ports
            .insert(port_key(&info), Arc::new(service_port_rules(info, &ctx)));
    }
    set
}

/// The rules of every port of one Service (`slices` may hold other services' slices).
pub fn service_rules(
    svc: &Service,
    slices: &[&EndpointSlice],
    ctx: &Ctx<'_>,
) -> Vec<(PortKey, Arc<ServicePortRules>)> {
    model::service_ports(svc, slices, ctx.node)
        .into_iter()
        .map(|info| (port_key(&info), Arc::new(service_port_rules(info, ctx))))
        .collect()
}

/// The key of a service port.
pub fn port_key(info: &ServicePortInfo) -> PortKey {
    (info.service.clone(), info.port_name.clone(), info.protocol)
}

impl RuleSet {
    /// A rule set with the fixed chains and no service.
    pub fn empty(opts: &ProxyOptions) -> Self {
        Self {
            ports: BTreeMap::new(),
            nat_postrouting: postrouting_rules(opts),
            nat_mark_masq: vec![format!("-A {MARK_MASQ} -j MARK --set-xmark {}", mark(opts))],
            nat_services_tail: nodeports_jump_rules(opts),
            filter_forward: forward_rules(opts),
        }
    }

    /// Total number of endpoints over all service ports.
    pub fn endpoint_count(&self) -> usize {
        self.ports.values().map(|p| p.info.endpoints.len()).sum()
    }
}

/// `0x4000/0x4000`.
fn mark(opts: &ProxyOptions) -> String {
    format!("{:#x}/{:#x}", opts.masquerade_mark, opts.masquerade_mark)
}

fn postrouting_rules(opts: &ProxyOptions) -> Vec<String> {
    let p = names::POSTROUTING;
    let random = if opts.random_fully {
        " --random-fully"
    } else {
        ""
    };
    vec![
        format!("-A {p} -m mark ! --mark {} -j RETURN", mark(opts)),
        format!("-A {p} -j MARK --set-xmark {:#x}/0x0", opts.masquerade_mark),
        format!("-A {p} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{random}"),
    ]
}

fn nodeports_jump_rules(opts: &ProxyOptions) -> Vec<String> {
    const COMMENT: &str = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    let (s, n) = (names::SERVICES, names::NODEPORTS);
    if opts.nodeport_addresses.is_empty() {
        let not_lo = if opts.localhost_nodeports {
            ""
        } else {
            "! -d 127.0.0.0/8 "
        };
        return vec![format!(
            "-A {s} {not_lo}{COMMENT} -m addrtype --dst-type LOCAL -j {n}"
        )];
    }
    opts.nodeport_addresses
        .iter()
        .filter(|ip| opts.localhost_nodeports || !ip.is_loopback())
        .map(|ip| format!("-A {s} -d {ip}/32 {COMMENT} -j {n}"))
        .collect()
}

fn forward_rules(opts: &ProxyOptions) -> Vec<String> {
    let f = names::FORWARD;
    vec![
        format!("-A {f} -m conntrack --ctstate INVALID -j DROP"),
        format!("-A {f} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {} -j ACCEPT", mark(opts)),
        format!("-A {f} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
    ]
}

/// Generate the rules of one service port.
pub fn service_port_rules(info: ServicePortInfo, ctx: &Ctx<'_>) -> ServicePortRules {
    let ch = PortChains::of(&info);
    let plan = Plan::new(&info, &ch);
    let mut out = ServicePortRules {
        info: info.clone(),
        nat_services: Vec::new(),
        nat_nodeports: Vec::new(),
        filter_services: Vec::new(),
        filter_external: Vec::new(),
        filter_nodeports: Vec::new(),
        filter_firewall: Vec::new(),
        chains: Vec::new(),
        reachable: plan.cat.reachable.iter().map(|e| (*e).clone()).collect(),
    };
    capture_cluster_ip(&info, &plan, &mut out);
    capture_external(&info, &plan, &ch, &mut out);
    capture_node_port(&info, &plan, &ch, &mut out);
    if let Some(hc) = info.health_check_node_port {
        let c = format!("{} health check node port", info.name);
        out.filter_nodeports.push(format!(
            "-A {} {} -j ACCEPT",
            names::NODEPORTS,
            l4("", Protocol::Tcp, &c, hc)
        ));
    }
    if plan.uses_ext {
        out.chains.push(ext_chain(&info, &plan, &ch, ctx));
    }
    if plan.uses_fw {
        out.chains.push(fw_chain(&info, &ch, ctx));
    }
    if plan.uses_svc {
        let masq = (plan.internal_chain == ch.svc && plan.has_internal)
            .then(|| internal_masq_rule(&info, &ch.svc, ctx))
            .flatten();
        out.chains
            .push(dispatch_chain(&info, &ch.svc, masq, &plan.cat.cluster, ctx));
    }
    if plan.uses_svl {
        let masq = (plan.internal_chain == ch.svl && plan.has_internal)
            .then(|| internal_masq_rule(&info, &ch.svl, ctx))
            .flatten();
        out.chains
            .push(dispatch_chain(&info, &ch.svl, masq, &plan.cat.local, ctx));
    }
    for ep in &plan.cat.reachable {
        out.chains.push(endpoint_chain(&info, ep, ctx));
    }
    out
}

/// Cluster IP: jump to the internal chain, or (filter) REJECT / DROP.
fn capture_cluster_ip(info: &ServicePortInfo, plan: &Plan<'_>, out: &mut ServicePortRules) {
    let s = names::SERVICES;
    if plan.has_internal {
        let m = l4(
            &dst(info.cluster_ip),
            info.protocol,
            &format!("{} cluster IP", info.name),
            info.port,
        );
        out.nat_services
            .push(format!("-A {s} {m} -j {}", plan.internal_chain));
    } else {
        let (target, comment) = no_endpoint_verdict(info, plan.cat.has_any);
        let m = l4(&dst(info.cluster_ip), info.protocol, &comment, info.port);
        out.filter_services.push(format!("-A {s} {m} -j {target}"));
    }
}

/// REJECT when the service has no endpoint at all, DROP when only the local
/// policy lacks one (kube-proxy's choice).
fn no_endpoint_verdict(info: &ServicePortInfo, has_any: bool) -> (&'static str, String) {
    if has_any {
        ("DROP", format!("{} has no local endpoints", info.name))
    } else {
        (
            "REJECT --reject-with icmp-port-unreachable",
            format!("{} has no endpoints", info.name),
        )
    }
}

/// External IPs and load balancer IPs.
fn capture_external(
    info: &ServicePortInfo,
    plan: &Plan<'_>,
    ch: &PortChains,
    out: &mut ServicePortRules,
) {
    let (s, e) = (names::SERVICES, names::EXTERNAL_SERVICES);
    let (target, comment) = no_endpoint_verdict(info, plan.cat.has_any);
    let lb_chain = if plan.uses_fw { &ch.fw } else { &ch.ext };
    let kinds = [
        ("external IP", &info.external_ips, &ch.ext),
        ("loadbalancer IP", &info.load_balancer_ips, lb_chain),
    ];
    for (kind, ips, chain) in kinds {
        for ip in ips {
            if plan.cat.has_any {
                let m = l4(
                    &dst(*ip),
                    info.protocol,
                    &format!("{} {kind}", info.name),
                    info.port,
                );
                out.nat_services.push(format!("-A {s} {m} -j {chain}"));
            }
            if !plan.has_external {
                out.filter_external.push(format!(
                    "-A {e} {} -j {target}",
                    l4(&dst(*ip), info.protocol, &comment, info.port)
                ));
            }
        }
    }
    if plan.uses_fw {
        let c = format!("{} traffic not accepted by {}", info.name, ch.fw);
        for ip in &info.load_balancer_ips {
            out.filter_firewall.push(format!(
                "-A {} {} -j DROP",
                names::PROXY_FIREWALL,
                l4(&dst(*ip), info.protocol, &c, info.port)
            ));
        }
    }
}

/// Node port: nat TABBY-NODEPORTS jumps to the EXT chain; filter rejects.
fn capture_node_port(
    info: &ServicePortInfo,
    plan: &Plan<'_>,
    ch: &PortChains,
    out: &mut ServicePortRules,
) {
    let Some(np) = info.node_port else { return };
    let p = info.protocol.as_str();
    if plan.cat.has_any {
        out.nat_nodeports.push(format!(
            "-A {} {} -j {}",
            names::NODEPORTS,
            l4("", info.protocol, &info.name, np),
            ch.ext
        ));
    }
    if !plan.has_external {
        let (target, comment) = no_endpoint_verdict(info, plan.cat.has_any);
        out.filter_external.push(format!(
            "-A {} -p {p} -m comment --comment \"{comment}\" -m addrtype --dst-type LOCAL -m {p} --dport {np} -j {target}",
            names::EXTERNAL_SERVICES
        ));
    }
}
