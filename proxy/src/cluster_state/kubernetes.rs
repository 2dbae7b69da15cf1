//! The Kubernetes source: Services and EndpointSlices watched on the API
//! server through kube-runtime's watcher, as the same [`ProxyEvent`]s as the
//! file source.
//!
//! ```text
//!  watcher(Api<Service>)       ──default_backoff, managedFields stripped──▶ Mirror<Service>       ─┐
//!  watcher(Api<EndpointSlice>) ──default_backoff, managedFields stripped──▶ Mirror<EndpointSlice> ─┤
//!                                                                        mpsc<ProxyEvent> ◀────────┘
//! ```
//!
//! A watch that breaks (the apiserver restarts, the connection drops) is
//! resumed by the watcher: from the last resourceVersion when it can, else
//! by a new list. Each [`Mirror`] keeps what it sent by key, so an object
//! missing from a re-list is sent as a delete at its `InitDone`, and an
//! object the re-list shows unchanged (same resourceVersion) is not sent
//! again. The first `InitDone` of a kind sends [`ProxyEvent::SourceSynced`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::NamespaceResourceScope;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, Config, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::ClusterState;
use crate::model::ServiceKey;
use crate::proxier::SourceId;
use crate::ProxyEvent;
use tabby_errors::chain;

/// Why the Kubernetes source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No configuration was found ($KUBECONFIG, ~/.kube/config, in-cluster).
    #[error(
        "infer the Kubernetes client configuration ($KUBECONFIG, ~/.kube/config or in-cluster)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Services and EndpointSlices from the Kubernetes API, in every namespace
/// or in one ([`KubeClusterState::namespaced`]).
#[derive(Clone)]
pub struct KubeClusterState {
    client: Client,
    namespace: Option<String>,
}

impl Debug for KubeClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClusterState")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl KubeClusterState {
    /// A source on `client`, for every namespace.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            namespace: None,
        }
    }

    /// Connects with `kubeconfig`, or without one with the inferred
    /// configuration ([`client`]). Call it inside a tokio runtime.
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self, ConnectError> {
        Ok(Self::new(client(kubeconfig).await?))
    }

    /// Watches only `namespace` (tests sharing one apiserver).
    pub fn namespaced(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    fn api<K: Kind>(&self) -> Api<K> {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }
}

/// A client for `kubeconfig`, or without one for the inferred
/// configuration (`$KUBECONFIG`, `~/.kube/config`, then the in-cluster
/// ServiceAccount): what every watch of `tabby-node` connects with. Call it
/// inside a tokio runtime.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ConnectError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| ConnectError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => Config::infer().await.map_err(ConnectError::Infer)?,
    };
    Client::try_from(config).map_err(ConnectError::Client)
}

impl ClusterState for KubeClusterState {
    async fn run(self, tx: mpsc::Sender<ProxyEvent>) {
        info!(
            namespace = self.namespace.as_deref().unwrap_or("(all)"),
            "watching Services and EndpointSlices on the Kubernetes API"
        );
        tokio::join!(
            watch(self.api::<Service>(), tx.clone()),
            watch(self.api::<EndpointSlice>(), tx),
        );
    }
}

/// Watches one kind and sends its events until `tx` closes.
async fn watch<K: Kind>(api: Api<K>, tx: mpsc::Sender<ProxyEvent>) {
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|obj: &mut K| obj.meta_mut().managed_fields = None);
    let mut stream = std::pin::pin!(stream);
    let mut mirror = Mirror::<K>::default();
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = tx.closed() => return,
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                warn!(kind = K::NAME, error = %chain(&error), "watch failed; retrying with backoff");
                continue;
            }
            None => {
                warn!(kind = K::NAME, "watch stream ended; the source stops");
                return;
            }
        };
        for ev in mirror.on(event) {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

/// A kind the source watches: how its objects become [`ProxyEvent`]s.
pub(crate) trait Kind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// For logs.
    const NAME: &'static str;
    /// What its first complete list marks synced.
    const SOURCE: SourceId;
    /// The object was added or changed.
    fn upsert(self) -> ProxyEvent;
    /// The object `namespace/name` is gone.
    fn delete(namespace: String, name: String) -> ProxyEvent;
}

impl Kind for Service {
    const NAME: &'static str = "Service";
    const SOURCE: SourceId = SourceId::Services;
    fn upsert(self) -> ProxyEvent {
        ProxyEvent::ServiceUpsert(Box::new(self))
    }
    fn delete(namespace: String, name: String) -> ProxyEvent {
        ProxyEvent::ServiceDelete(ServiceKey { namespace, name })
    }
}

impl Kind for EndpointSlice {
    const NAME: &'static str = "EndpointSlice";
    const SOURCE: SourceId = SourceId::EndpointSlices;
    fn upsert(self) -> ProxyEvent {
        ProxyEvent::SliceUpsert(Box::new(self))
    }
    fn delete(namespace: String, name: String) -> ProxyEvent {
        ProxyEvent::SliceDelete(namespace, name)
    }
}

/// Namespace and name.
type Key = (String, String);

fn key_of<K: Kind>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What one kind's watcher has sent: each object's resourceVersion by key,
/// and during a (re-)list the keys listed so far.
#[derive(Debug)]
pub(crate) struct Mirror<K> {
    sent: BTreeMap<Key, Option<String>>,
    listing: Option<BTreeSet<Key>>,
    synced: bool,
    kind: PhantomData<K>,
}

impl<K> Default for Mirror<K> {
    fn default() -> Self {
        Self {
            sent: BTreeMap::new(),
            listing: None,
            synced: false,
            kind: PhantomData,
        }
    }
}

impl<K: Kind> Mirror<K> {
    /// The events that one watcher event brings.
    pub(crate) fn on(&mut self, event: watcher::Event<K>) -> Vec<ProxyEvent> {
        match event {
            watcher::Event::Init => {
                debug!(kind = K::NAME, known = self.sent.len(), "listing");
                self.listing = Some(BTreeSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                let key = key_of(&obj);
                if let Some(listing) = &mut self.listing {
                    listing.insert(key.clone());
                }
                let version = obj.resource_version();
                match self.sent.insert(key, version.clone()) {
                    Some(old) if old.is_some() && old == version => Vec::new(),
                    _ => vec![obj.upsert()],
                }
            }
            watcher::Event::Delete(obj) => {
                let key = key_of(&obj);
                match self.sent.remove(&key) {
                    Some(_) => vec![K::delete(key.0, key.1)],
                    None => Vec::new(),
                }
            }
            watcher::Event::InitDone => self.init_done(),
        }
    }

    /// End of a (re-)list: what it did not show is gone; the first marks the kind synced.
    fn init_done(&mut self) -> Vec<ProxyEvent> {
        let listed = self.listing.take().unwrap_or_default();
        let gone: Vec<Key> = self
            .sent
            .keys()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        let mut events = Vec::with_capacity(gone.len() + 1);
        for key in gone {
            self.sent.remove(&key);
            events.push(K::delete(key.0, key.1));
        }
        if !self.synced {
            self.synced = true;
            info!(
                kind = K::NAME,
                objects = self.sent.len(),
                "initial list done"
            );
            events.push(ProxyEvent::SourceSynced(K::SOURCE));
        } else {
            debug!(
                kind = K::NAME,
                objects = self.sent.len(),
                deleted = events.len(),
                "re-list done"
            );
        }
        events
    }
}

#[cfg(test)]
mod tests;
