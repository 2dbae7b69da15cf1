//! The backend seam: plan → payload → apply.
//!
//! ```text
//!  ServicePortInfo ──plan_port (pure)──▶ Plan (desired state, one Arc per service port)
//!  full:    read_kernel ─▶ full(plan, kernel) (pure) ─▶ Payload ─▶ apply (one transaction)
//!  partial: partial(previous plan, plan) (pure)     ─▶ Payload ─▶ apply (one transaction)
//! ```
//!
//! The [`Proxier`](crate::proxier::Proxier) owns the sync state machine
//! (dirty services, sync periods, full resyncs, conntrack cleanup) and
//! drives any [`Backend`]. Two exist: every [`Dataplane`] (iptables-restore)
//! and [`Nftables`](crate::nftables::Nftables) (one `ip tabby-proxy` table).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::error::Result;
use super::iptables::{missing_jumps, Dataplane, KernelState};
use super::model::{Endpoint, ServiceKey, ServicePortInfo};
use super::payload::{nat_rule_count, render_full, render_partial, Extras, Payload};
use super::rules::{service_port_rules, Ctx, PortKey, ProxyOptions, RuleSet, ServicePortRules};

/// Which backend programs the services (`[proxy] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// kube-proxy's iptables mode (the default).
    #[default]
    Iptables,
    /// kube-proxy's nftables mode: one table, verdict maps.
    Nftables,
}

impl Mode {
    /// `iptables` or `nftables`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// Parse `iptables` or `nftables`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "iptables" => Some(Self::Iptables),
            "nftables" => Some(Self::Nftables),
            _ => None,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the proxier needs of one service port's planned state.
pub trait PortPlan {
    /// The service port the plan implements.
    fn info(&self) -> &ServicePortInfo;
    /// The endpoints traffic may be sent to (for conntrack cleanup).
    fn reachable(&self) -> &[Endpoint];
}

/// A backend's whole desired state: one shared plan per service port.
pub trait DesiredState: Clone {
    /// The plan of one service port.
    type Port: PortPlan;
    /// The service ports, ordered by key.
    fn ports(&self) -> &BTreeMap<PortKey, Arc<Self::Port>>;
    /// The service ports, to replace a changed service's.
    fn ports_mut(&mut self) -> &mut BTreeMap<PortKey, Arc<Self::Port>>;
    /// Total number of endpoints over all service ports.
    fn endpoint_count(&self) -> usize {
        self.ports()
            .values()
            .map(|p| p.info().endpoints.len())
            .sum()
    }
}

/// Sizes of a plan, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rules the backend owns (iptables: nat rules).
    pub rules: usize,
    /// Chains the backend owns (iptables: nat chains).
    pub chains: usize,
    /// Set and map elements (nftables only).
    pub elements: usize,
}

/// A way of programming the plan into the kernel.
pub trait Backend {
    /// The desired state.
    type Plan: DesiredState;
    /// What a full sync reads from the kernel first.
    type Kernel;
    /// The mode this backend implements.
    fn mode(&self) -> Mode;
    /// A plan with the fixed parts and no service.
    fn empty_plan(&self, opts: &ProxyOptions) -> Self::Plan;
    /// The plan of one service port (pure).
    fn plan_port(&self, info: ServicePortInfo, ctx: &Ctx<'_>)
        -> <Self::Plan as DesiredState>::Port;
    /// Whether plans depend on large cluster mode (a switch forces a full sync).
    fn uses_large_cluster_mode(&self) -> bool {
        false
    }
    /// Read what a full sync must know of the kernel (stale chains, missing jumps).
    fn read_kernel(&mut self) -> Result<Self::Kernel>;
    /// The payload of a full sync (pure).
    fn full(&self, plan: &Self::Plan, kernel: &Self::Kernel) -> Payload;
    /// The payload moving the kernel from `previous` to `plan`, where only
    /// the services `changed` may differ (pure).
    fn partial(
        &self,
        previous: &Self::Plan,
        plan: &Self::Plan,
        changed: &BTreeSet<ServiceKey>,
    ) -> Payload;
    /// Whether [`Self::partial`] reads all of `previous`; else it needs only
    /// the fixed part and the ports of the changed services (no copy of the
    /// whole plan per sync).
    fn partial_reads_whole_previous(&self) -> bool {
        true
    }
    /// Apply a payload in one transaction: all of it or nothing.
    fn apply(&mut self, payload: &Payload) -> Result<()>;
    /// Sizes of a plan.
    fn counts(&self, plan: &Self::Plan) -> Counts;
}

impl PortPlan for ServicePortRules {
    fn info(&self) -> &ServicePortInfo {
        &self.info
    }
    fn reachable(&self) -> &[Endpoint] {
        &self.reachable
    }
}

impl DesiredState for RuleSet {
    type Port = ServicePortRules;
    fn ports(&self) -> &BTreeMap<PortKey, Arc<ServicePortRules>> {
        &self.ports
    }
    fn ports_mut(&mut self) -> &mut BTreeMap<PortKey, Arc<ServicePortRules>> {
        &mut self.ports
    }
}

/// iptables mode: every [`Dataplane`] (`iptables-save` / `iptables-restore`).
impl<D: Dataplane> Backend for D {
    type Plan = RuleSet;
    type Kernel = KernelState;

    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn empty_plan(&self, opts: &ProxyOptions) -> RuleSet {
        RuleSet::empty(opts)
    }

    fn plan_port(&self, info: ServicePortInfo, ctx: &Ctx<'_>) -> ServicePortRules {
        service_port_rules(info, ctx)
    }

    fn uses_large_cluster_mode(&self) -> bool {
        true
    }

    fn read_kernel(&mut self) -> Result<KernelState> {
        Ok(KernelState::parse(&self.save()?))
    }

    fn full(&self, plan: &RuleSet, kernel: &KernelState) -> Payload {
        render_full(
            plan,
            kernel.nat_chains.iter().map(String::as_str),
            &missing_jumps(kernel),
        )
    }

    fn partial(&self, previous: &RuleSet, plan: &RuleSet, _: &BTreeSet<ServiceKey>) -> Payload {
        render_partial(previous, plan, &Extras::default())
    }

    fn apply(&mut self, payload: &Payload) -> Result<()> {
        self.restore(&payload.text)
    }

    fn counts(&self, plan: &RuleSet) -> Counts {
        Counts {
            rules: nat_rule_count(plan),
            chains: plan.ports.values().map(|p| p.chains.len()).sum::<usize>()
                + super::names::NAT_DISPATCH_CHAINS.len(),
            elements: 0,
        }
    }
}
