//! `deploy/tabby.yaml` on a real kube-apiserver (testkit's shared control
//! plane): the manifest applies, its RBAC gives the agent and the plugin
//! what they use and no more, and the plugin, with the token the agent
//! mints for it, honours pod annotations and releases after the pod is gone.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{json, Value};
use tabby_ipam::{IpPool, Ipam, KubeDatastore, KubeOptions};
use tabby_node::config::AgentConfig;
use tabby_node::install_cni::token::{request_token, PluginKubeconfig, TokenSource};
use tabby_testkit::cni::Call;
use tabby_testkit::kube::ControlPlane;
use tabby_testkit::poll::wait_until;
use tabby_testkit::unique;

#[test]
fn the_manifest_applies_and_its_crds_become_established() {
    let cp = installed();
    for (kind, name) in [
        ("serviceaccount", AGENT_SA),
        ("serviceaccount", PLUGIN_SA),
        ("clusterrole", AGENT_SA),
        ("clusterrole", PLUGIN_SA),
        ("role", "tabby-node-plugin-token"),
        ("configmap", "tabby-config"),
        ("daemonset", "tabby-node"),
    ] {
        cp.kubectl(&["-n", NAMESPACE, "get", kind, name])
            .unwrap_or_else(|e| panic!("{kind}/{name}: {}", tabby_testkit::error_chain(&e)));
    }
    let established = cp
        .kubectl(&[
            "get",
            "crd",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Established")].status}{"\n"}{end}"#,
        ])
        .unwrap();
    for crd in tabby_ipam::kubernetes::crd::crds() {
        let name = crd.metadata.name.unwrap();
        assert!(
            established.lines().any(|l| l == format!("{name}=True")),
            "{name} is not Established:\n{established}"
        );
    }
}

#[test]
fn the_daemonset_runs_on_every_node_with_only_the_privileges_it_needs() {
    let cp = installed();
    let text = cp
        .kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "daemonset",
            "tabby-node",
            "-o",
            "json",
        ])
        .unwrap();
    let ds: Value = serde_json::from_str(&text).unwrap();
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["serviceAccountName"], AGENT_SA);
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]));
    let init = &spec["initContainers"][0];
    assert_eq!(
        init["command"],
        json!(["/usr/local/bin/tabby-node", "install-cni"])
    );
    let agent = &spec["containers"][0];
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], 9099);
    for container in [init, agent] {
        let security = &container["securityContext"];
        assert_ne!(security["privileged"], true, "{}", container["name"]);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    }
    assert_eq!(
        agent["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"])
    );
}

#[test]
fn neither_service_account_can_read_secrets_or_write_pods() {
    let cp = installed();
    for sa in [AGENT_SA, PLUGIN_SA] {
        for args in [
            &["get", "secrets", "-n", NAMESPACE][..],
            &["list", "secrets", "--all-namespaces"],
            &["watch", "secrets", "-n", "default"],
            &["create", "pods", "-n", "default"],
            &["update", "pods", "-n", "default"],
            &["patch", "pods", "-n", NAMESPACE],
            &["delete", "pods", "-n", "default"],
            &["create", "nodes"],
            &["delete", "nodes"],
            &["create", "customresourcedefinitions.apiextensions.k8s.io"],
        ] {
            assert!(!can_i(cp, sa, args), "{sa} may {args:?}");
        }
    }
    let token = |sa: &str| format!("serviceaccounts/{sa}");
    assert!(can_i(
        cp,
        AGENT_SA,
        &[
            "create",
            &token(PLUGIN_SA),
            "--subresource=token",
            "-n",
            NAMESPACE
        ]
    ));
    assert!(!can_i(
        cp,
        AGENT_SA,
        &[
            "create",
            &token("default"),
            "--subresource=token",
            "-n",
            NAMESPACE
        ]
    ));
    assert!(!can_i(
        cp,
        PLUGIN_SA,
        &[
            "create",
            &token(PLUGIN_SA),
            "--subresource=token",
            "-n",
            NAMESPACE
        ]
    ));
    assert!(!can_i(
        cp,
        AGENT_SA,
        &["update", "ipamblocks.crd.tabby.dev"]
    ));
    assert!(!can_i(cp, PLUGIN_SA, &["update", "ippools.crd.tabby.dev"]));
    assert!(!can_i(cp, PLUGIN_SA, &["list", "services"]));
}

#[test]
fn the_agent_may_watch_every_kind_its_cluster_view_reads_and_write_none_of_them() {
    let cp = installed();
    let mut resources = vec!["nodes".to_string()];
    for kind in tabby_node::cluster::objects::watched_kinds() {
        let resource = (kind.resource)();
        resources.push(format!("{}.{}", resource.plural, resource.group));
    }
    for resource in &resources {
        for verb in ["get", "list", "watch"] {
            assert!(
                can_i(cp, AGENT_SA, &[verb, resource]),
                "{AGENT_SA} may not {verb} {resource}"
            );
        }
        for verb in ["create", "delete", "deletecollection"] {
            assert!(
                !can_i(cp, AGENT_SA, &[verb, resource]),
                "{AGENT_SA} may {verb} {resource}"
            );
        }
    }
}

/// A scoped datastore as the admin, with two pools; purged on drop.
struct Scope {
    name: String,
    admin: Arc<KubeDatastore>,
}

impl Scope {
    fn new(cp: &ControlPlane, prefix: &str) -> Self {
        let name = unique(prefix);
        let admin = Arc::new(
            KubeDatastore::open(&KubeOptions {
                kubeconfig: Some(cp.kubeconfig_path().to_path_buf()),
                scope: Some(name.clone()),
            })
            .unwrap(),
        );
        Self { name, admin }
    }

    fn options(&self, kubeconfig: &std::path::Path) -> KubeOptions {
        KubeOptions {
            kubeconfig: Some(kubeconfig.to_path_buf()),
            scope: Some(self.name.clone()),
        }
    }

    /// Creates the Node object as a kubelet would (unregistered with Tabby).
    fn kubelet_node(&self, cp: &ControlPlane, node: &str) {
        let object: Node = serde_json::from_value(json!({
            "metadata": {
                "name": format!("{}.{node}", self.name),
                "labels": {"tabby.dev/scope": self.name},
            }
        }))
        .unwrap();
        runtime().block_on(async {
            let nodes: Api<Node> = Api::all(cp.client());
            nodes.create(&PostParams::default(), &object).await.unwrap();
        });
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Err(e) = self.admin.purge_scope() {
            eprintln!(
                "purge scope {}: {}",
                self.name,
                tabby_testkit::error_chain(&e)
            );
        }
    }
}

fn agent_config(node: &str, kubeconfig: &std::path::Path) -> AgentConfig {
    AgentConfig::parse(&format!(
        "node_name = \"{node}\"\nbgp_address = \"10.98.7.1\"\n[datastore]\ntype = \"kubernetes\"\nkubeconfig = {:?}\n",
        kubeconfig.display().to_string()
    ))
    .unwrap()
}

fn plugin_source() -> TokenSource {
    TokenSource {
        namespace: NAMESPACE.into(),
        service_account: PLUGIN_SA.into(),
        validity: Duration::from_secs(3600),
    }
}

#[test]
fn the_agent_with_its_own_token_registers_its_node_reads_the_cluster_and_mints_only_the_plugin_token(
) {
    let cp = installed();
    let dir = tempfile::tempdir().unwrap();
    let scope = Scope::new(cp, "ag");
    scope.kubelet_node(cp, "node-1");
    let kubeconfig = token_kubeconfig(cp, dir.path(), "agent", &token(cp, AGENT_SA));
    let ds = KubeDatastore::open(&scope.options(&kubeconfig)).unwrap();
    let cfg = agent_config("node-1", &kubeconfig);
    let underlay = Some("10.98.7.1/24".parse().unwrap());
    let node = tabby_node::register::register_node(&ds, &cfg, underlay).unwrap();
    assert_eq!(node.ipv4_address, underlay);
    assert_eq!(node.address, Some("10.98.7.1".parse().unwrap()));
    let view = tabby_node::register::load_view(&ds).unwrap();
    assert_eq!(view.snapshot.nodes.len(), 1);
    // The annotation is on the Kubernetes Node.
    let annotations = runtime().block_on(async {
        let nodes: Api<Node> = Api::all(cp.client());
        let n = nodes.get(&format!("{}.node-1", scope.name)).await.unwrap();
        n.metadata.annotations.unwrap_or_default()
    });
    assert_eq!(
        annotations.get("tabby.dev/bgp-address").map(String::as_str),
        Some("10.98.7.1")
    );
    // TokenRequest for the plugin, and for nobody else.
    runtime().block_on(async {
        let client = cp.client_as(&token(cp, AGENT_SA));
        let (plugin_token, lifetime) = request_token(&client, &plugin_source()).await.unwrap();
        assert!(!plugin_token.is_empty());
        assert_eq!(lifetime, Duration::from_secs(3600));
        let mut other = plugin_source();
        other.service_account = AGENT_SA.into();
        let err = request_token(&client, &other).await.unwrap_err();
        assert!(
            tabby_testkit::error_chain(&err).contains("forbidden"),
            "{err:?}"
        );
    });
}

/// A namespace with its default ServiceAccount (no controller-manager
/// runs to create it) and pods with `annotations`.
fn namespace_with_pods(cp: &ControlPlane, pods: &[(&str, BTreeMap<&str, &str>)]) -> String {
    let ns = unique("pods");
    runtime().block_on(async {
        let client = cp.client();
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
        let api: Api<Pod> = Api::namespaced(client, &ns);
        for (name, annotations) in pods {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": annotations},
                "spec": {"containers": [{"name": "c", "image": "tabby-test:none"}]}
            }))
            .unwrap();
            api.create(&PostParams::default(), &pod).await.unwrap();
        }
    });
    ns
}

fn delete_pod(cp: &ControlPlane, ns: &str, name: &str) {
    let rt = runtime();
    let api: Api<Pod> = rt.block_on(async { Api::namespaced(cp.client(), ns) });
    rt.block_on(api.delete(name, &DeleteParams::default().grace_period(0)))
        .unwrap();
    wait_until(
        &format!("pod {ns}/{name} gone"),
        Duration::from_secs(20),
        || rt.block_on(api.get_opt(name)).unwrap().is_none(),
    );
}

fn pool(name: &str, cidr: &str) -> IpPool {
    serde_json::from_value(json!({"name": name, "cidr": cidr, "blockSize": 28})).unwrap()
}

#[test]
fn the_plugin_with_the_minted_token_honours_pod_annotations_and_releases_after_the_pod_is_gone() {
    let cp = installed();
    let dir = tempfile::tempdir().unwrap();
    let scope = Scope::new(cp, "pl");
    let admin = Ipam::new(Arc::clone(&scope.admin));
    admin.create_pool(&pool("pool-a", "10.81.0.0/24")).unwrap();
    admin.create_pool(&pool("pool-b", "10.82.0.0/24")).unwrap();
    scope.kubelet_node(cp, "node-1");

    // The kubeconfig exactly as install-cni and the agent write it.
    let path = dir.path().join("tabby-kubeconfig");
    runtime().block_on(async {
        let client = cp.client_as(&token(cp, AGENT_SA));
        let config = cp.token_config("unused");
        let plugin = PluginKubeconfig::new(&config, path.clone(), plugin_source());
        plugin.refresh(&client).await.unwrap();
    });
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let ns = namespace_with_pods(
        cp,
        &[
            (
                "pinned",
                BTreeMap::from([("tabby.dev/ipAddrs", r#"["10.81.0.77"]"#)]),
            ),
            (
                "chooser",
                BTreeMap::from([("tabby.dev/ipv4pools", r#"["pool-b"]"#)]),
            ),
            (
                "by-cidr",
                BTreeMap::from([("tabby.dev/ipv4pools", r#"["10.81.0.0/24"]"#)]),
            ),
            (
                "thief",
                BTreeMap::from([("tabby.dev/ipAddrs", r#"["10.81.0.77"]"#)]),
            ),
            (
                "typo",
                BTreeMap::from([("tabby.dev/ipv4pools", r#"["pool-c"]"#)]),
            ),
        ],
    );
    let options = scope.options(&path);
    let conf = serde_json::to_vec(&json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "tabby-ipam",
        "nodename": "node-1",
        "ipam": {
            "type": "tabby-ipam",
            "datastore": {"type": "kubernetes", "kubeconfig": options.kubeconfig, "scope": options.scope},
        }
    }))
    .unwrap();
    let plugin = bin("tabby-ipam");
    let run = |command: &str, pod: &str| {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}");
        let cid = format!("cid-{pod}");
        let mut call = Call::new(&plugin, command, &cid, "/run/netns/unused");
        call.args = &args;
        call.run_here(&conf)
    };

    let pinned = run("ADD", "pinned");
    assert!(pinned.ok, "{} {}", pinned.stdout, pinned.stderr);
    assert_eq!(pinned.ip(), "10.81.0.77");
    let chooser = run("ADD", "chooser");
    assert!(chooser.ok, "{} {}", chooser.stdout, chooser.stderr);
    assert!(chooser.ip().starts_with("10.82.0."), "{}", chooser.ip());
    let by_cidr = run("ADD", "by-cidr");
    assert!(by_cidr.ok, "{} {}", by_cidr.stdout, by_cidr.stderr);
    assert!(by_cidr.ip().starts_with("10.81.0."), "{}", by_cidr.ip());
    let thief = run("ADD", "thief");
    assert!(
        !thief.ok && thief.msg().contains("already allocated"),
        "{}",
        thief.stdout
    );
    let typo = run("ADD", "typo");
    assert!(!typo.ok && typo.msg().contains("pool-c"), "{}", typo.stdout);
    let ghost = run("ADD", "ghost");
    assert!(
        !ghost.ok && ghost.msg().contains("does not exist"),
        "{}",
        ghost.stdout
    );

    // DEL once the pod object is gone: released by handle.
    delete_pod(cp, &ns, "chooser");
    let del = run("DEL", "chooser");
    assert!(del.ok, "{} {}", del.stdout, del.stderr);
    assert!(admin
        .addresses_of("k8s-pod-network.cid-chooser")
        .unwrap()
        .is_empty());
    assert!(run("DEL", "chooser").ok, "a second DEL is success");
    assert_eq!(
        admin.addresses_of("k8s-pod-network.cid-pinned").unwrap(),
        vec!["10.81.0.77".parse::<std::net::IpAddr>().unwrap()]
    );
    for pod in ["pinned", "by-cidr"] {
        assert!(run("DEL", pod).ok);
    }
    let _ = cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// `[proxy] source = "kubernetes"` connects with the `[datastore]`
/// kubeconfig and delivers the API's Services, then both kinds synced.
#[test]
fn the_kubernetes_proxy_source_uses_the_datastore_kubeconfig() {
    use tabby_node::service_proxy::Source;
    use tabby_proxy::cluster_state::ClusterState;
    use tabby_proxy::proxier::{ProxyEvent, SourceId};

    let cp = tabby_testkit::kube::shared();
    let ns = namespace_with_pods(cp, &[]);
    let text = format!(
        "node_name = \"n\"\nbgp_address = \"10.0.0.1\"\n[datastore]\ntype = \"kubernetes\"\nkubeconfig = {:?}\n[proxy]\nsource = \"kubernetes\"\n",
        cp.kubeconfig_path().display().to_string()
    );
    let cfg = AgentConfig::parse(&text).unwrap();
    runtime().block_on(async {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(
            json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .unwrap();
        Api::namespaced(cp.client(), &ns)
            .create(&PostParams::default(), &svc)
            .await
            .unwrap();
        let Source::Kubernetes(source) = Source::from_config(&cfg).await.unwrap() else {
            panic!("source = \"kubernetes\" gives the Kubernetes source");
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(source.run(tx));
        let (mut web, mut synced) = (false, Vec::new());
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while !(web && synced.len() == 2) {
            match tokio::time::timeout_at(end, rx.recv()).await {
                Ok(Some(ProxyEvent::ServiceUpsert(s))) => {
                    web |= s.metadata.namespace.as_deref() == Some(ns.as_str())
                        && s.metadata.name.as_deref() == Some("web");
                }
                Ok(Some(ProxyEvent::SourceSynced(id))) => {
                    assert!(web || id != SourceId::Services, "web comes in the initial list");
                    synced.push(id);
                }
                Ok(Some(_)) => {}
                other => panic!("waiting for web and both kinds synced: {other:?} (web {web}, synced {synced:?})"),
            }
        }
    });
}
