//! The `kubernetes` datastore backend: documents as custom resources
//! (`crd.tabby.dev/v1`, see [`crd`]) and node facts as annotations on the
//! Kubernetes Node ([`nodes`]), through `kube`.
//!
//! - Revision: `metadata.resourceVersion`. update is a PUT carrying it, so a
//!   stale writer gets HTTP 409 → [`DatastoreError::Conflict`] and nothing is
//!   overwritten; delete carries it as a DeleteOptions precondition, so it
//!   is compare-and-delete (a resourceVersion is an etcd revision, never
//!   reused, also not by an object deleted and created again, so it pins
//!   the object's identity as a uid would).
//! - Names: [`names`] maps keys to object names; the key is also stored in
//!   the annotation `tabby.dev/key`, so list and get round-trip.
//! - list(prefix): one LIST per kind the prefix can reach; the affinities
//!   of one node (`affinities/<node>/`) by the label `tabby.dev/node`.
//! - Errors: 409 → Conflict, 404 → NotFound / `None` as the trait says,
//!   400/422 (the schema refused the document) → Corrupt, anything else
//!   (connection, TLS, 401/403, timeouts) → Unavailable with the chain.
//! - Scope: an optional `scope` (for tests that share one apiserver) puts
//!   every object under the label `tabby.dev/scope=<scope>` and its name
//!   under `<scope>.`; a datastore without scope sees only unscoped objects.
//! - Pods: [`KubeDatastore::pod_annotations`] for the CNI plugin.
//!
//! The client runs on a runtime the backend owns ([`bridge`]): every
//! method blocks the calling thread, from any thread, in or out of a
//! tokio runtime. Opening does not contact the apiserver.

mod bridge;
pub mod crd;
pub mod names;
pub mod nodes;
pub mod objects;
mod pods;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::datastore::{Datastore, DatastoreError, Entry, Result, Revision};
use crate::file::escape;
use crate::lock::{NodeLock, HOST_LOCK_DIR};
use crate::store::NODES;
use bridge::Bridge;
use crd::{kind_of, Kind, KINDS};
use names::{label_value, object_name};

/// The annotation holding an object's datastore key.
pub const KEY_ANNOTATION: &str = "tabby.dev/key";
/// The label naming the node an affinity (or a block) belongs to.
pub const NODE_LABEL: &str = "tabby.dev/node";
/// The label of a test scope.
pub const SCOPE_LABEL: &str = "tabby.dev/scope";
/// How long one datastore operation may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The longest scope.
const MAX_SCOPE: usize = 20;

/// How to reach the API (`{"type":"kubernetes", ...}` in a config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: `$KUBECONFIG`, `~/.kube/config`, or the
    /// in-cluster ServiceAccount.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Confine the datastore to one scope (tests sharing one apiserver):
    /// 1-20 lowercase letters, digits and `-`.
    #[serde(default)]
    pub scope: Option<String>,
}

/// The Kubernetes backend; cheap to share behind an `Arc`.
pub struct KubeDatastore {
    inner: Arc<Inner>,
    bridge: Bridge,
}

struct Inner {
    client: Client,
    scope: Option<String>,
    url: String,
    requests: Arc<AtomicU64>,
}

impl std::fmt::Debug for KubeDatastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl KubeDatastore {
    /// Builds the client (reads the kubeconfig; no request is made yet).
    pub fn open(options: &KubeOptions) -> Result<Self> {
        let location = options.kubeconfig.as_ref().map_or_else(
            || "kubernetes (inferred config)".into(),
            |p| p.display().to_string(),
        );
        if let Some(scope) = &options.scope {
            check_scope(scope)?;
        }
        let bridge = Bridge::start().map_err(|e| unavailable(&location, e))?;
        let requests = Arc::new(AtomicU64::new(0));
        let connect = connect(
            options.kubeconfig.clone(),
            location.clone(),
            requests.clone(),
        );
        let (client, url) = bridge
            .run(connect)
            .ok_or_else(|| unavailable(&location, io::Error::other("the client thread died")))??;
        let inner = Arc::new(Inner {
            client,
            scope: options.scope.clone(),
            url,
            requests,
        });
        Ok(Self { inner, bridge })
    }

    /// HTTP requests sent so far (for the benchmark's requests per ADD).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The scope, if any.
    pub fn scope(&self) -> Option<&str> {
        self.inner.scope.as_deref()
    }

    /// Creates or updates every CRD (server-side apply) and waits until the
    /// apiserver serves them (`Established`). Needs rights on CRDs.
    pub fn install_crds(&self) -> Result<()> {
        self.run(|inner| async move { inner.install_crds().await })
    }

    /// Deletes every object of this datastore's scope (a test's cleanup),
    /// including the Nodes it created; refuses without a scope.
    pub fn purge_scope(&self) -> Result<()> {
        self.run(|inner| async move { inner.purge_scope().await })
    }

    /// Runs one operation on the bridge, with the timeout.
    fn run<T, F>(&self, op: impl FnOnce(Arc<Inner>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let url = self.inner.url.clone();
        let fut = op(self.inner.clone());
        let timed = async move {
            match tokio::time::timeout(TIMEOUT, fut).await {
                Ok(result) => result,
                Err(_) => Err(unavailable(
                    &url,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {TIMEOUT:?}"),
                    ),
                )),
            }
        };
        self.bridge.run(timed).unwrap_or_else(|| {
            Err(unavailable(
                &self.inner.url,
                io::Error::other("the Kubernetes client thread is gone"),
            ))
        })
    }
}

impl Datastore for KubeDatastore {
    fn get(&self, key: &str) -> Result<Option<Entry>> {
        let key = key.to_string();
        self.run(|inner| async move { inner.get(&key).await })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let prefix = prefix.to_string();
        self.run(|inner| async move { inner.list(&prefix).await })
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.run(|inner| async move { inner.create(&key, &value).await })
    }

    fn update(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        let (key, value, expected) = (key.to_string(), value.to_vec(), expected.clone());
        self.run(|inner| async move { inner.update(&key, &value, &expected).await })
    }

    fn delete(&self, key: &str, expected: &Revision) -> Result<()> {
        let (key, expected) = (key.to_string(), expected.clone());
        self.run(|inner| async move { inner.delete(&key, &expected).await })
    }

    fn ping(&self) -> Result<()> {
        self.run(|inner| async move { inner.ping().await })
    }

    fn describe(&self) -> String {
        match &self.inner.scope {
            Some(scope) => format!("kubernetes:{} (scope {scope})", self.inner.url),
            None => format!("kubernetes:{}", self.inner.url),
        }
    }

    /// A host-local flock in [`HOST_LOCK_DIR`] (see [`crate::lock`]: every
    /// writer of one node's attachments runs on that node), named by scope
    /// and node; no request to the apiserver.
    fn node_lock(&self, node: &str) -> Result<NodeLock> {
        let scope = self.inner.scope.as_deref().unwrap_or("cluster");
        let name = format!("ipam-kubernetes-{scope}-{}.lock", escape(node));
        NodeLock::host(&Path::new(HOST_LOCK_DIR).join(name))
    }
}

/// Reads the kubeconfig and builds a client that counts its requests.
async fn connect(
    kubeconfig: Option<PathBuf>,
    location: String,
    requests: Arc<AtomicU64>,
) -> Result<(Client, String)> {
    let config = match &kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| unavailable(&location, e))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| unavailable(&location, e))?
        }
        None => Config::infer()
            .await
            .map_err(|e| unavailable(&location, e))?,
    };
    let url = config.cluster_url.to_string();
    let count =
        tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            requests.fetch_add(1, Ordering::Relaxed);
            request
        });
    let client = ClientBuilder::try_from(config)
        .map_err(|e| unavailable(&location, e))?
        .with_layer(&count)
        .build();
    Ok((client, url.trim_end_matches('/').to_string()))
}

fn check_scope(scope: &str) -> Result<()> {
    let ok = (1..=MAX_SCOPE).contains(&scope.len())
        && !scope.contains('.')
        && names::is_dns_subdomain(scope)
        && names::is_label_value(scope);
    if ok {
        return Ok(());
    }
    Err(DatastoreError::Corrupt {
        key: format!("scope {scope}"),
        reason: format!("a scope is 1-{MAX_SCOPE} lowercase letters, digits and '-'"),
    })
}

fn unavailable(
    location: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> DatastoreError {
    DatastoreError::Unavailable {
        location: location.to_string(),
        source: io::Error::other(e),
    }
}

fn corrupt(key: &str, reason: impl Into<String>) -> DatastoreError {
    DatastoreError::Corrupt {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// What a 404 means for the operation that got it.
#[derive(Clone, Copy)]
enum Missing {
    /// The trait's `NotFound` (delete, node update).
    NotFound,
    /// A vanished document is a lost race (update).
    Conflict,
}

impl Inner {
    fn api(&self, kind: &Kind) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &(kind.resource)())
    }

    fn node_api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Maps an API error on `key` to the datastore's error.
    fn error(&self, key: &str, e: kube::Error, missing: Missing) -> DatastoreError {
        let key = key.to_string();
        if let kube::Error::Api(status) = &e {
            match (status.code, missing) {
                (409, _) | (404, Missing::Conflict) => return DatastoreError::Conflict { key },
                (404, Missing::NotFound) => return DatastoreError::NotFound { key },
                (400 | 422, _) => return corrupt(&key, status.message.clone()),
                _ => {}
            }
        }
        unavailable(&self.url, e)
    }

    /// The name of an object under this datastore's scope.
    fn scoped(&self, name: &str) -> String {
        match &self.scope {
            Some(scope) => format!("{scope}.{name}"),
            None => name.to_string(),
        }
    }

    /// The label selector of every list: this scope, or no scope.
    fn scope_selector(&self) -> String {
        objects::selector(self.scope.as_deref())
    }

    fn kind_of<'k>(&self, key: &'k str) -> Result<(&'static Kind, &'k str)> {
        kind_of(key).ok_or_else(|| corrupt(key, "no Kubernetes resource stores this key"))
    }

    /// The object for `key` holding `spec` (at `revision` for a replace).
    fn object(
        &self,
        kind: &Kind,
        key: &str,
        rest: &str,
        spec: Value,
        revision: Option<&Revision>,
    ) -> DynamicObject {
        let mut labels = BTreeMap::new();
        if let Some(scope) = &self.scope {
            labels.insert(SCOPE_LABEL.to_string(), scope.clone());
        }
        if let Some(node) = kind.node_of.and_then(|node_of| node_of(&spec)) {
            labels.insert(NODE_LABEL.to_string(), label_value(&node));
        }
        let resource = (kind.resource)();
        let mut object = DynamicObject::new(
            &object_name(kind.naming, rest, self.scope.as_deref()),
            &resource,
        )
        .data(json!({ "spec": spec }));
        object.metadata = ObjectMeta {
            name: object.metadata.name.take(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                KEY_ANNOTATION.to_string(),
                key.to_string(),
            )])),
            resource_version: revision.map(|r| r.0.clone()),
            ..Default::default()
        };
        object
    }

    /// The key an object stores ([`objects::key_of`]).
    fn key_of(&self, kind: &Kind, object: &DynamicObject) -> Option<String> {
        objects::key_of(kind, object, self.scope.as_deref())
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>> {
        if let Some(name) = key.strip_prefix(NODES) {
            return self.get_node(key, name).await;
        }
        let (kind, rest) = self.kind_of(key)?;
        let name = object_name(kind.naming, rest, self.scope.as_deref());
        let found = self
            .api(kind)
            .get_opt(&name)
            .await
            .map_err(|e| self.error(key, e, Missing::NotFound))?;
        let Some(object) = found else {
            return Ok(None);
        };
        match self.key_of(kind, &object) {
            Some(stored) if stored != key => Err(corrupt(
                key,
                format!("object {name} holds {stored}: two keys map to one name"),
            )),
            _ => objects::entry(key.to_string(), &object).map(Some),
        }
    }

    /// The selector of one kind's LIST for `prefix`.
    fn selector(&self, kind: &Kind, prefix: &str) -> String {
        let mut selector = self.scope_selector();
        let node = prefix
            .strip_prefix(kind.key)
            .and_then(|rest| rest.split_once('/'))
            .map(|(node, _)| node);
        if let (Some(node), Some(_)) = (node, kind.node_of) {
            selector.push_str(&format!(",{NODE_LABEL}={}", label_value(node)));
        }
        selector
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for kind in KINDS.iter().filter(|kind| kind.may_match(prefix)) {
            let params = ListParams::default().labels(&self.selector(kind, prefix));
            let list = self
                .api(kind)
                .list(&params)
                .await
                .map_err(|e| self.error(prefix, e, Missing::NotFound))?;
            for object in list.items {
                let Some(key) = self.key_of(kind, &object) else {
                    tracing::warn!(name = ?object.metadata.name, kind = %kind.kind_name(), "skipping an object without a tabby.dev/key annotation");
                    continue;
                };
                if key.starts_with(prefix) {
                    entries.push(objects::entry(key, &object)?);
                }
            }
        }
        if NODES.starts_with(prefix) || prefix.starts_with(NODES) {
            entries.extend(self.list_nodes(prefix).await?);
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        if let Some(name) = key.strip_prefix(NODES) {
            return self.create_node(key, name, value).await;
        }
        let (kind, rest) = self.kind_of(key)?;
        let spec = (kind.to_spec)(value).map_err(|reason| corrupt(key, reason))?;
        let object = self.object(kind, key, rest, spec, None);
        let created = self
            .api(kind)
            .create(&PostParams::default(), &object)
            .await
            .map_err(|e| self.error(key, e, Missing::Conflict))?;
        revision_of(key, &created.metadata)
    }

    async fn update(&self, key: &str, value: &[u8], expected: &Revision) -> Result<Revision> {
        if let Some(name) = key.strip_prefix(NODES) {
            return self.update_node(key, name, value, expected).await;
        }
        let (kind, rest) = self.kind_of(key)?;
        let spec = (kind.to_spec)(value).map_err(|reason| corrupt(key, reason))?;
        let object = self.object(kind, key, rest, spec, Some(expected));
        let name = object.metadata.name.clone().unwrap_or_default();
        let replaced = self
            .api(kind)
            .replace(&name, &PostParams::default(), &object)
            .await
            .map_err(|e| self.error(key, e, Missing::Conflict))?;
        revision_of(key, &replaced.metadata)
    }

    async fn delete(&self, key: &str, expected: &Revision) -> Result<()> {
        if let Some(name) = key.strip_prefix(NODES) {
            return self.delete_node(key, name, expected).await;
        }
        let (kind, rest) = self.kind_of(key)?;
        let name = object_name(kind.naming, rest, self.scope.as_deref());
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(expected.0.clone()),
                uid: None,
            }),
            ..Default::default()
        };
        self.api(kind)
            .delete(&name, &params)
            .await
            .map_err(|e| self.error(key, e, Missing::NotFound))?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        let pools = &KINDS[0];
        self.api(pools)
            .list_metadata(&ListParams::default().limit(1))
            .await
            .map_err(|e| unavailable(&self.url, e))?;
        Ok(())
    }
}

impl Inner {
    /// The Node object's name for a node document's name.
    fn node_name(&self, key: &str, name: &str) -> Result<String> {
        let scoped = self.scoped(name);
        if !names::is_dns_subdomain(&scoped) {
            return Err(corrupt(
                key,
                format!("{name} is not a valid Kubernetes node name"),
            ));
        }
        Ok(scoped)
    }

    /// The document `nodes/<name>` of `node`, if registered.
    fn node_entry(&self, name: &str, node: &Node) -> Result<Option<Entry>> {
        match objects::node_doc(node, self.scope.as_deref()) {
            Some((doc_name, doc)) if doc_name == name => {
                objects::node_entry(name, &doc, node).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn get_node(&self, key: &str, name: &str) -> Result<Option<Entry>> {
        let node_name = self.node_name(key, name)?;
        let found = self
            .node_api()
            .get_opt(&node_name)
            .await
            .map_err(|e| self.error(key, e, Missing::NotFound))?;
        match found {
            Some(node) => self.node_entry(name, &node),
            None => Ok(None),
        }
    }

    async fn list_nodes(&self, prefix: &str) -> Result<Vec<Entry>> {
        let params = ListParams::default().labels(&self.scope_selector());
        let list = self
            .node_api()
            .list(&params)
            .await
            .map_err(|e| self.error(prefix, e, Missing::NotFound))?;
        let mut entries = Vec::new();
        for node in &list.items {
            let Some(object_name) = node.metadata.name.as_deref() else {
                continue;
            };
            let Some(name) = objects::unscoped(object_name, self.scope.as_deref()) else {
                continue;
            };
            let key = format!("{NODES}{name}");
            if key.starts_with(prefix) {
                entries.extend(self.node_entry(name, node)?);
            }
        }
        Ok(entries)
    }

    async fn create_node(&self, key: &str, name: &str, value: &[u8]) -> Result<Revision> {
        let write = nodes::write_of(name, value).map_err(|reason| corrupt(key, reason))?;
        let node_name = self.node_name(key, name)?;
        let api = self.node_api();
        let existing = api
            .get_opt(&node_name)
            .await
            .map_err(|e| self.error(key, e, Missing::NotFound))?;
        let written = match existing {
            Some(node) if self.node_entry(name, &node)?.is_some() => {
                return Err(DatastoreError::Conflict {
                    key: key.to_string(),
                })
            }
            Some(node) => {
                let revision = revision_of(key, &node.metadata)?;
                let patch = nodes::annotation_patch(&write, &revision.0);
                nodes::patch(&api, &node_name, patch).await
            }
            None => {
                let scope = self
                    .scope
                    .iter()
                    .map(|s| (SCOPE_LABEL.to_string(), s.clone()));
                nodes::create(&api, &node_name, &write, scope.collect()).await
            }
        };
        let node = written.map_err(|e| self.error(key, e, Missing::Conflict))?;
        revision_of(key, &node.metadata)
    }

    async fn update_node(
        &self,
        key: &str,
        name: &str,
        value: &[u8],
        expected: &Revision,
    ) -> Result<Revision> {
        let write = nodes::write_of(name, value).map_err(|reason| corrupt(key, reason))?;
        let node_name = self.node_name(key, name)?;
        let patch = nodes::annotation_patch(&write, &expected.0);
        let node = nodes::patch(&self.node_api(), &node_name, patch)
            .await
            .map_err(|e| self.error(key, e, Missing::NotFound))?;
        revision_of(key, &node.metadata)
    }

    async fn delete_node(&self, key: &str, name: &str, expected: &Revision) -> Result<()> {
        let node_name = self.node_name(key, name)?;
        let patch = nodes::unregister_patch(&expected.0);
        nodes::patch(&self.node_api(), &node_name, patch)
            .await
            .map_err(|e| self.error(key, e, Missing::NotFound))?;
        Ok(())
    }

    async fn install_crds(&self) -> Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let params = PatchParams::apply("tabby").force();
        for crd in crd::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &params, &Patch::Apply(&crd))
                .await
                .map_err(|e| self.error(&format!("crd {name}"), e, Missing::NotFound))?;
        }
        for crd in crd::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            loop {
                let current = api
                    .get(&name)
                    .await
                    .map_err(|e| self.error(&format!("crd {name}"), e, Missing::NotFound))?;
                let established = current
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    async fn purge_scope(&self) -> Result<()> {
        let Some(scope) = &self.scope else {
            return Err(corrupt("scope", "purge_scope needs a scoped datastore"));
        };
        let params = ListParams::default().labels(&format!("{SCOPE_LABEL}={scope}"));
        for kind in KINDS {
            self.api(kind)
                .delete_collection(&DeleteParams::default(), &params)
                .await
                .map_err(|e| unavailable(&self.url, e))?;
        }
        self.node_api()
            .delete_collection(&DeleteParams::default(), &params)
            .await
            .map_err(|e| unavailable(&self.url, e))?;
        Ok(())
    }
}

fn revision_of(key: &str, meta: &ObjectMeta) -> Result<Revision> {
    meta.resource_version
        .clone()
        .map(Revision)
        .ok_or_else(|| corrupt(key, "the object has no resourceVersion"))
}
