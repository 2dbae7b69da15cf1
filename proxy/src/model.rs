//! The proxy's view of a service port and its endpoints, built from the
//! Kubernetes objects (`Service`, discovery/v1 `EndpointSlice`) and the facts
//! of this node. Everything here is pure: no I/O.
//!
//! Only IPv4 is programmed for now (the `iptables` tables); IPv6 addresses
//! and `IPv6` slices are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// A transport protocol a service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parse the API's spelling (`TCP`, `UDP`, `SCTP`; absent means TCP).
    pub fn from_api(p: Option<&str>) -> Option<Self> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Lower-case name, as iptables and the chain hash use it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// The namespace and name of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Namespace (`default` when absent).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ServiceKey {
    /// Key of a Kubernetes object from its metadata.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod (or external) address.
    pub ip: Ipv4Addr,
    /// Target port.
    pub port: u16,
    /// Whether the endpoint runs on this node.
    pub is_local: bool,
    /// `conditions.ready` (absent means ready).
    pub ready: bool,
    /// `conditions.serving` (absent means the value of ready).
    pub serving: bool,
    /// `conditions.terminating` (absent means false).
    pub terminating: bool,
}

impl Endpoint {
    /// `ip:port`, as kube-proxy spells it in comments and hashes.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// Everything the rule generator needs about one port of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// The owning Service.
    pub service: ServiceKey,
    /// The port's name (empty when unnamed).
    pub port_name: String,
    /// `namespace/name:port` (or `namespace/name`), used in comments and hashes.
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// The cluster IP.
    pub cluster_ip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// Node port, for NodePort and LoadBalancer services.
    pub node_port: Option<u16>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (VIP mode only).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `spec.loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Vec<Ipv4Network>,
    /// `Some(timeout seconds)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local` on an externally reachable service.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    /// `spec.healthCheckNodePort` (LoadBalancer with Local external policy).
    pub health_check_node_port: Option<u16>,
    /// Endpoints, sorted by `ip:port` text (as kube-proxy orders them).
    pub endpoints: Vec<Endpoint>,
}

impl ServicePortInfo {
    /// Whether any external address (node port, external IP, LB IP) reaches it.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Whether some traffic uses the `Cluster` policy endpoint set. An
    /// externally reachable service always does: even with `Local` external
    /// policy, traffic from pods and from the node itself short-circuits to it.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Whether some traffic uses the `Local` policy endpoint set.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || self.external_policy_local
    }
}

/// Endpoints split the way kube-proxy's `CategorizeEndpoints` does.
#[derive(Debug, Default, Clone)]
pub struct Categorized<'a> {
    /// Endpoints for `Cluster` policy: ready ones, else serving-and-terminating ones.
    pub cluster: Vec<&'a Endpoint>,
    /// Endpoints for `Local` policy: the same rule over local endpoints.
    pub local: Vec<&'a Endpoint>,
    /// Union of the two sets the service actually uses (each endpoint once).
    pub reachable: Vec<&'a Endpoint>,
    /// Whether the service has usable endpoints anywhere in the cluster.
    pub has_any: bool,
}

/// Pick usable endpoints: the ready ones, or, when none is ready, the ones
/// still serving while terminating.
fn usable<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<&'a Endpoint> {
    let ready: Vec<_> = eps.clone().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| e.serving && e.terminating).collect()
}

/// Split a service port's endpoints into the cluster and local sets.
pub fn categorize(svc: &ServicePortInfo) -> Categorized<'_> {
    let cluster = usable(svc.endpoints.iter());
    let local = usable(svc.endpoints.iter().filter(|e| e.is_local));
    let has_any = !cluster.is_empty();
    let mut reachable: Vec<&Endpoint> = Vec::new();
    if svc.uses_cluster_endpoints() {
        reachable.extend(cluster.iter().copied());
    }
    if svc.uses_local_endpoints() {
        for e in &local {
            if !reachable.iter().any(|r| r.ip == e.ip && r.port == e.port) {
                reachable.push(e);
            }
        }
    }
    reachable.sort_by_key(|e| e.addr());
    Categorized {
        cluster,
        local,
        reachable,
        has_any,
    }
}

/// What the proxy knows about the node it programs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's name, matched against `endpoints[].nodeName`.
    pub name: String,
    /// The node's addresses (used for `loadBalancerSourceRanges` from the node).
    pub node_ips: Vec<Ipv4Addr>,
    /// The cluster's pod CIDR: traffic from elsewhere to a cluster IP is masqueraded.
    pub cluster_cidr: Option<Ipv4Network>,
    /// This node's pod CIDRs (informational; local detection uses `cluster_cidr`).
    pub pod_cidrs: Vec<Ipv4Network>,
}

/// `loadBalancerSourceRanges` that parse as IPv4 networks.
fn source_ranges(spec: &ServiceSpec) -> Vec<Ipv4Network> {
    spec.load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| r.trim().parse::<Ipv4Network>().ok())
        .collect()
}

/// The ClientIP affinity timeout in seconds, when the service asks for affinity.
fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    })
}

/// Build the service ports of one Service from it and its EndpointSlices.
///
/// Returns nothing for headless (`clusterIP: None`) and ExternalName
/// services, or when the cluster IP is not IPv4. Slices of other services are
/// ignored, so the caller may pass every slice of the namespace.
pub fn service_ports(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeFacts,
) -> Vec<ServicePortInfo> {
    let key = ServiceKey::of(&svc.metadata);
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let Some(cluster_ip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return Vec::new(); // headless ("None"), unset, or IPv6
    };
    let external_ips = parse_all(spec.external_ips.iter().flatten().map(String::as_str));
    let load_balancer_ips = load_balancer_ips(svc);
    let ranges = source_ranges(spec);
    let affinity_timeout = affinity_timeout(spec);
    let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(protocol) = Protocol::from_api(port.protocol.as_deref()) else {
            continue;
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let name = if port_name.is_empty() {
            key.to_string()
        } else {
            format!("{key}:{port_name}")
        };
        let mut info = ServicePortInfo {
            service: key.clone(),
            port_name,
            name,
            protocol,
            cluster_ip,
            port: service_port,
            node_port: port
                .node_port
                .filter(|_| node_port_type)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0),
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: ranges.clone(),
            affinity_timeout,
            external_policy_local: false,
            internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: None,
            endpoints: endpoints_for(port, &key, slices, node),
        };
        info.external_policy_local = info.externally_accessible()
            && spec.external_traffic_policy.as_deref() == Some("Local");
        if info.external_policy_local && spec.type_.as_deref() == Some("LoadBalancer") {
            info.health_check_node_port = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0);
        }
        out.push(info);
    }
    out
}

fn parse_all<'a>(ips: impl Iterator<Item = &'a str>) -> Vec<Ipv4Addr> {
    ips.filter_map(|ip| ip.parse().ok()).collect()
}

/// Ingress IPs of a LoadBalancer service, skipping `ipMode: Proxy` ones
/// (their load balancer does not send the VIP as destination).
fn load_balancer_ips(svc: &Service) -> Vec<Ipv4Addr> {
    if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) != Some("LoadBalancer") {
        return Vec::new();
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    parse_all(
        ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref()),
    )
}

/// The endpoints of one service port: every IPv4 slice of the service, the
/// slice port with the same name and protocol, first address of each
/// endpoint, duplicates dropped, sorted by `ip:port` text.
fn endpoints_for(
    port: &ServicePort,
    key: &ServiceKey,
    slices: &[&EndpointSlice],
    node: &NodeFacts,
) -> Vec<Endpoint> {
    let want_name = port.name.as_deref().unwrap_or("");
    let want_proto = Protocol::from_api(port.protocol.as_deref());
    let mut by_addr: BTreeMap<String, Endpoint> = BTreeMap::new();
    for slice in slices
        .iter()
        .filter(|s| s.address_type == "IPv4" && slice_belongs_to(s, key))
    {
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == want_name
                && Protocol::from_api(p.protocol.as_deref()) == want_proto
        }) else {
            continue;
        };
        let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let Some(ip) = ep
                .addresses
                .first()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let endpoint = Endpoint {
                ip,
                port: target_port,
                is_local: !node.name.is_empty()
                    && ep.node_name.as_deref() == Some(node.name.as_str()),
                ready,
                serving: cond.and_then(|c| c.serving).unwrap_or(ready),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            };
            by_addr.entry(endpoint.addr()).or_insert(endpoint);
        }
    }
    by_addr.into_values().collect()
}

/// Whether a slice carries endpoints of the given service.
pub fn slice_belongs_to(slice: &EndpointSlice, key: &ServiceKey) -> bool {
    let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
    let label = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    ns == key.namespace && label.map(String::as_str) == Some(key.name.as_str())
}
