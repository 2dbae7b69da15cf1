//! The Kubernetes source against a real kube-apiserver and etcd (testkit's
//! control plane): Services and EndpointSlices created, changed and
//! deleted through the API arrive as events, and a watch broken by an
//! apiserver restart resumes without losing an update or a delete.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use tabby_proxy::cluster_state::{ClusterState, KubeClusterState};
use tabby_proxy::model::ServiceKey;
use tabby_proxy::proxier::ProxyEvent;
use tabby_testkit::kube::ControlPlane;
use tabby_testkit::unique;
use tokio::sync::mpsc;

/// Generous: two shared cores, and the watcher's backoff after a restart.
const TIMEOUT: Duration = Duration::from_secs(60);

/// What the events say the cluster holds (keys `namespace/name`).
#[derive(Debug, Default)]
struct View {
    services: BTreeMap<String, Service>,
    slices: BTreeMap<String, EndpointSlice>,
    synced: BTreeSet<String>,
    /// Services seen before Services were synced.
    before_sync: BTreeSet<String>,
    /// An upsert still carried managedFields.
    managed_fields: bool,
}

impl View {
    fn apply(&mut self, event: ProxyEvent) {
        match event {
            ProxyEvent::ServiceUpsert(s) => {
                self.managed_fields |= s.metadata.managed_fields.is_some();
                let key = ServiceKey::of(&s.metadata).to_string();
                if !self.synced.contains("Services") {
                    self.before_sync.insert(key.clone());
                }
                self.services.insert(key, *s);
            }
            ProxyEvent::ServiceDelete(k) => {
                self.services.remove(&k.to_string());
            }
            ProxyEvent::SliceUpsert(s) => {
                self.managed_fields |= s.metadata.managed_fields.is_some();
                let m = &s.metadata;
                let key = format!(
                    "{}/{}",
                    m.namespace.as_deref().unwrap_or(""),
                    m.name.as_deref().unwrap_or("")
                );
                self.slices.insert(key, *s);
            }
            ProxyEvent::SliceDelete(ns, name) => {
                self.slices.remove(&format!("{ns}/{name}"));
            }
            ProxyEvent::SourceSynced(id) => {
                self.synced.insert(format!("{id:?}"));
            }
            other => panic!("the source sent {other:?}"),
        }
    }

    fn port(&self, key: &str) -> Option<i32> {
        let ports = self.services.get(key)?.spec.as_ref()?.ports.as_ref()?;
        ports.first().map(|p| p.port)
    }

    fn address(&self, key: &str) -> Option<&str> {
        let endpoint = self.slices.get(key)?.endpoints.as_ref()?.first()?;
        endpoint.addresses.first().map(String::as_str)
    }
}

/// Folds events from `rx` into `view` until `done` holds; fails after [`TIMEOUT`].
async fn until(
    rx: &mut mpsc::Receiver<ProxyEvent>,
    view: &mut View,
    what: &str,
    mut done: impl FnMut(&View) -> bool,
) {
    let end = tokio::time::Instant::now() + TIMEOUT;
    while !done(view) {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(event)) => view.apply(event),
            Ok(None) => panic!("the source stopped while waiting for {what}"),
            Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}; saw {view:#?}"),
        }
    }
}

/// Typed access to one namespace.
struct Ns {
    name: String,
    services: Api<Service>,
    slices: Api<EndpointSlice>,
}

impl Ns {
    async fn create(client: &Client) -> Self {
        let name = unique("watch");
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        Self {
            services: Api::namespaced(client.clone(), &name),
            slices: Api::namespaced(client.clone(), &name),
            name,
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.name)
    }

    async fn service(&self, name: &str, port: i32) {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"ports": [{"port": port, "targetPort": 8080}]}
        }))
        .unwrap();
        self.services
            .create(&PostParams::default(), &svc)
            .await
            .unwrap();
    }

    async fn slice(&self, name: &str, service: &str, address: &str) {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [address], "nodeName": "node-1"}]
        }))
        .unwrap();
        self.slices
            .create(&PostParams::default(), &slice)
            .await
            .unwrap();
    }

    async fn set_port(&self, name: &str, port: i32) {
        let patch = json!({"spec": {"ports": [{"port": port, "targetPort": 8080}]}});
        self.services
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn set_address(&self, name: &str, address: &str) {
        let patch = json!({"endpoints": [{"addresses": [address], "nodeName": "node-1"}]});
        self.slices
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn delete_service(&self, name: &str) {
        self.services
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    async fn delete_slice(&self, name: &str) {
        self.slices
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
}

fn synced(v: &View) -> bool {
    v.synced.contains("Services") && v.synced.contains("EndpointSlices")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_slices_created_changed_and_deleted_through_the_api_arrive() {
    let cp = tokio::task::block_in_place(tabby_testkit::kube::shared);
    let client = cp.client();
    let ns = Ns::create(&client).await;
    ns.service("early", 80).await;
    let (tx, mut rx) = mpsc::channel(64);
    let source = KubeClusterState::new(client.clone()).namespaced(&ns.name);
    let task = tokio::spawn(source.run(tx));
    let mut view = View::default();
    until(&mut rx, &mut view, "the initial list", synced).await;
    assert!(
        view.before_sync.contains(&ns.key("early")),
        "a Service that existed before the watch comes before Services are synced: {view:#?}"
    );

    ns.service("web", 80).await;
    ns.slice("web-abc", "web", "10.244.1.2").await;
    until(&mut rx, &mut view, "the new Service and slice", |v| {
        v.port(&ns.key("web")) == Some(80) && v.address(&ns.key("web-abc")) == Some("10.244.1.2")
    })
    .await;
    assert!(
        view.services[&ns.key("web")]
            .spec
            .as_ref()
            .unwrap()
            .cluster_ip
            .is_some(),
        "the apiserver's object, with its allocated cluster IP"
    );

    ns.set_port("web", 8081).await;
    ns.set_address("web-abc", "10.244.1.3").await;
    until(&mut rx, &mut view, "the changes", |v| {
        v.port(&ns.key("web")) == Some(8081) && v.address(&ns.key("web-abc")) == Some("10.244.1.3")
    })
    .await;

    ns.delete_slice("web-abc").await;
    ns.delete_service("web").await;
    until(&mut rx, &mut view, "the deletes", |v| {
        !v.services.contains_key(&ns.key("web")) && !v.slices.contains_key(&ns.key("web-abc"))
    })
    .await;
    assert!(view.services.contains_key(&ns.key("early")));
    assert!(!view.managed_fields, "managedFields are stripped");
    drop(rx);
    tokio::time::timeout(TIMEOUT, task)
        .await
        .expect("the source stops when its receiver is gone")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_broken_by_an_apiserver_restart_resumes_and_loses_nothing() {
    // Its own control plane: a restart would disturb the shared one's users.
    let cp = tokio::task::block_in_place(|| ControlPlane::builder().start())
        .unwrap_or_else(|e| panic!("{}", tabby_testkit::error_chain(&e)));
    let client = cp.client();
    let ns = Ns::create(&client).await;
    ns.service("kept", 80).await;
    ns.service("doomed", 80).await;
    ns.slice("kept-1", "kept", "10.244.2.1").await;
    ns.slice("doomed-1", "doomed", "10.244.2.2").await;
    // Every namespace, through the kubeconfig (what tabby-node does).
    let source = KubeClusterState::connect(Some(cp.kubeconfig_path()))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(source.run(tx));
    let mut view = View::default();
    until(&mut rx, &mut view, "the initial list", |v| {
        synced(v)
            && v.address(&ns.key("doomed-1")).is_some()
            && v.services.contains_key("default/kubernetes")
    })
    .await;

    for round in 0..2 {
        let took = tokio::task::block_in_place(|| cp.restart_apiserver())
            .unwrap_or_else(|e| panic!("{}", tabby_testkit::error_chain(&e)));
        eprintln!("apiserver restart {round} ready again in {took:?}");
        // Right after the restart, while the watcher is still backing off.
        let address = format!("10.244.3.{round}");
        let born = format!("born-{round}");
        ns.set_port("kept", 9000 + round).await;
        ns.set_address("kept-1", &address).await;
        ns.service(&born, 80).await;
        if round == 0 {
            ns.delete_service("doomed").await;
            ns.delete_slice("doomed-1").await;
        }
        until(
            &mut rx,
            &mut view,
            "the changes made across the restart",
            |v| {
                v.port(&ns.key("kept")) == Some(9000 + round)
                    && v.address(&ns.key("kept-1")) == Some(address.as_str())
                    && v.services.contains_key(&ns.key(&born))
                    && !v.services.contains_key(&ns.key("doomed"))
                    && !v.slices.contains_key(&ns.key("doomed-1"))
            },
        )
        .await;
    }
    assert!(
        view.services.contains_key("default/kubernetes"),
        "nothing else was lost: {view:#?}"
    );
}
