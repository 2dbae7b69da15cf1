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
//! The first sync waits until every source the proxier was told to wait
//! for ([`Proxier::wait_for`]) has delivered its initial state
//! ([`ProxyEvent::SourceSynced`]; a [`ProxyEvent::Node`] counts for
//! [`SourceId::Node`]): a sync from a partial view would delete the rules of
//! every service not read yet, which after an agent restart are the live
//! rules of the previous run (kube-proxy waits for its informers the same
//! way). Until then the kernel's rules stay untouched.
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

use super::backend::{Backend, DesiredState, PortPlan};
use super::conntrack::{stale_udp_flows, Conntrack};
use super::error::{chain, Result};
use super::metrics::{ProxyMetrics, SyncRecord};
use super::model::{service_ports, NodeFacts, ServiceKey, SERVICE_NAME_LABEL};
use super::payload::Payload;
use super::rules::{port_key, Ctx, PortKey, ProxyOptions};

/// The ports of an applied plan a partial sync replaced (`Some`) or added
/// (`None`), in order: reverted when the sync fails.
type Undo<B> = Vec<(
    PortKey,
    Option<Arc<<<B as Backend>::Plan as DesiredState>::Port>>,
)>;

/// Puts back what `undo` lists, last first.
fn revert<P: DesiredState>(plan: &mut P, undo: Vec<(PortKey, Option<Arc<P::Port>>)>) {
    for (k, old) in undo.into_iter().rev() {
        match old {
            Some(old) => {
                plan.ports_mut().insert(k, old);
            }
            None => {
                plan.ports_mut().remove(&k);
            }
        }
    }
}

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

/// A source of cluster state whose initial state the first sync waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceId {
    /// Services (the file source's first complete read, or a reflector's initial list).
    Services,
    /// EndpointSlices.
    EndpointSlices,
    /// The node's own facts (the agent's first datastore pass).
    Node,
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
    /// The node's facts changed (the first also marks [`SourceId::Node`] synced).
    Node(Box<NodeFacts>),
    /// A source has delivered everything it had at its start.
    SourceSynced(SourceId),
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
    waiting: BTreeSet<SourceId>,
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
            waiting: BTreeSet::new(),
            metrics,
        }
    }

    /// Holds the first sync until each of `sources` has synced.
    pub fn wait_for(mut self, sources: impl IntoIterator<Item = SourceId>) -> Self {
        self.waiting.extend(sources);
        self
    }

    /// Whether every awaited source has delivered its initial state.
    pub fn sources_synced(&self) -> bool {
        self.waiting.is_empty()
    }

    fn source_synced(&mut self, source: SourceId) {
        if self.waiting.remove(&source) && self.waiting.is_empty() {
            tracing::info!(last = ?source, "every source has synced; the first sync may run");
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
                self.source_synced(SourceId::Node);
            }
            ProxyEvent::SourceSynced(source) => self.source_synced(source),
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

    /// When the next sync should run; `None` while a source has not synced.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if !self.sources_synced() {
            return None;
        }
        let Some(last) = self.last_sync else {
            return Some(now);
        };
        Some(if self.has_pending() {
            (last + self.cfg.min_sync_period).max(now)
        } else {
            last + self.cfg.max_sync_period
        })
    }

    /// Sync when [`Self::next_deadline`] has come.
    pub fn sync_if_due(&mut self, now: Instant) -> Option<Result<SyncReport>> {
        self.next_deadline(now)
            .is_some_and(|d| d <= now)
            .then(|| self.sync(now))
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

    /// Plans the dirty services again into `plan` (the applied plan, in
    /// place) and returns what they replaced; `None`, with `plan` as it was,
    /// when the change moves an iptables plan into or out of large cluster mode.
    fn replan_dirty(&self, plan: &mut B::Plan) -> Option<Undo<B>> {
        let before = plan.endpoint_count();
        let was_large = self.is_large(before);
        let ctx = self.ctx(was_large);
        let mut undo: Undo<B> = Vec::new();
        let (mut gone, mut added) = (0, 0);
        for key in &self.dirty {
            let start = (key.clone(), String::new(), super::model::Protocol::Tcp);
            let stale: Vec<_> = plan
                .ports()
                .range(start..)
                .take_while(|(k, _)| &k.0 == key)
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                let old = plan.ports_mut().remove(&k);
                gone += old.as_ref().map_or(0, |p| p.info().endpoints.len());
                undo.push((k, old));
            }
            let Some(svc) = self.services.get(key) else {
                continue;
            };
            for info in service_ports(svc, &self.slices_of(key), &self.node) {
                let k = port_key(&info);
                added += info.endpoints.len();
                let port = Arc::new(self.backend.plan_port(info, &ctx));
                let old = plan.ports_mut().insert(k.clone(), port);
                undo.push((k, old));
            }
        }
        let switched = self.is_large(before + added - gone.min(before + added)) != was_large;
        if switched && self.backend.uses_large_cluster_mode() {
            revert(plan, undo);
            return None;
        }
        Some(undo)
    }

    /// What `plan` was before `undo`: whole, or only the replaced ports (see
    /// [`Backend::partial_reads_whole_previous`]).
    fn previous(&self, plan: &B::Plan, undo: &Undo<B>) -> B::Plan {
        if self.backend.partial_reads_whole_previous() {
            let mut previous = plan.clone();
            revert(&mut previous, undo.clone());
            return previous;
        }
        let mut previous = self.backend.empty_plan(&self.opts);
        for (k, old) in undo {
            if let Some(old) = old {
                previous
                    .ports_mut()
                    .entry(k.clone())
                    .or_insert_with(|| old.clone());
            }
        }
        previous
    }

    /// Program the current state now (even before the sources synced):
    /// one restore, then conntrack cleanup.
    pub fn sync(&mut self, now: Instant) -> Result<SyncReport> {
        let started = Instant::now();
        let full_due = self
            .last_full
            .is_none_or(|t| now >= t + self.cfg.full_resync_period);
        let partial = match self.applied.take() {
            Some(mut plan) if !(self.needs_full || full_due) => {
                match self.replan_dirty(&mut plan) {
                    Some(undo) => Some((plan, undo)),
                    None => {
                        self.applied = Some(plan);
                        None
                    }
                }
            }
            applied => {
                self.applied = applied;
                None
            }
        };
        let full = partial.is_none();
        let prepared = match partial {
            Some((plan, undo)) => {
                let previous = self.previous(&plan, &undo);
                let payload = self.backend.partial(&previous, &plan, &self.dirty);
                Ok((payload, plan, Some((previous, undo))))
            }
            None => self
                .prepare_full()
                .map(|(payload, plan)| (payload, plan, None)),
        };
        let restore_started = Instant::now();
        let result =
            prepared.and_then(|(payload, plan, undo)| match self.backend.apply(&payload) {
                Ok(()) => Ok((payload, plan, undo)),
                Err(e) => {
                    if let Some((_, undo)) = undo {
                        let mut plan = plan;
                        revert(&mut plan, undo);
                        self.applied = Some(plan);
                    }
                    Err(e)
                }
            });
        let restore = restore_started.elapsed();
        self.last_sync = Some(now);
        let (payload, plan, undo) = match result {
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
        let previous = match undo {
            Some((previous, _)) => Some(previous),
            None => self.applied.take(),
        };
        self.clean_conntrack(previous.as_ref(), &plan);
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

    /// Deletes the UDP flows of endpoints `plan` dropped (`previous`: the
    /// plan before, or only its replaced ports; `None` before the first sync).
    fn clean_conntrack(&mut self, previous: Option<&B::Plan>, plan: &B::Plan) {
        let empty;
        let previous = match previous {
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
            let deadline = self.next_deadline(now.into_std());
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.apply_event(ev),
                    None => return self,
                },
                () = until(deadline) => {
                    let _ = self.sync(tokio::time::Instant::now().into_std());
                    after_sync(&self);
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::NoConntrack;
    use crate::iptables::Dataplane;

    /// Counts payloads; `save` shows the rules a previous run left.
    #[derive(Default)]
    struct Recorder {
        payloads: Vec<String>,
    }

    impl Dataplane for Recorder {
        fn save(&mut self) -> Result<String> {
            Ok("*nat\n:TABBY-SERVICES - [0:0]\n:TABBY-SVC-OLD - [0:0]\nCOMMIT\n".into())
        }
        fn restore(&mut self, payload: &str) -> Result<()> {
            self.payloads.push(payload.to_string());
            Ok(())
        }
    }

    fn waiting_proxier() -> Proxier<Recorder, NoConntrack> {
        Proxier::new(
            NodeFacts::default(),
            ProxyOptions::default(),
            SyncConfig::default(),
            Recorder::default(),
            NoConntrack::default(),
        )
        .wait_for([SourceId::Services, SourceId::EndpointSlices, SourceId::Node])
    }

    fn service() -> ProxyEvent {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]}
        }))
        .unwrap();
        ProxyEvent::ServiceUpsert(Box::new(svc))
    }

    #[test]
    fn the_first_sync_waits_for_every_source_and_is_due_right_after_the_last() {
        let mut p = waiting_proxier();
        let t0 = Instant::now();
        for ev in [
            service(),
            ProxyEvent::SourceSynced(SourceId::Services),
            ProxyEvent::SourceSynced(SourceId::EndpointSlices),
            ProxyEvent::FullSync,
        ] {
            p.apply_event(ev);
            assert_eq!(p.next_deadline(t0), None, "a source is still missing");
            assert!(p.sync_if_due(t0 + Duration::from_secs(60)).is_none());
        }
        p.apply_event(ProxyEvent::Node(Box::default()));
        assert!(p.sources_synced());
        assert_eq!(p.next_deadline(t0), Some(t0), "due at once");
        let report = p.sync_if_due(t0).unwrap().unwrap();
        assert!(report.full);
        assert!(
            report.payload.text.contains("10.96.0.10/32"),
            "the first sync holds what the sources delivered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_run_loop_leaves_the_old_rules_alone_until_the_sources_synced() {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(waiting_proxier().run(rx));
        tx.send(service()).await.unwrap();
        tx.send(ProxyEvent::SourceSynced(SourceId::Services))
            .await
            .unwrap();
        tx.send(ProxyEvent::SourceSynced(SourceId::EndpointSlices))
            .await
            .unwrap();
        // Far beyond max_sync_period: still no sync without the node's facts.
        tokio::time::sleep(Duration::from_secs(120)).await;
        tx.send(ProxyEvent::Node(Box::default())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(tx);
        let mut p = task.await.unwrap();
        let payloads = &p.dataplane_mut().payloads;
        assert_eq!(payloads.len(), 1, "one sync, right after the last source");
        assert!(payloads[0].contains("10.96.0.10/32"), "{}", payloads[0]);
    }
}
