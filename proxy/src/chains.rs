//! The per-service-port chains: TABBY-SVC/SVL (spread over endpoints),
//! TABBY-EXT (external destinations), TABBY-FW (load balancer source
//! ranges) and TABBY-SEP (one endpoint), plus the rule-text helpers the
//! dispatch rules share. Pure functions over a [`ServicePortInfo`].

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::model::{categorize, Categorized, Endpoint, Protocol, ServicePortInfo};
use super::names::{self, MARK_MASQ};
use super::rules::{Chain, Ctx};

/// The chains one service port may use, named after its hash.
pub(super) struct PortChains {
    pub(super) svc: String,
    pub(super) svl: String,
    pub(super) ext: String,
    pub(super) fw: String,
}

impl PortChains {
    pub(super) fn of(info: &ServicePortInfo) -> Self {
        let hash = names::port_proto_hash(&info.name, info.protocol.as_str());
        Self {
            svc: format!("{}{hash}", names::SVC_PREFIX),
            svl: format!("{}{hash}", names::SVL_PREFIX),
            ext: format!("{}{hash}", names::EXT_PREFIX),
            fw: format!("{}{hash}", names::FW_PREFIX),
        }
    }
}

/// Which chains a service port needs and where each kind of traffic goes.
pub(super) struct Plan<'a> {
    pub(super) cat: Categorized<'a>,
    pub(super) uses_svc: bool,
    pub(super) uses_svl: bool,
    pub(super) uses_ext: bool,
    pub(super) uses_fw: bool,
    pub(super) has_internal: bool,
    pub(super) has_external: bool,
    pub(super) internal_chain: &'a str,
    pub(super) external_policy_chain: &'a str,
}

impl<'a> Plan<'a> {
    pub(super) fn new(info: &'a ServicePortInfo, ch: &'a PortChains) -> Self {
        let cat = categorize(info);
        let has_any = cat.has_any;
        let uses_svc = !cat.cluster.is_empty() && info.uses_cluster_endpoints();
        let uses_svl = !cat.local.is_empty() && info.uses_local_endpoints();
        let (internal_chain, has_internal) = if info.internal_policy_local {
            (ch.svl.as_str(), has_any && !cat.local.is_empty())
        } else {
            (ch.svc.as_str(), has_any)
        };
        let (external_policy_chain, has_external) = if info.external_policy_local {
            (ch.svl.as_str(), has_any && !cat.local.is_empty())
        } else {
            (ch.svc.as_str(), has_any)
        };
        Plan {
            uses_ext: has_any && info.externally_accessible(),
            uses_fw: has_any
                && !info.load_balancer_ips.is_empty()
                && !info.load_balancer_source_ranges.is_empty(),
            cat,
            uses_svc,
            uses_svl,
            has_internal,
            has_external,
            internal_chain,
            external_policy_chain,
        }
    }
}

/// `-p tcp` ... `-m tcp --dport N` around a comment: the canonical layout
/// `[-s/-d] -p P -m comment --comment "C" -m P --dport N`.
pub(super) fn l4(addrs: &str, proto: Protocol, comment: &str, dport: u16) -> String {
    let p = proto.as_str();
    format!("{addrs}-p {p} -m comment --comment \"{comment}\" -m {p} --dport {dport}")
}

pub(super) fn dst(ip: Ipv4Addr) -> String {
    format!("-d {ip}/32 ")
}

/// The first rule of the internal chain: mark off-cluster sources for masquerade.
pub(super) fn internal_masq_rule(
    info: &ServicePortInfo,
    chain: &str,
    ctx: &Ctx<'_>,
) -> Option<String> {
    let src = match (ctx.opts.masquerade_all, ctx.node.cluster_cidr) {
        (true, _) => String::new(),
        (false, Some(cidr)) => format!("! -s {} ", cidr_text(cidr)),
        (false, None) => return None,
    };
    let m = l4(
        &format!("{src}{}", dst(info.cluster_ip)),
        info.protocol,
        &format!("{} cluster IP", info.name),
        info.port,
    );
    Some(format!("-A {chain} {m} -j {MARK_MASQ}"))
}

pub(super) fn cidr_text(c: Ipv4Network) -> String {
    format!("{}/{}", c.network(), c.prefix())
}

/// TABBY-EXT-x: masquerade (Cluster policy) or short-circuit pod and node
/// traffic to the cluster chain (Local policy), then the policy chain.
pub(super) fn ext_chain(
    info: &ServicePortInfo,
    plan: &Plan<'_>,
    ch: &PortChains,
    ctx: &Ctx<'_>,
) -> Chain {
    let (x, n) = (&ch.ext, &info.name);
    let mut rules = Vec::new();
    if !info.external_policy_local {
        rules.push(format!("-A {x} -m comment --comment \"masquerade traffic for {n} external destinations\" -j {MARK_MASQ}"));
    } else {
        if let Some(cidr) = ctx.node.cluster_cidr {
            rules.push(format!("-A {x} -s {} -m comment --comment \"pod traffic for {n} external destinations\" -j {}", cidr_text(cidr), ch.svc));
        }
        rules.push(format!("-A {x} -m comment --comment \"masquerade LOCAL traffic for {n} external destinations\" -m addrtype --src-type LOCAL -j {MARK_MASQ}"));
        rules.push(format!("-A {x} -m comment --comment \"route LOCAL traffic for {n} external destinations\" -m addrtype --src-type LOCAL -j {}", ch.svc));
    }
    if plan.has_external {
        rules.push(format!("-A {x} -j {}", plan.external_policy_chain));
    }
    Chain {
        name: x.clone(),
        rules,
    }
}

/// TABBY-FW-x: only the allowed source ranges reach the EXT chain.
pub(super) fn fw_chain(info: &ServicePortInfo, ch: &PortChains, ctx: &Ctx<'_>) -> Chain {
    let (f, n) = (&ch.fw, &info.name);
    let head = format!("-m comment --comment \"{n} loadbalancer IP\"");
    let mut rules: Vec<String> = info
        .load_balancer_source_ranges
        .iter()
        .map(|r| format!("-A {f} -s {} {head} -j {}", cidr_text(*r), ch.ext))
        .collect();
    let from_node = info
        .load_balancer_source_ranges
        .iter()
        .any(|r| ctx.node.node_ips.iter().any(|ip| r.contains(*ip)));
    if from_node {
        rules.extend(
            info.load_balancer_ips
                .iter()
                .map(|ip| format!("-A {f} -s {ip}/32 {head} -j {}", ch.ext)),
        );
    }
    rules.push(format!(
        "-A {f} -m comment --comment \"other traffic to {n} will be dropped by {}\"",
        names::PROXY_FIREWALL
    ));
    Chain {
        name: f.clone(),
        rules,
    }
}

/// `%0.10f` of 1/n, as kube-proxy prints probabilities.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// TABBY-SVC-x / TABBY-SVL-x: affinity checks, then the random spread.
pub(super) fn dispatch_chain(
    info: &ServicePortInfo,
    chain: &str,
    masq: Option<String>,
    eps: &[&Endpoint],
    ctx: &Ctx<'_>,
) -> Chain {
    let proto = info.protocol.as_str();
    let mut rules: Vec<String> = masq.into_iter().collect();
    let comment = |ep: &Endpoint| {
        if ctx.large_cluster {
            String::new()
        } else {
            format!(" -m comment --comment \"{} -> {}\"", info.name, ep.addr())
        }
    };
    if let Some(timeout) = info.affinity_timeout {
        for ep in eps {
            let sep = names::sep_chain(&info.name, proto, &ep.addr());
            rules.push(format!(
                "-A {chain}{} -m recent --rcheck --seconds {timeout} --reap --name {sep} --mask 255.255.255.255 --rsource -j {sep}",
                comment(ep)
            ));
        }
    }
    let n = eps.len();
    for (i, ep) in eps.iter().enumerate() {
        let sep = names::sep_chain(&info.name, proto, &ep.addr());
        let stat = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {}",
                probability(n - i)
            )
        } else {
            String::new()
        };
        rules.push(format!("-A {chain}{}{stat} -j {sep}", comment(ep)));
    }
    Chain {
        name: chain.to_string(),
        rules,
    }
}

/// TABBY-SEP-y: hairpin masquerade, then DNAT (recording the client for affinity).
pub(super) fn endpoint_chain(info: &ServicePortInfo, ep: &Endpoint, ctx: &Ctx<'_>) -> Chain {
    let p = info.protocol.as_str();
    let sep = names::sep_chain(&info.name, p, &ep.addr());
    let comment = if ctx.large_cluster {
        String::new()
    } else {
        format!(" -m comment --comment \"{}\"", info.name)
    };
    let recent = if info.affinity_timeout.is_some() {
        format!(" -m recent --set --name {sep} --mask 255.255.255.255 --rsource")
    } else {
        String::new()
    };
    let rules = vec![
        format!("-A {sep} -s {}/32{comment} -j {MARK_MASQ}", ep.ip),
        format!(
            "-A {sep} -p {p}{comment}{recent} -m {p} -j DNAT --to-destination {}",
            ep.addr()
        ),
    ];
    Chain { name: sep, rules }
}
