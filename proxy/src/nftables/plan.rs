//! Planning the `ip tabby-proxy` table (pure): the fixed chains, sets and
//! maps, and for each service port its chains, map elements and affinity sets.
//!
//! Which chains a service port needs and where each kind of traffic goes is
//! decided by the same [`Plan`](crate::chains) as in iptables mode, so both
//! modes agree on every traffic policy; only the shape differs.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use ipnetwork::Ipv4Network;

use super::ir::{
    AffinitySet, Chain, Element, Hook, Key, Match, Rule, Stmt, Value, Verdict, VmapKey,
};
use super::slots::{shard_of, Slots};
use crate::backend::{DesiredState, PortPlan};
use crate::chains::{Plan, PortChains};
use crate::model::{Endpoint, Protocol, ServicePortInfo};
use crate::names;
use crate::rules::{port_key, Ctx, PortKey, ProxyOptions};

/// The table's family.
pub const FAMILY: &str = "ip";
/// The table's name.
pub const TABLE: &str = "tabby-proxy";

/// Set: every cluster IP (traffic to a port no service serves is rejected).
pub const CLUSTER_IPS: &str = "cluster-ips";
/// Map: cluster, external and load balancer IP . protocol . port to the service's chain.
pub const SERVICE_IPS: &str = "service-ips";
/// Map: protocol . node port to the service's external chain.
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
/// Map: service addresses without endpoints to reject (or drop).
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
/// Map: node ports without endpoints to reject (or drop).
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
/// Map: load balancer IPs with source ranges to their firewall chain.
pub const FIREWALL_IPS: &str = "firewall-ips";
/// Set: `endpoint . endpoint` of every endpoint picked from an endpoint map:
/// a connection DNATed back to its own source is masqueraded (hairpin).
pub const HAIRPIN: &str = "hairpin";

/// The fixed sets and maps and their types, in the order they are declared.
pub const SETS: [(&str, &str); 7] = [
    (CLUSTER_IPS, "type ipv4_addr"),
    (
        SERVICE_IPS,
        "type ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (
        SERVICE_NODEPORTS,
        "type inet_proto . inet_service : verdict",
    ),
    (
        NO_ENDPOINT_SERVICES,
        "type ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (
        NO_ENDPOINT_NODEPORTS,
        "type inet_proto . inet_service : verdict",
    ),
    (
        FIREWALL_IPS,
        "type ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (HAIRPIN, "type ipv4_addr . ipv4_addr"),
];

/// Dispatch from the nat hooks.
pub const SERVICES: &str = "services";
/// Sets the masquerade mark.
pub const MARK_MASQ: &str = "mark-for-masquerade";
/// Masquerades marked packets (from nat postrouting).
pub const MASQUERADING: &str = "masquerading";
/// Rejects at once: TCP reset, else ICMP port unreachable.
pub const REJECT: &str = "reject-chain";
const FIREWALL_CHECK: &str = "firewall-check";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";

/// What is planned for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftPort {
    /// The service port.
    pub info: ServicePortInfo,
    /// The endpoints traffic may be sent to.
    pub reachable: Vec<Endpoint>,
    /// Its chains (service, local, external, firewall, endpoints).
    pub chains: Vec<Chain>,
    /// Its elements of the fixed sets and maps.
    pub elements: Vec<Element>,
    /// Its endpoints' session affinity sets.
    pub affinity: Vec<AffinitySet>,
}

/// The whole table: fixed chains, and every service port's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftPlan {
    /// The base chains and the shared regular chains.
    pub fixed: Arc<Vec<Chain>>,
    /// Per service port, ordered by key.
    pub ports: BTreeMap<PortKey, Arc<NftPort>>,
}

impl PortPlan for NftPort {
    fn info(&self) -> &ServicePortInfo {
        &self.info
    }
    fn reachable(&self) -> &[Endpoint] {
        &self.reachable
    }
}

impl DesiredState for NftPlan {
    type Port = NftPort;
    fn ports(&self) -> &BTreeMap<PortKey, Arc<NftPort>> {
        &self.ports
    }
    fn ports_mut(&mut self) -> &mut BTreeMap<PortKey, Arc<NftPort>> {
        &mut self.ports
    }
}

impl NftPlan {
    /// The fixed part and no service.
    pub fn empty(opts: &ProxyOptions) -> Self {
        Self {
            fixed: Arc::new(fixed_chains(opts)),
            ports: BTreeMap::new(),
        }
    }

    /// Every chain: fixed ones first, then each port's.
    pub fn chains(&self) -> impl Iterator<Item = &Chain> + '_ {
        self.fixed
            .iter()
            .chain(self.ports.values().flat_map(|p| p.chains.iter()))
    }

    /// Every element, the first claim of a key winning.
    pub fn elements(&self) -> BTreeMap<(&'static str, &Key), Option<&Value>> {
        let mut out = BTreeMap::new();
        for e in self.ports.values().flat_map(|p| p.elements.iter()) {
            out.entry((e.set, &e.key)).or_insert(e.value.as_ref());
        }
        out
    }

    /// Every affinity set.
    pub fn affinity_sets(&self) -> impl Iterator<Item = &AffinitySet> + '_ {
        self.ports.values().flat_map(|p| p.affinity.iter())
    }
}

fn net(ip: std::net::Ipv4Addr) -> Ipv4Network {
    Ipv4Network::from(ip)
}

fn jump(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(c.to_string()))
}

fn goto(c: &str) -> Verdict {
    Verdict::Goto(c.to_string())
}

fn base(
    name: &str,
    kind: &'static str,
    hook: &'static str,
    priority: i32,
    rules: Vec<Rule>,
) -> Chain {
    Chain {
        name: name.into(),
        hook: Some(Hook {
            kind,
            hook,
            priority,
        }),
        rules,
    }
}

fn regular(name: &str, rules: Vec<Rule>) -> Chain {
    Chain {
        name: name.into(),
        hook: None,
        rules,
    }
}

fn new_jump(chain: &str) -> Rule {
    Rule::new(vec![Match::CtStateNew], vec![jump(chain)])
}

/// Matches of "the destination is an address node ports answer on".
fn nodeport_dests(opts: &ProxyOptions) -> Vec<Vec<Match>> {
    if opts.nodeport_addresses.is_empty() {
        let mut m = vec![Match::FibDaddrLocal];
        if !opts.localhost_nodeports {
            m.push(Match::Daddr {
                negate: true,
                net: "127.0.0.0/8".parse().expect("loopback network"),
            });
        }
        return vec![m];
    }
    opts.nodeport_addresses
        .iter()
        .filter(|ip| opts.localhost_nodeports || !ip.is_loopback())
        .map(|ip| {
            vec![Match::Daddr {
                negate: false,
                net: net(*ip),
            }]
        })
        .collect()
}

/// The base chains and shared chains (kube-proxy's nftables layout).
///
/// Locally sent packets are checked for missing endpoints after DNAT
/// (`filter-output-post-dnat`), as iptables' filter OUTPUT is, so that
/// traffic short-circuited to the cluster chain is never dropped.
pub fn fixed_chains(opts: &ProxyOptions) -> Vec<Chain> {
    let mut chains = base_chains();
    chains.extend(shared_chains(opts));
    chains
}

/// A base chain: name, type, hook, priority, whether only new connections
/// jump, and the chains it jumps to.
type BaseSpec = (
    &'static str,
    &'static str,
    &'static str,
    i32,
    bool,
    &'static [&'static str],
);

/// The base chains: where each hook enters the table, at which priority.
fn base_chains() -> Vec<Chain> {
    const NEW: bool = true;
    let table: [BaseSpec; 8] = [
        (
            "nat-prerouting",
            "nat",
            "prerouting",
            -100,
            !NEW,
            &[SERVICES],
        ),
        ("nat-output", "nat", "output", -100, !NEW, &[SERVICES]),
        (
            "nat-postrouting",
            "nat",
            "postrouting",
            100,
            !NEW,
            &[MASQUERADING],
        ),
        (
            "filter-prerouting",
            "filter",
            "prerouting",
            -110,
            NEW,
            &[FIREWALL_CHECK],
        ),
        (
            "filter-input",
            "filter",
            "input",
            -110,
            NEW,
            &[NODEPORT_ENDPOINTS_CHECK, SERVICE_ENDPOINTS_CHECK],
        ),
        (
            "filter-forward",
            "filter",
            "forward",
            -110,
            NEW,
            &[SERVICE_ENDPOINTS_CHECK, CLUSTER_IPS_CHECK],
        ),
        (
            "filter-output",
            "filter",
            "output",
            -110,
            NEW,
            &[FIREWALL_CHECK],
        ),
        (
            "filter-output-post-dnat",
            "filter",
            "output",
            -90,
            NEW,
            &[SERVICE_ENDPOINTS_CHECK, CLUSTER_IPS_CHECK],
        ),
    ];
    table
        .into_iter()
        .map(|(name, kind, hook, priority, new, to)| {
            let rules = to
                .iter()
                .map(|c| match new {
                    true => new_jump(c),
                    false => Rule::new(vec![], vec![jump(c)]),
                })
                .collect();
            base(name, kind, hook, priority, rules)
        })
        .collect()
}

/// The regular chains every service shares.
fn shared_chains(opts: &ProxyOptions) -> Vec<Chain> {
    let mark = opts.masquerade_mark;
    let vmap = |m| {
        vec![Rule::new(
            vec![],
            vec![Stmt::Vmap(VmapKey::DaddrProtoPort, m)],
        )]
    };
    let nodeports = |map: &'static str| -> Vec<Rule> {
        nodeport_dests(opts)
            .into_iter()
            .map(|m| Rule::new(m, vec![Stmt::Vmap(VmapKey::ProtoPort, map)]))
            .collect()
    };
    let mut services = vmap(SERVICE_IPS);
    services.extend(nodeports(SERVICE_NODEPORTS));
    let masquerade = Stmt::Masquerade {
        fully_random: opts.random_fully,
    };
    let cluster_ips = Match::DaddrIn(CLUSTER_IPS.into());
    vec![
        regular(SERVICES, services),
        regular(
            MASQUERADING,
            vec![
                Rule::new(
                    vec![Match::CtStatusDnat, Match::SaddrDaddrIn(HAIRPIN.into())],
                    vec![Stmt::MarkOr(mark)],
                ),
                Rule::verdict(vec![Match::MarkClear(mark)], Verdict::Return),
                Rule::new(vec![], vec![Stmt::MarkXor(mark)]),
                Rule::new(vec![], vec![masquerade]),
            ],
        ),
        regular(MARK_MASQ, vec![Rule::new(vec![], vec![Stmt::MarkOr(mark)])]),
        regular(
            REJECT,
            vec![
                Rule::verdict(vec![], Verdict::RejectTcpReset),
                Rule::verdict(vec![], Verdict::Reject),
            ],
        ),
        regular(FIREWALL_CHECK, vmap(FIREWALL_IPS)),
        regular(SERVICE_ENDPOINTS_CHECK, vmap(NO_ENDPOINT_SERVICES)),
        regular(NODEPORT_ENDPOINTS_CHECK, nodeports(NO_ENDPOINT_NODEPORTS)),
        regular(
            CLUSTER_IPS_CHECK,
            vec![Rule::verdict(vec![cluster_ips], Verdict::Reject)],
        ),
    ]
}

/// The names of one service port's chains, kube-proxy style:
/// `service-<hash8>-<namespace>/<name>/<protocol>/<port>`.
struct Names {
    id: String,
    service: String,
    local: String,
    external: String,
    firewall: String,
}

impl Names {
    fn of(info: &ServicePortInfo) -> Self {
        let proto = info.protocol.as_str();
        let hash = names::port_proto_hash(&info.name, proto);
        let port = if info.port_name.is_empty() {
            format!("p{}", info.port)
        } else {
            info.port_name.clone()
        };
        let id = format!(
            "{}/{}/{proto}/{port}",
            info.service.namespace, info.service.name
        );
        let h = &hash[..8];
        Self {
            service: format!("service-{h}-{id}"),
            local: format!("local-{h}-{id}"),
            external: format!("external-{h}-{id}"),
            firewall: format!("firewall-{h}-{id}"),
            id,
        }
    }

    /// `endpoint-…` and `affinity-…` of one endpoint.
    fn endpoint(&self, info: &ServicePortInfo, ep: &Endpoint) -> (String, String) {
        let sep = names::sep_chain(&info.name, info.protocol.as_str(), &ep.addr());
        let h = &sep[names::SEP_PREFIX.len()..][..8];
        let tail = format!("{h}-{}__{}/{}", self.id, ep.ip, ep.port);
        (format!("endpoint-{tail}"), format!("affinity-{tail}"))
    }
}

/// Plan one service port, its dispatch chains taking their endpoint map
/// ranges from `slots`.
pub fn plan_port(info: ServicePortInfo, ctx: &Ctx<'_>, slots: &mut Slots) -> NftPort {
    let ch = PortChains::of(&info);
    let p = Plan::new(&info, &ch);
    let n = Names::of(&info);
    let internal_local = p.internal_chain == ch.svl;
    let mut chains = Vec::new();
    let mut elements = elements(&info, &p, &n, internal_local);
    if p.uses_ext {
        chains.push(external_chain(&info, &p, &n, ctx));
    }
    if p.uses_fw {
        chains.push(firewall_chain(&info, &n, ctx));
    }
    let key = port_key(&info);
    for (uses, local, name, eps) in [
        (p.uses_svc, false, &n.service, &p.cat.cluster),
        (p.uses_svl, true, &n.local, &p.cat.local),
    ] {
        if !uses {
            continue;
        }
        let masq = p.has_internal && internal_local == local;
        let d = Dispatch {
            info: &info,
            names: &n,
            name,
            masq,
            eps,
        };
        let slot_key = (key.clone(), local);
        let base = slots.range(&slot_key, eps.len());
        let targets = eps
            .iter()
            .map(|ep| SocketAddrV4::new(ep.ip, ep.port))
            .collect();
        let targets = slots.arrange(&slot_key, targets);
        chains.push(d.chain(base, &targets, ctx, &mut elements));
    }
    let mut affinity = Vec::new();
    if let Some(timeout) = info.affinity_timeout {
        for ep in &p.cat.reachable {
            let (chain, set) = n.endpoint(&info, ep);
            chains.push(endpoint_chain(ep, info.protocol, &chain, &set));
            affinity.push(AffinitySet { name: set, timeout });
        }
    } else {
        elements.extend(p.cat.reachable.iter().map(|ep| Element {
            set: HAIRPIN,
            key: Key::AddrAddr(ep.ip, ep.ip),
            value: None,
        }));
    }
    NftPort {
        elements,
        reachable: p.cat.reachable.iter().map(|e| (*e).clone()).collect(),
        chains,
        affinity,
        info,
    }
}

/// The port's elements: dispatch where it has endpoints, reject or drop
/// where it has none (drop when only the local policy lacks them).
fn elements(info: &ServicePortInfo, p: &Plan<'_>, n: &Names, internal_local: bool) -> Vec<Element> {
    let el = |set, key, verdict: Option<Verdict>| Element {
        set,
        key,
        value: verdict.map(Value::Verdict),
    };
    let (proto, port) = (info.protocol, info.port);
    let no_ep = if p.cat.has_any {
        Verdict::Drop
    } else {
        goto(REJECT)
    };
    let mut out = vec![el(CLUSTER_IPS, Key::Addr(info.cluster_ip), None)];
    let cip = Key::AddrProtoPort(info.cluster_ip, proto, port);
    if p.has_internal {
        let target = if internal_local { &n.local } else { &n.service };
        out.push(el(SERVICE_IPS, cip, Some(goto(target))));
    } else {
        out.push(el(NO_ENDPOINT_SERVICES, cip, Some(no_ep.clone())));
    }
    for ip in info.external_ips.iter().chain(&info.load_balancer_ips) {
        let key = Key::AddrProtoPort(*ip, proto, port);
        if p.cat.has_any {
            out.push(el(SERVICE_IPS, key.clone(), Some(goto(&n.external))));
        }
        if !p.has_external {
            out.push(el(NO_ENDPOINT_SERVICES, key, Some(no_ep.clone())));
        }
    }
    if p.uses_fw {
        for ip in &info.load_balancer_ips {
            let key = Key::AddrProtoPort(*ip, proto, port);
            out.push(el(FIREWALL_IPS, key, Some(goto(&n.firewall))));
        }
    }
    if let Some(np) = info.node_port {
        let key = Key::ProtoPort(proto, np);
        if p.cat.has_any {
            out.push(el(SERVICE_NODEPORTS, key.clone(), Some(goto(&n.external))));
        }
        if !p.has_external {
            out.push(el(NO_ENDPOINT_NODEPORTS, key, Some(no_ep)));
        }
    }
    out
}

/// external-…: masquerade (Cluster policy) or short-circuit pod and node
/// traffic to the cluster chain (Local policy), then the policy chain.
fn external_chain(info: &ServicePortInfo, p: &Plan<'_>, n: &Names, ctx: &Ctx<'_>) -> Chain {
    let mut rules = Vec::new();
    let policy = if info.external_policy_local {
        if let Some(cidr) = ctx.node.cluster_cidr {
            let pods = Match::Saddr {
                negate: false,
                net: cidr,
            };
            rules.push(Rule::verdict(vec![pods], goto(&n.service)));
        }
        rules.push(Rule::new(vec![Match::FibSaddrLocal], vec![jump(MARK_MASQ)]));
        rules.push(Rule::verdict(vec![Match::FibSaddrLocal], goto(&n.service)));
        &n.local
    } else {
        rules.push(Rule::new(vec![], vec![jump(MARK_MASQ)]));
        &n.service
    };
    if p.has_external {
        rules.push(Rule::verdict(vec![], goto(policy)));
    }
    regular(&n.external, rules)
}

/// firewall-…: sources in `loadBalancerSourceRanges` return, others are dropped.
fn firewall_chain(info: &ServicePortInfo, n: &Names, ctx: &Ctx<'_>) -> Chain {
    let ranges = &info.load_balancer_source_ranges;
    let mut allowed: Vec<Ipv4Network> = ranges.clone();
    if ranges
        .iter()
        .any(|r| ctx.node.node_ips.iter().any(|ip| r.contains(*ip)))
    {
        allowed.extend(info.load_balancer_ips.iter().map(|ip| net(*ip)));
    }
    let mut rules: Vec<Rule> = allowed
        .into_iter()
        .map(|net| Rule::verdict(vec![Match::Saddr { negate: false, net }], Verdict::Return))
        .collect();
    rules.push(Rule::verdict(vec![], Verdict::Drop));
    regular(&n.firewall, rules)
}

/// One dispatch chain (service-… or local-…) to plan.
struct Dispatch<'a> {
    info: &'a ServicePortInfo,
    names: &'a Names,
    name: &'a str,
    /// Whether off-cluster sources are marked for masquerade here.
    masq: bool,
    eps: &'a [&'a Endpoint],
}

impl Dispatch<'_> {
    /// service-… / local-…: mark off-cluster sources, then pick an endpoint:
    /// `dnat ip to numgen random mod N offset K map @endpoints-S` over the
    /// slots `K..K+N`, holding `slotted` in order (its elements go to `elements`), or with ClientIP
    /// affinity the affinity checks and the random spread over endpoint
    /// chains (`numgen random mod (n-i) 0` for endpoint i, the last plain).
    fn chain(
        &self,
        base: u32,
        slotted: &[SocketAddrV4],
        ctx: &Ctx<'_>,
        elements: &mut Vec<Element>,
    ) -> Chain {
        let (info, n) = (self.info, self.names);
        let mut rules = Vec::new();
        let src = match (ctx.opts.masquerade_all, ctx.node.cluster_cidr) {
            (true, _) => Some(None),
            (false, Some(cidr)) => Some(Some(Match::Saddr {
                negate: true,
                net: cidr,
            })),
            (false, None) => None,
        };
        if let (true, Some(src)) = (self.masq, src) {
            let mut m = vec![
                Match::Daddr {
                    negate: false,
                    net: net(info.cluster_ip),
                },
                Match::Dport(info.protocol, info.port),
            ];
            m.extend(src);
            rules.push(Rule::new(m, vec![jump(MARK_MASQ)]));
        }
        if info.affinity_timeout.is_none() {
            if !self.eps.is_empty() {
                let map = shard_of(info.protocol, base);
                for (slot, to) in (base..).zip(slotted) {
                    elements.push(Element {
                        set: map,
                        key: Key::Slot(slot),
                        value: Some(Value::Target(*to)),
                    });
                }
                let n = u32::try_from(self.eps.len()).unwrap_or(u32::MAX);
                let dnat = Stmt::DnatMap {
                    n,
                    offset: base,
                    map,
                };
                rules.push(Rule::new(vec![Match::L4proto(info.protocol)], vec![dnat]));
            }
            return regular(self.name, rules);
        }
        let targets: Vec<(String, String)> =
            self.eps.iter().map(|ep| n.endpoint(info, ep)).collect();
        for (chain, set) in &targets {
            rules.push(Rule::verdict(
                vec![Match::SaddrIn(set.clone())],
                goto(chain),
            ));
        }
        let count = targets.len();
        for (i, (chain, _)) in targets.iter().enumerate() {
            let m = if i + 1 < count {
                let left = u32::try_from(count - i).unwrap_or(u32::MAX);
                vec![Match::Random(left)]
            } else {
                Vec::new()
            };
            rules.push(Rule::verdict(m, goto(chain)));
        }
        regular(self.name, rules)
    }
}

/// endpoint-… (ClientIP affinity only): hairpin masquerade, remember the client, DNAT.
fn endpoint_chain(ep: &Endpoint, proto: Protocol, name: &str, affinity: &str) -> Chain {
    let mut rules = vec![Rule::new(
        vec![Match::Saddr {
            negate: false,
            net: net(ep.ip),
        }],
        vec![jump(MARK_MASQ)],
    )];
    rules.push(Rule::new(vec![], vec![Stmt::Update(affinity.to_string())]));
    rules.push(Rule::new(
        vec![Match::L4proto(proto)],
        vec![Stmt::Dnat(SocketAddrV4::new(ep.ip, ep.port))],
    ));
    regular(name, rules)
}
