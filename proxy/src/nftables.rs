//! nftables mode: one table, `ip tabby-proxy`, in kube-proxy's nftables
//! layout (KEP-3866), planned as data and applied by one `nft -f` per sync.
//!
//! ```text
//! nat-prerouting / nat-output (-100) ─▶ services:
//!     ip daddr . meta l4proto . th dport vmap @service-ips     ─▶ service-… | local-… | external-…
//!     fib daddr type local … meta l4proto . th dport vmap @service-nodeports ─▶ external-…
//! external-… ─▶ mark-for-masquerade, then service-… (Cluster) or local-… (Local; pods and the node short-circuit)
//! service-… / local-… ─▶ ip saddr @affinity-… goto endpoint-…   (ClientIP affinity:
//!                      ─▶ numgen random mod (n-i) 0 goto endpoint-…, the last plain)
//!                      ─▶ dnat ip to numgen random mod N offset K map @endpoints-S
//! endpoint-… (affinity only) ─▶ hairpin mark, update @affinity-…, dnat to ip:port
//! nat-postrouting (100) ─▶ masquerading: hairpin (@hairpin) and marked packets are masqueraded
//! filter-prerouting / filter-output (-110) ─▶ firewall-check: @firewall-ips ─▶ firewall-… (source ranges)
//! filter-input / -forward (-110), filter-output-post-dnat (-90):
//!     @no-endpoint-services, @no-endpoint-nodeports ─▶ reject-chain (TCP reset / ICMP) or drop;
//!     cluster-ips-check: other ports of a cluster IP are rejected
//! ```
//!
//! A full sync goes to the kernel as one netlink batch (`rewrite.rs`)
//! after a short `nft -f` declaring the sets; the `nft -f` text of the
//! same sync is the reference and the fallback.
//!
//! Endpoints are picked by one rule per dispatch chain,
//! `dnat ip to numgen random mod N offset K map @endpoints-S`: slots
//! `K..K+N` of one of the shared endpoint maps of its protocol hold `address . port`
//! (see `slots.rs`), and a `hairpin` set of `endpoint . endpoint` pairs marks
//! connections DNATed back to their source in nat-postrouting. So one
//! endpoint change is a few element operations, which the kernel applies
//! without revalidating the table; and there is no chain per endpoint:
//! every commit that adds a rule with a jump or a NAT statement makes the
//! kernel walk every chain reachable from the base chains (measured at 10k
//! services with a chain per endpoint: 95% of a one-endpoint change, 220 ms
//! of kernel time). Why not one set per service (kube-proxy's anonymous
//! `numgen … vmap { … }`): the kernel finds sets by walking the table's list
//! of them, so per-service sets make a full sync quadratic (10k named maps:
//! 28 s). Only services with ClientIP affinity keep endpoint chains, for the
//! per-endpoint affinity sets (`update @affinity-… { ip saddr }`).

mod exec;
mod ir;
mod netlink;
mod plan;
mod render;
mod rewrite;
mod slots;
#[cfg(test)]
mod tests;

pub use exec::{parse_kernel, NftCli, NftExec, Nftables};
pub use ir::{AffinitySet, Chain, Element, Hook, Key, Match, Rule, Stmt, Value, Verdict, VmapKey};
pub use netlink::{NftBatch, NlSocket, SetOp};
pub use plan::{
    fixed_chains, plan_port, NftPlan, NftPort, CLUSTER_IPS, FAMILY, FIREWALL_IPS, HAIRPIN,
    MARK_MASQ, MASQUERADING, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, REJECT, SERVICES,
    SERVICE_IPS, SERVICE_NODEPORTS, SETS, TABLE,
};
pub use render::{
    fixed_sets, render_changes, render_full, render_full_sync, render_partial, render_rewrite,
    Claims, NftKernel,
};
pub use rewrite::NftRewrite;
pub use slots::{shard_name, shard_sets, Slots, SHARDS};

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
    let mut slots = Slots::default();
    for (key, port) in set.ports {
        let info = std::sync::Arc::unwrap_or_clone(port).info;
        plan.ports
            .insert(key, std::sync::Arc::new(plan_port(info, &ctx, &mut slots)));
    }
    plan
}
