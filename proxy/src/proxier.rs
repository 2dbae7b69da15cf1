//! The sync state machine.
//!
//! ```text
//!  watcher ──ProxyEvent──▶ run() ──▶ Proxier::apply_event (marks services dirty)
//!                           │
//!                           └─ at next_deadline() ─▶ Proxier::sync
//!                                 full:    Backend::read_kernel ─▶ Backend::full (stale chains, missing jumps)
//!                                 partial: Backend::partial(applied, desired)
//!                                 ─▶ Backend::apply (one transaction) ─▶ conntrack -D for stale UDP flows
//! ```
//!
//! The first sync is full; later ones are partial (dispatch chains plus the
//! chains of services that changed). A failed restore, a node change, a
//! switch into or out of large cluster mode, or `full_resync_period` without
//! one forces the next sync to be full. Syncs are at least
//! `min_sync_period` apart, and happen at least every `max_sync_period`
//! even without a change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::mpsc;

use super::backend::{Backend, DesiredState};
use super::conntrack::{stale_udp_flows, Conntrack};
use super::error::{chain, Result};
use super::metrics::{ProxyMetrics, SyncRecord};
use super::model::{service_ports, NodeFacts, ServiceKey, SERVICE_NAME_LABEL};
use super::payload::Payload;
use super::rules::{port_key, Ctx, ProxyOptions};

/// Timing of syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Least time between two syncs (kube-proxy `--iptables-min-sync-period`, 1 s).
    pub min_sync_period: Duration,
    /// Most time between two syncs (kube-proxy `--iptables-sync-period`, 30 s).
    pub max_sync_period: Duration,
    /// Most time between two full syncs.
    pub full_resync_period: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            min_sync_period: Duration::from_secs(1),
            max_sync_period: Duration::from_secs(30),
            full_resync_period: Duration::from_secs(300),
        }
    }
}

/// A change of cluster state, from the watcher.
#[derive(Debug, Clone)]
pub enum ProxyEvent {
    /// A Service was added or changed.
    ServiceUpsert(Box<Service>),
    /// A Service was deleted.
    ServiceDelete(ServiceKey),
    /// An EndpointSlice was added or changed.
    SliceUpsert(Box<EndpointSlice>),
    /// An EndpointSlice was deleted (namespace, name).
    SliceDelete(String, String),
    /// The node's facts changed.
    Node(Box<NodeFacts>),
    /// Resync everything now.
    FullSync,
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether it was a full sync.
    pub full: bool,
    /// Size of the payload applied.
    pub payload: Payload,
    /// Wall time of the sync (generation, restore and conntrack).
    pub elapsed: Duration,
    /// Of which applying the payload (`iptables-restore`, `nft -f`) took this long.
    pub restore: Duration,
}

/// The proxy's state: cluster objects, the last applied plan, timers.
pub struct Proxier<B: Backend, C> {
    node: NodeFacts,
    opts: ProxyOptions,
    cfg: SyncConfig,
    backend: B,
    conntrack: C,
    services: BTreeMap<ServiceKey, Service>,
    slices: BTreeMap<ServiceKey, BTreeMap<String, EndpointSlice>>,
    slice_owner: HashMap<(String, String), ServiceKey>,
    dirty: BTreeSet<ServiceKey>,
    applied: Option<B::Plan>,
    needs_full: bool,
    last_sync: Option<Instant>,
    last_full: Option<Instant>,
    metrics: ProxyMetrics,
}

fn slice_id(s: &EndpointSlice) -> (String, String) {
    (
        s.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

impl<B: Backend, C> Proxier<B, C> {
    /// The node's facts as last set.
    pub fn node(&self) -> &NodeFacts {
        &self.node
    }

    /// Every Service with its EndpointSlices, as last received.
    pub fn services_with_slices(
        &self,
    ) -> impl Iterator<Item = (&Service, Vec<&EndpointSlice>)> + '_ {
        self.services.iter().map(|(key, svc)| {
            let slices = self
                .slices
                .get(key)
                .map(|m| m.values().collect())
                .unwrap_or_default();
            (svc, slices)
        })
    }
}

impl<B: Backend, C: Conntrack> Proxier<B, C> {
    /// A proxier that has synced nothing yet.
    pub fn new(
        node: NodeFacts,
        opts: ProxyOptions,
        cfg: SyncConfig,
        backend: B,
        conntrack: C,
    ) -> Self {
        let metrics = ProxyMetrics::new(backend.mode());
        Self {
            node,
            opts,
            cfg,
            backend,
            conntrack,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owner: HashMap::new(),
            dirty: BTreeSet::new(),
            applied: None,
            needs_full: true,
            last_sync: None,
            last_full: None,
            metrics,
        }
    }

    /// The metrics so far (the agent registers them into its registry).
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// The plan last applied successfully.
    pub fn applied(&self) -> Option<&B::Plan> {
        self.applied.as_ref()
    }

    /// The backend (tests inspect it).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (tests inspect and steer it).
    pub fn dataplane_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Record a change; the next sync programs it.
    pub fn apply_event(&mut self, ev: ProxyEvent) {
        match ev {
            ProxyEvent::ServiceUpsert(svc) => {
                let key = ServiceKey::of(&svc.metadata);
                self.dirty.insert(key.clone());
                self.services.insert(key, *svc);
            }
            ProxyEvent::ServiceDelete(key) => {
                self.services.remove(&key);
                self.dirty.insert(key);
            }
            ProxyEvent::SliceUpsert(slice) => {
                let id = slice_id(&slice);
                self.remove_slice(&id);
                if let Some(name) = slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                {
                    let key = ServiceKey {
                        namespace: id.0.clone(),
                        name: name.clone(),
                    };
                    self.slices
                        .entry(key.clone())
                        .or_default()
                        .insert(id.1.clone(), *slice);
                    self.slice_owner.insert(id, key.clone());
                    self.dirty.insert(key);
                }
            }
            ProxyEvent::SliceDelete(ns, name) => self.remove_slice(&(ns, name)),
            ProxyEvent::Node(node) => {
                self.node = *node;
                self.needs_full = true;
            }
            ProxyEvent::FullSync => self.needs_full = true,
        }
    }

    fn remove_slice(&mut self, id: &(String, String)) {
        if let Some(key) = self.slice_owner.remove(id) {
            if let Some(m) = self.slices.get_mut(&key) {
                m.remove(&id.1);
            }
            self.dirty.insert(key);
        }
    }

    /// Whether a change waits to be programmed (or a full sync is due).
    pub fn has_pending(&self) -> bool {
        self.needs_full || !self.dirty.is_empty()
    }

    /// When the next sync should run.
    pub fn next_deadline(&self, now: Instant) -> Instant {
        let Some(last) = self.last_sync else {
            return now;
        };
        if self.has_pending() {
            (last + self.cfg.min_sync_period).max(now)
        } else {
            last + self.cfg.max_sync_period
        }
    }

    /// Sync when [`Self::next_deadline`] has come.
    pub fn sync_if_due(&mut self, now: Instant) -> Option<Result<SyncReport>> {
        (self.next_deadline(now) <= now).then(|| self.sync(now))
    }

    fn ctx(&self, large_cluster: bool) -> Ctx<'_> {
        Ctx {
            node: &self.node,
            opts: &self.opts,
            large_cluster,
        }
    }

    fn is_large(&self, endpoints: usize) -> bool {
        endpoints > self.opts.large_cluster_endpoints
    }

    fn slices_of(&self, key: &ServiceKey) -> Vec<&EndpointSlice> {
        self.slices
            .get(key)
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }

    /// Plan every port of `svc` into `plan`.
    fn plan_service(&self, plan: &mut B::Plan, svc: &Service, ctx: &Ctx<'_>) {
        let key = ServiceKey::of(&svc.metadata);
        for info in service_ports(svc, &self.slices_of(&key), &self.node) {
            let port = Arc::new(self.backend.plan_port(info.clone(), ctx));
            plan.ports_mut().insert(port_key(&info), port);
        }
    }

    /// Every service's plan, from scratch.
    fn generate_all(&self) -> B::Plan {
        let total: usize = self
            .slices
            .values()
            .flat_map(|m| m.values())
            .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
            .sum();
        let ctx = self.ctx(self.is_large(total));
        let mut plan = self.backend.empty_plan(&self.opts);
        for svc in self.services.values() {
            self.plan_service(&mut plan, svc, &ctx);
        }
        plan
    }

    /// The applied plan with the dirty services planned again; `None` when
    /// the change moves an iptables plan into or out of large cluster mode.
    fn generate_dirty(&self, applied: &B::Plan) -> Option<B::Plan> {
        let was_large = self.is_large(applied.endpoint_count());
        let ctx = self.ctx(was_large);
        let mut plan = applied.clone();
        for key in &self.dirty {
            let start = (key.clone(), String::new(), super::model::Protocol::Tcp);
            let stale: Vec<_> = plan
                .ports()
                .range(start..)
                .take_while(|(k, _)| &k.0 == key)
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                plan.ports_mut().remove(&k);
            }
            if let Some(svc) = self.services.get(key) {
                self.plan_service(&mut plan, svc, &ctx);
            }
        }
        let switched = self.is_large(plan.endpoint_count()) != was_large;
        (!switched || !self.backend.uses_large_cluster_mode()).then_some(plan)
    }

    /// Program the current state now: one restore, then conntrack cleanup.
    pub fn sync(&mut self, now: Instant) -> Result<SyncReport> {
        let started = Instant::now();
        let full_due = self
            .last_full
            .is_none_or(|t| now >= t + self.cfg.full_resync_period);
        let partial = match (&self.applied, self.needs_full || full_due) {
            (Some(applied), false) => self
                .generate_dirty(applied)
                .map(|plan| (self.backend.partial(applied, &plan), plan)),
            _ => None,
        };
        let full = partial.is_none();
        let result = match partial {
            Some(p) => Ok(p),
            None => self.prepare_full(),
        };
        let restore_started = Instant::now();
        let result = result
            .and_then(|(payload, plan)| self.backend.apply(&payload).map(|()| (payload, plan)));
        let restore = restore_started.elapsed();
        self.last_sync = Some(now);
        let (payload, plan) = match result {
            Ok(ok) => ok,
            Err(e) => {
                self.needs_full = true;
                self.metrics.record_restore_failure(full);
                tracing::warn!(
                    error = %chain(&e),
                    mode = %self.backend.mode(),
                    full,
                    "service proxy sync failed; next sync is full"
                );
                return Err(e);
            }
        };
        self.clean_conntrack(&plan);
        if full {
            self.last_full = Some(now);
        }
        self.needs_full = false;
        self.dirty.clear();
        let elapsed = started.elapsed();
        self.record(&plan, &payload, full, elapsed);
        self.applied = Some(plan);
        tracing::debug!(
            mode = %self.backend.mode(),
            full,
            bytes = payload.text.len(),
            ?elapsed,
            "service proxy synced"
        );
        Ok(SyncReport {
            full,
            payload,
            elapsed,
            restore,
        })
    }

    fn prepare_full(&mut self) -> Result<(Payload, B::Plan)> {
        let kernel = self.backend.read_kernel()?;
        let plan = self.generate_all();
        let payload = self.backend.full(&plan, &kernel);
        Ok((payload, plan))
    }

    fn clean_conntrack(&mut self, plan: &B::Plan) {
        let empty;
        let previous = match &self.applied {
            Some(p) => p,
            None => {
                empty = self.backend.empty_plan(&self.opts);
                &empty
            }
        };
        for del in stale_udp_flows(previous, plan) {
            let result = self.conntrack.delete(&del);
            self.metrics.record_conntrack_delete(result.is_ok());
            if let Err(e) = result {
                tracing::warn!(error = %chain(&e), ?del, "conntrack cleanup failed");
            }
        }
    }

    fn record(&self, plan: &B::Plan, payload: &Payload, full: bool, elapsed: Duration) {
        let counts = self.backend.counts(plan);
        self.metrics.record_sync(&SyncRecord {
            full,
            elapsed,
            nat_rules: counts.rules,
            filter_rules: payload.filter_rules,
            nat_rules_written: payload.nat_rules,
            nat_chains: counts.chains,
            elements: counts.elements,
            service_ports: plan.ports().len(),
            endpoints: plan.endpoint_count(),
            payload_bytes: payload.text.len(),
        });
    }

    /// Drive the proxier from a channel of events until it closes, syncing
    /// at each deadline. Failed syncs are logged and retried (as full syncs)
    /// after `min_sync_period`.
    pub async fn run(self, events: mpsc::Receiver<ProxyEvent>) -> Self {
        self.run_observed(events, |_: &Self| {}).await
    }

    /// [`Self::run`], calling `after_sync` after every sync attempt
    /// (successful or not), so that the owner can publish metrics and
    /// health-check counts while the loop owns the proxier.
    pub async fn run_observed(
        mut self,
        mut events: mpsc::Receiver<ProxyEvent>,
        mut after_sync: impl FnMut(&Self) + Send,
    ) -> Self {
        loop {
            let now = tokio::time::Instant::now();
            let deadline = tokio::time::Instant::from_std(self.next_deadline(now.into_std()));
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.apply_event(ev),
                    None => return self,
                },
                () = tokio::time::sleep_until(deadline) => {
                    let _ = self.sync(tokio::time::Instant::now().into_std());
                    after_sync(&self);
                }
            }
        }
    }
}
