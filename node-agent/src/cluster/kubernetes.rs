//! `cluster = "kubernetes"`: the cluster view from kube-runtime reflectors
//! on Nodes and the Tabby CRDs the view needs ([`WATCHED`]).
//!
//! ```text
//!  reflector(watcher(Api<Node>))                 ─┐ default_backoff,
//!  reflector(watcher(Api<IPPool>))                ├ managedFields stripped ──Note (mpsc)──▶ assembler ──watch<Watched>──▶ agent loop
//!  ... IPAMBlock, BlockAffinity, BGPConfiguration,│                                           │ reads every Store,
//!      BGPPeer, BGPFilter                        ─┘                                           └ view_of (the datastore's read path)
//! ```
//!
//! Each reflector applies an event to its [`Store`] before it passes the
//! event on, so when the assembler hears of a change the stores already
//! hold it; it drains what else is queued and builds one view. Until every
//! kind finished its first list it publishes [`Watched::Pending`] (the
//! agent is not ready). A watch that breaks (apiserver restart, dropped
//! connection) is resumed by the watcher with its default backoff, from
//! the last resourceVersion or by a new list; a re-list replaces the store
//! at its end, so objects deleted meanwhile disappear. Every task ends
//! once the agent drops its receiver.
//!
//! [`WATCHED`]: super::objects::WATCHED

use std::fmt::Debug;
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tabby_errors::chain;
use tabby_ipam::kubernetes::crd::Kind;
use tabby_ipam::kubernetes::objects::selector;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::objects::{view_or_log, watched_kinds};
use super::{ViewRx, Watched};
use crate::error::{AgentError, Result};

/// The watches of one cluster (or of one test scope in it).
#[derive(Clone)]
pub struct ClusterWatch {
    client: Client,
    scope: Option<String>,
}

impl Debug for ClusterWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterWatch")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A reflector's word to the assembler.
#[derive(Debug, Clone, Copy)]
enum Note {
    /// Kind `n` finished a (re-)list: its store was replaced.
    Listed(usize),
    /// An object of some kind changed.
    Changed,
}

/// The stores the view is built from.
struct Stores {
    nodes: Store<Node>,
    crds: Vec<(&'static Kind, Store<DynamicObject>)>,
    scope: Option<String>,
}

impl ClusterWatch {
    /// Watches on `client`; `scope` as the datastore's (tests).
    pub fn new(client: Client, scope: Option<String>) -> Self {
        Self { client, scope }
    }

    /// Connects with `kubeconfig` (else the inferred configuration).
    pub async fn connect(kubeconfig: Option<&Path>, scope: Option<String>) -> Result<Self> {
        let client = tabby_proxy::cluster_state::kubernetes::client(kubeconfig)
            .await
            .map_err(AgentError::KubeWatch)?;
        Ok(Self::new(client, scope))
    }

    /// Starts every reflector and the assembler on the current runtime.
    pub fn start(self) -> ViewRx {
        let kinds = watched_kinds();
        let mut names: Vec<String> = vec!["Node".into()];
        let (notes_tx, notes) = mpsc::channel(64);
        let config = watcher::Config::default().labels(&selector(self.scope.as_deref()));
        let writer = reflector::store::Writer::<Node>::default();
        let nodes = writer.as_reader();
        let api: Api<Node> = Api::all(self.client.clone());
        tokio::spawn(reflect(
            api,
            config.clone(),
            writer,
            (0, "Node".to_string()),
            notes_tx.clone(),
        ));
        let mut crds = Vec::new();
        for (i, kind) in kinds.into_iter().enumerate() {
            let resource: ApiResource = (kind.resource)();
            names.push(resource.kind.clone());
            let writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
            crds.push((kind, writer.as_reader()));
            let api = Api::<DynamicObject>::all_with(self.client.clone(), &resource);
            tokio::spawn(reflect(
                api,
                config.clone(),
                writer,
                (i + 1, resource.kind.clone()),
                notes_tx.clone(),
            ));
        }
        info!(
            scope = self.scope.as_deref().unwrap_or("(cluster)"),
            kinds = ?names,
            "watching the cluster view on the Kubernetes API"
        );
        let stores = Stores {
            nodes,
            crds,
            scope: self.scope,
        };
        let (tx, rx) = watch::channel(Watched::Pending(names.clone()));
        tokio::spawn(assemble(stores, names, notes, tx));
        rx
    }
}

/// Runs one reflector until the assembler is gone.
async fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    (index, kind): (usize, String),
    notes: mpsc::Sender<Note>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|obj: &mut K| obj.meta_mut().managed_fields = None);
    let mut stream = std::pin::pin!(reflector::reflector(writer, stream));
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = notes.closed() => return,
        };
        let note = match next {
            Some(Ok(watcher::Event::InitDone)) => Note::Listed(index),
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
            Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => Note::Changed,
            Some(Err(error)) => {
                warn!(%kind, error = %chain(&error), "watch failed; retrying with backoff");
                continue;
            }
            None => return warn!(%kind, "watch stream ended"),
        };
        if notes.send(note).await.is_err() {
            return;
        }
    }
}

/// Builds a view after every batch of notes, once every kind was listed.
async fn assemble(
    stores: Stores,
    names: Vec<String>,
    mut notes: mpsc::Receiver<Note>,
    out: watch::Sender<Watched>,
) {
    let mut listed = vec![false; names.len()];
    let mut synced = false;
    while let Some(first) = notes.recv().await {
        let mut batch = vec![first];
        while let Ok(note) = notes.try_recv() {
            batch.push(note);
        }
        for note in &batch {
            if let Note::Listed(i) = note {
                listed[*i] = true;
            }
        }
        if !synced {
            let pending: Vec<String> = (names.iter().zip(&listed))
                .filter(|(_, done)| !**done)
                .map(|(name, _)| name.clone())
                .collect();
            if !pending.is_empty() {
                debug!(?pending, "waiting for the first list");
                out.send_replace(Watched::Pending(pending));
                continue;
            }
        }
        let Some(view) = stores.view() else { continue };
        if !synced {
            synced = true;
            info!(
                nodes = view.snapshot.nodes.len(),
                pools = view.snapshot.pools.len(),
                blocks = view.snapshot.blocks.len(),
                peers = view.peers.len(),
                "every kind listed: the cluster view is synced"
            );
        }
        if out.send(Watched::Synced(Arc::new(view))).is_err() {
            return;
        }
    }
}

impl Stores {
    fn view(&self) -> Option<crate::desired::ClusterView> {
        let nodes = self.nodes.state();
        let crds: Vec<(&'static Kind, Vec<Arc<DynamicObject>>)> = self
            .crds
            .iter()
            .map(|(kind, store)| (*kind, store.state()))
            .collect();
        let objects = crds
            .iter()
            .flat_map(|(kind, objects)| objects.iter().map(|o| (*kind, o.as_ref())));
        view_or_log(
            nodes.iter().map(Arc::as_ref),
            objects,
            self.scope.as_deref(),
        )
    }
}
