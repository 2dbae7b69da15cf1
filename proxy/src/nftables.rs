//! nftables mode: one table, `ip tabby-proxy`, in kube-proxy's nftables
//! layout (KEP-3866), planned as data and applied by one `nft -f` per sync.
//!
//! ```text
//! nat-prerouting / nat-output (-100) ─▶ services:
//!     ip daddr . meta l4proto . th dport vmap @service-ips     ─▶ service-… | local-… | external-…
//!     fib daddr type local … meta l4proto . th dport vmap @service-nodeports ─▶ external-…
//! external-… ─▶ mark-for-masquerade, then service-… (Cluster) or local-… (Local; pods and the node short-circuit)
//! service-… / local-… ─▶ ip saddr @affinity-… goto endpoint-…   (ClientIP affinity)
//!                      ─▶ numgen random mod (n-i) 0 goto endpoint-…, the last plain
//! endpoint-… ─▶ hairpin mark, update @affinity-…, dnat to ip:port
//! nat-postrouting (100) ─▶ masquerading: marked packets are masqueraded
//! filter-prerouting / filter-output (-110) ─▶ firewall-check: @firewall-ips ─▶ firewall-… (source ranges)
//! filter-input / -forward (-110), filter-output-post-dnat (-90):
//!     @no-endpoint-services, @no-endpoint-nodeports ─▶ reject-chain (TCP reset / ICMP) or drop;
//!     cluster-ips-check: other ports of a cluster IP are rejected
//! ```
//!
//! Endpoints are picked by a chain of `numgen random mod (n-i) 0` rules
//! rather than one `numgen random mod n vmap { … }` per service: every
//! anonymous verdict map is a set of the table, and the kernel's loop check
//! walks all of the table's sets for each jump it adds, so a full sync with
//! one anonymous map per service grows with the square of the services
//! (measured on this kernel: 2,000 services 0.9 s of kernel time, 4,000 19 s,
//! 8,000 67 s). The chain of rules gives the same distribution, is O(1) in
//! the number of services and costs nothing per service in the kernel.

mod exec;
mod ir;
mod plan;
mod render;
#[cfg(test)]
mod tests;

pub use exec::{parse_kernel, NftCli, NftExec, Nftables};
pub use ir::{AffinitySet, Chain, Element, Hook, Key, Match, Rule, Stmt, Verdict, VmapKey};
pub use plan::{
    fixed_chains, plan_port, NftPlan, NftPort, CLUSTER_IPS, FAMILY, FIREWALL_IPS, MARK_MASQ,
    MASQUERADING, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, REJECT, SERVICES, SERVICE_IPS,
    SERVICE_NODEPORTS, SETS, TABLE,
};
pub use render::{render_full, render_partial, NftKernel};

/// Plan every service port of `services` and `slices` (as [`crate::generate`] does for iptables).
pub fn generate(
    services: &[k8s_openapi::api::core::v1::Service],
    slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
    node: &crate::NodeFacts,
    opts: &crate::ProxyOptions,
) -> NftPlan {
    let set = crate::generate(services, slices, node, opts);
    let ctx = crate::rules::Ctx {
        node,
        opts,
        large_cluster: false,
    };
    let mut plan = NftPlan::empty(opts);
    for (key, port) in set.ports {
        let info = std::sync::Arc::unwrap_or_clone(port).info;
        plan.ports
            .insert(key, std::sync::Arc::new(plan_port(info, &ctx)));
    }
    plan
}
