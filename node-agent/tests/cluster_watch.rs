//! `cluster = "kubernetes"`: the agent's cluster view from watches on a
//! real kube-apiserver (testkit's control plane). Nodes, pools, blocks,
//! peers and BGP settings created, changed and deleted through the API
//! move the view (and the BGP peers it gives) without a poll; a watch
//! broken by an apiserver restart resumes and loses nothing. The watches
//! run with the token of the manifest's ServiceAccount, so its RBAC is
//! exercised too. Each test works in its own datastore scope.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use tabby_ipam::resources::{
    create_bgp_peer, delete_bgp_peer, set_bgp_config, BgpConfiguration, BgpPeer,
};
use tabby_ipam::{AssignArgs, IpPool, Ipam, KubeDatastore, KubeOptions};
use tabby_node::cluster::kubernetes::ClusterWatch;
use tabby_node::cluster::{ViewRx, Watched};
use tabby_node::desired::{desired_peers, local_blocks, ClusterView};
use tabby_testkit::kube::ControlPlane;
use tabby_testkit::unique;

/// Generous: two shared cores, and the watcher's backoff after a restart.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The node the view is computed for.
const ME: &str = "me";

/// A datastore scope as the admin; its objects (and Nodes) purged on drop.
struct Scope {
    name: String,
    admin: Arc<KubeDatastore>,
    nodes: Api<Node>,
}

impl Scope {
    fn new(cp: &ControlPlane) -> Self {
        let name = unique("cw");
        let admin = KubeDatastore::open(&KubeOptions {
            kubeconfig: Some(cp.kubeconfig_path().to_path_buf()),
            scope: Some(name.clone()),
        })
        .unwrap();
        Self {
            name,
            admin: Arc::new(admin),
            nodes: Api::all(cp.client()),
        }
    }

    fn ipam(&self) -> Ipam<Arc<KubeDatastore>> {
        Ipam::new(Arc::clone(&self.admin))
    }

    fn object_name(&self, node: &str) -> String {
        format!("{}.{node}", self.name)
    }

    /// Creates a Node as a kubelet would, with `annotations` and an InternalIP.
    async fn node(&self, node: &str, annotations: serde_json::Value, internal_ip: &str) {
        let name = self.object_name(node);
        create_node(&self.nodes, &self.name, &name, annotations, internal_ip).await;
    }

    async fn annotate(&self, node: &str, annotations: serde_json::Value) {
        annotate_node(&self.nodes, &self.object_name(node), annotations).await;
    }

    async fn delete_node(&self, node: &str) {
        self.nodes
            .delete(&self.object_name(node), &DeleteParams::default())
            .await
            .unwrap();
    }

    /// Runs a blocking datastore call off the async workers.
    fn blocking<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        tokio::task::block_in_place(|| f(self))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Err(e) = tokio::task::block_in_place(|| self.admin.purge_scope()) {
            eprintln!(
                "purge scope {}: {}",
                self.name,
                tabby_testkit::error_chain(&e)
            );
        }
    }
}

fn registered(address: Option<&str>) -> serde_json::Value {
    match address {
        Some(a) => json!({"tabby.dev/registered": "true", "tabby.dev/bgp-address": a}),
        None => json!({"tabby.dev/registered": "true"}),
    }
}

fn pool(name: &str, cidr: &str) -> IpPool {
    serde_json::from_value(json!({"name": name, "cidr": cidr, "blockSize": 28})).unwrap()
}

fn peer(name: &str, ip: &str) -> BgpPeer {
    serde_json::from_value(json!({"name": name, "peerIp": ip, "asNumber": 65001})).unwrap()
}

/// The peer addresses of node [`ME`] (at `10.50.0.1`) in `view`.
fn peers(view: &ClusterView) -> BTreeSet<String> {
    desired_peers(view, ME, "10.50.0.1".parse().unwrap())
        .iter()
        .map(|p| p.addr.to_string())
        .collect()
}

fn set(addrs: &[&str]) -> BTreeSet<String> {
    addrs.iter().map(|a| a.to_string()).collect()
}

/// Waits until the published view satisfies `done`; the time since `started`.
async fn until_since(
    started: Instant,
    rx: &mut ViewRx,
    what: &str,
    mut done: impl FnMut(&ClusterView) -> bool,
) -> Duration {
    let end = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Watched::Synced(view) = &*rx.borrow_and_update() {
            if done(view) {
                return started.elapsed();
            }
        }
        match tokio::time::timeout_at(end, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the watch ended while waiting for {what}"),
            Err(_) => panic!(
                "timed out after {TIMEOUT:?} waiting for {what}; last {:#?}",
                *rx.borrow()
            ),
        }
    }
}

/// [`until_since`] now.
async fn until(rx: &mut ViewRx, what: &str, done: impl FnMut(&ClusterView) -> bool) -> Duration {
    until_since(Instant::now(), rx, what, done).await
}

/// The watch of `scope` with the agent ServiceAccount's token.
async fn agent_watch(cp: &ControlPlane, scope: &Scope, dir: &std::path::Path) -> ViewRx {
    let kubeconfig = token_kubeconfig(cp, dir, "agent", &token(cp, AGENT_SA));
    ClusterWatch::connect(Some(&kubeconfig), Some(scope.name.clone()))
        .await
        .unwrap()
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_joining_changing_and_leaving_through_the_api_move_the_mesh() {
    let cp = tokio::task::block_in_place(installed);
    let dir = tempfile::tempdir().unwrap();
    let scope = Scope::new(cp);
    scope
        .node(ME, registered(Some("10.50.0.1")), "10.50.0.1")
        .await;
    scope
        .node("b", registered(Some("10.50.0.2")), "10.9.0.2")
        .await;
    let mut rx = agent_watch(cp, &scope, dir.path()).await;
    let Watched::Pending(kinds) = rx.borrow().clone() else {
        panic!("a new watch is pending until its first lists");
    };
    assert!(
        kinds.iter().any(|k| k == "Node") && kinds.iter().any(|k| k == "IPPool"),
        "{kinds:?}"
    );
    let took = until(&mut rx, "the initial list", |v| {
        peers(v) == set(&["10.50.0.2"])
    })
    .await;
    eprintln!("first full list in {took:?}");

    let started = Instant::now();
    scope.node("c", registered(None), "10.50.0.3").await;
    scope.node("kubelet-only", json!({}), "10.50.0.4").await;
    let took = until_since(started, &mut rx, "c joins at its InternalIP", |v| {
        peers(v) == set(&["10.50.0.2", "10.50.0.3"])
    })
    .await;
    eprintln!("two Nodes created -> peer added in (API calls included) {took:?}");

    let started = Instant::now();
    scope
        .annotate("b", json!({"tabby.dev/bgp-address": "10.50.0.12"}))
        .await;
    let took = until_since(started, &mut rx, "b's new address", |v| {
        peers(v) == set(&["10.50.0.12", "10.50.0.3"])
    })
    .await;
    eprintln!("Node annotation changed -> peer moved in {took:?}");

    let started = Instant::now();
    scope.annotate("kubelet-only", registered(None)).await;
    scope.delete_node("c").await;
    let took = until_since(started, &mut rx, "a registration and a departure", |v| {
        peers(v) == set(&["10.50.0.12", "10.50.0.4"])
    })
    .await;
    eprintln!("Node registered + Node deleted -> peers followed in {took:?}");

    scope
        .annotate("b", json!({"tabby.dev/registered": null}))
        .await;
    until(&mut rx, "an unregistered node leaves", |v| {
        peers(v) == set(&["10.50.0.4"])
    })
    .await;
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_blocks_peers_and_bgp_settings_changed_through_the_api_reach_the_view_at_once() {
    let cp = tokio::task::block_in_place(installed);
    let dir = tempfile::tempdir().unwrap();
    let scope = Scope::new(cp);
    scope
        .node(ME, registered(Some("10.50.0.1")), "10.50.0.1")
        .await;
    let mut rx = agent_watch(cp, &scope, dir.path()).await;
    until(&mut rx, "the initial list", |v| v.snapshot.nodes.len() == 1).await;

    let started = Instant::now();
    scope.blocking(|s| s.ipam().create_pool(&pool("p1", "10.83.0.0/24")).unwrap());
    let took = until_since(started, &mut rx, "the pool", |v| {
        v.snapshot.pools.len() == 1
    })
    .await;
    eprintln!("IPPool created -> view in {took:?}");

    let started = Instant::now();
    scope.blocking(|s| {
        s.ipam()
            .assign(&AssignArgs {
                handle: "net.c1".into(),
                node: ME.into(),
                attrs: Default::default(),
                num_v4: 1,
                num_v6: 0,
                pools: vec![],
            })
            .unwrap()
    });
    let block: ipnetwork::IpNetwork = "10.83.0.0/28".parse().unwrap();
    let took = until_since(started, &mut rx, "the node's block and affinity", |v| {
        local_blocks(v, ME).contains(&block)
    })
    .await;
    eprintln!("address assigned (IPAM round trips included) -> block in the view in {took:?}");

    let started = Instant::now();
    scope.blocking(|s| create_bgp_peer(s.admin.as_ref(), &peer("r1", "10.50.9.1")).unwrap());
    let took = until_since(started, &mut rx, "the global peer", |v| {
        peers(v) == set(&["10.50.9.1"])
    })
    .await;
    eprintln!("BGPPeer created -> peer in {took:?}");

    let mesh_off = BgpConfiguration {
        as_number: 65010,
        node_to_node_mesh: false,
    };
    scope.blocking(|s| set_bgp_config(s.admin.as_ref(), &mesh_off).unwrap());
    until(&mut rx, "the BGP configuration", |v| {
        v.bgp.as_number == 65010 && !v.bgp.node_to_node_mesh
    })
    .await;

    let started = Instant::now();
    scope.blocking(|s| assert!(delete_bgp_peer(s.admin.as_ref(), "r1").unwrap()));
    let took = until_since(started, &mut rx, "the peer's removal", |v| {
        peers(v).is_empty()
    })
    .await;
    eprintln!("BGPPeer deleted -> peer gone in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_broken_by_an_apiserver_restart_resumes_and_loses_nothing() {
    // Its own control plane: a restart would disturb the shared one's users.
    let cp = tokio::task::block_in_place(|| ControlPlane::builder().start())
        .unwrap_or_else(|e| panic!("{}", tabby_testkit::error_chain(&e)));
    let scope = Scope::new(&cp);
    scope.blocking(|s| {
        s.admin.install_crds().unwrap();
        s.ipam()
            .create_pool(&pool("doomed", "10.84.0.0/24"))
            .unwrap();
        s.ipam().create_pool(&pool("kept", "10.85.0.0/24")).unwrap();
    });
    scope
        .node(ME, registered(Some("10.50.0.1")), "10.50.0.1")
        .await;
    scope
        .node("keep", registered(Some("10.50.1.1")), "10.9.1.1")
        .await;
    scope
        .node("doomed", registered(Some("10.50.1.2")), "10.9.1.2")
        .await;
    let mut rx = ClusterWatch::connect(Some(cp.kubeconfig_path()), Some(scope.name.clone()))
        .await
        .unwrap()
        .start();
    until(&mut rx, "the initial list", |v| {
        peers(v) == set(&["10.50.1.1", "10.50.1.2"]) && v.snapshot.pools.len() == 2
    })
    .await;

    for round in 0..2u8 {
        let took = tokio::task::block_in_place(|| cp.restart_apiserver())
            .unwrap_or_else(|e| panic!("{}", tabby_testkit::error_chain(&e)));
        eprintln!("apiserver restart {round} ready again in {took:?}");
        // Right after the restart, while the watches are still backing off.
        let started = Instant::now();
        let moved = format!("10.50.2.{round}");
        let born = format!("born-{round}");
        let born_ip = format!("10.50.3.{round}");
        scope
            .annotate("keep", json!({"tabby.dev/bgp-address": moved}))
            .await;
        scope.node(&born, registered(None), &born_ip).await;
        let router = format!("r{round}");
        let router_ip = format!("10.50.9.{round}");
        scope.blocking(|s| create_bgp_peer(s.admin.as_ref(), &peer(&router, &router_ip)).unwrap());
        if round == 0 {
            scope.delete_node("doomed").await;
            scope.blocking(|s| s.ipam().delete_pool("doomed").unwrap());
        }
        let mut want: BTreeSet<String> = set(&[&moved, &router_ip]);
        want.extend((0..=round).map(|r| format!("10.50.3.{r}")));
        want.extend((0..round).map(|r| format!("10.50.9.{r}")));
        until(&mut rx, "every change made across the restart", |v| {
            peers(v) == want
                && v.snapshot
                    .pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    == ["kept"]
        })
        .await;
        eprintln!(
            "round {round}: the view caught up {:?} after the first change",
            started.elapsed()
        );
    }
    let view = match rx.borrow().clone() {
        Watched::Synced(view) => view,
        other => panic!("{other:?}"),
    };
    let addr: IpAddr = "10.50.0.1".parse().unwrap();
    assert!(
        view.snapshot
            .nodes
            .iter()
            .any(|n| n.name == ME && n.address == Some(addr)),
        "nothing else was lost: {view:#?}"
    );
}
