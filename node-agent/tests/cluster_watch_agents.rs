//! Two `tabby-node` processes with `cluster = "kubernetes"`, each in its
//! own network namespace, on a real kube-apiserver of their own: they
//! register, find each other through their Node watches and bring their
//! BGP session up; Nodes created, changed and unregistered through the API
//! (also right after an apiserver restart) move their configured peers,
//! seen on their status sockets. One agent with `[proxy] source =
//! "kubernetes"`: Services and EndpointSlices created, changed and deleted
//! through the API show up in (and leave) its real nat rules, in iptables
//! and nftables mode (root only).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{annotate_node, create_node, runtime};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tabby_node::status::NodeStatus;
use tabby_testkit::kube::ControlPlane;
use tabby_testkit::{unique, Netns};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Long, to show that changes do not wait for a poll (the tick only
/// refreshes session states in the status).
const POLL_MS: u64 = 3000;
const NO_PROXY: &str = "[proxy]\nenabled = false\n";

/// The agent process, killed on drop.
struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- {} (last lines)", self.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Relays connections to `addr` inside `ns` (its loopback) to `addr` on
/// the host's loopback, where the apiserver listens: the kubeconfig (and
/// its certificate's 127.0.0.1) work unchanged inside the namespace.
fn forward_apiserver(ns: &Netns, addr: SocketAddr) {
    let listener = ns
        .open()
        .run(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", ns.name()));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(upstream) = TcpStream::connect(addr) else {
                continue; // the apiserver is restarting: the client retries
            };
            for (from, to) in [
                (client.try_clone(), upstream.try_clone()),
                (upstream.try_clone(), client.try_clone()),
            ] {
                if let (Ok(from), Ok(to)) = (from, to) {
                    std::thread::spawn(move || copy(from, to));
                }
            }
        }
    });
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn start_agent(
    ns: &Netns,
    name: &str,
    addr: &str,
    scope: &str,
    cp: &ControlPlane,
    dir: &Path,
    proxy: &str,
) -> AgentProc {
    let conf = dir.join(format!("{name}.toml"));
    std::fs::write(
        &conf,
        format!(
            "node_name = \"{name}\"\nbgp_address = \"{addr}\"\nhold_time = 9\nconnect_retry = 1\n\
             poll_interval_ms = {POLL_MS}\n\
             status_socket = {:?}\nmtu_file = {:?}\n[datastore]\ntype = \"kubernetes\"\nkubeconfig = {:?}\nscope = \"{scope}\"\n\
             {proxy}",
            dir.join(format!("{name}.sock")).display().to_string(),
            dir.join(format!("{name}.mtu")).display().to_string(),
            cp.kubeconfig_path().display().to_string(),
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = ns
        .command(env!("CARGO_BIN_EXE_tabby-node"))
        .arg("--config")
        .arg(&conf)
        .env("TABBY_LOG", "info,tabby_node=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    AgentProc { child, log }
}

fn status(dir: &Path, name: &str) -> Option<NodeStatus> {
    let mut s = UnixStream::connect(dir.join(format!("{name}.sock"))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    serde_json::from_str(&out).ok()
}

/// The peers in `name`'s status, with their state.
fn peers(dir: &Path, name: &str) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = status(dir, name)
        .map(|s| {
            s.peers
                .into_iter()
                .map(|p| (p.peer_address, p.state))
                .collect()
        })
        .unwrap_or_default();
    rows.sort();
    rows
}

fn addresses(rows: &[(String, String)]) -> Vec<&str> {
    rows.iter().map(|(a, _)| a.as_str()).collect()
}

/// Reads with `read` every `every` until what it read satisfies `done`:
/// the time it took, or after [`TIMEOUT`] the last reading.
fn poll_for<T>(
    every: Duration,
    read: impl Fn() -> T,
    done: impl Fn(&T) -> bool,
) -> Result<Duration, T> {
    let started = Instant::now();
    loop {
        let now = read();
        if done(&now) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= TIMEOUT {
            return Err(now);
        }
        std::thread::sleep(every);
    }
}

/// Waits until `name`'s peers satisfy `done`; the time it took.
fn until(
    dir: &Path,
    name: &str,
    what: &str,
    done: impl Fn(&[(String, String)]) -> bool,
) -> Duration {
    poll_for(Duration::from_millis(20), || peers(dir, name), |r| done(r))
        .unwrap_or_else(|rows| panic!("{name}: timed out waiting for {what}; peers {rows:?}"))
}

/// A kube-apiserver of the test's own with Tabby's CRDs, a scope for the
/// test's agents and a temp dir for their files; purges the scope on drop.
struct Cluster {
    cp: ControlPlane,
    /// Where the apiserver listens (on the host's loopback).
    apiserver: SocketAddr,
    dir: tempfile::TempDir,
    scope: String,
    admin: tabby_ipam::KubeDatastore,
}

impl Cluster {
    /// Starts the apiserver and installs the CRDs; the scope is
    /// `prefix` made unique.
    fn start(prefix: &str) -> Cluster {
        let cp = ControlPlane::builder()
            .start()
            .unwrap_or_else(|e| panic!("{}", tabby_testkit::error_chain(&e)));
        let apiserver = cp.url().trim_start_matches("https://").parse().unwrap();
        let scope = unique(prefix);
        let admin = tabby_ipam::KubeDatastore::open(&tabby_ipam::KubeOptions {
            kubeconfig: Some(cp.kubeconfig_path().to_path_buf()),
            scope: Some(scope.clone()),
        })
        .unwrap();
        admin.install_crds().unwrap();
        Cluster {
            cp,
            apiserver,
            dir: tempfile::tempdir().unwrap(),
            scope,
            admin,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.admin.purge_scope() {
            let scope = &self.scope;
            eprintln!("purge scope {scope}: {}", tabby_testkit::error_chain(&e));
        }
    }
}

/// A Node as a kubelet would create it, registered with Tabby but without
/// a BGP address: its InternalIP is used.
fn kubelet_node(
    rt: &tokio::runtime::Runtime,
    nodes: &Api<Node>,
    scope: &str,
    name: &str,
    ip: &str,
) {
    let object = format!("{scope}.{name}");
    let registered = json!({"tabby.dev/registered": "true"});
    rt.block_on(create_node(nodes, scope, &object, registered, ip));
}

#[test]
fn two_agents_find_each_other_through_their_node_watches_and_follow_the_api_across_a_restart() {
    if !tabby_testkit::require_root("two_agents_find_each_other") {
        return;
    }
    let Cluster {
        cp,
        apiserver,
        dir,
        scope,
        ..
    } = &Cluster::start("ag");
    let (na, nb) = (Netns::new("cwa"), Netns::new("cwb"));
    tabby_testkit::netns::veth_pair(&na, "eth0", "10.77.0.1/24", &nb, "eth0", "10.77.0.2/24");
    forward_apiserver(&na, *apiserver);
    forward_apiserver(&nb, *apiserver);
    let _a = start_agent(&na, "a", "10.77.0.1", scope, cp, dir.path(), NO_PROXY);
    let _b = start_agent(&nb, "b", "10.77.0.2", scope, cp, dir.path(), NO_PROXY);
    let up =
        |rows: &[(String, String)], addr: &str| rows.iter().any(|(a, s)| a == addr && s == "up");
    let took = until(dir.path(), "a", "the session with b", |r| {
        up(r, "10.77.0.2")
    });
    until(dir.path(), "b", "the session with a", |r| {
        up(r, "10.77.0.1")
    });
    eprintln!("both agents started -> mesh session up in {took:?}");

    let rt = runtime();
    let nodes: Api<Node> = rt.block_on(async { Api::all(cp.client()) });
    kubelet_node(&rt, &nodes, scope, "c", "10.77.0.3");
    let took = until(dir.path(), "a", "c at its InternalIP", |r| {
        addresses(r) == ["10.77.0.2", "10.77.0.3"]
    });
    eprintln!("Node created -> a's peer added in {took:?}");
    rt.block_on(annotate_node(
        &nodes,
        &format!("{scope}.c"),
        json!({"tabby.dev/bgp-address": "10.77.0.13"}),
    ));
    let took = until(dir.path(), "a", "c's new address", |r| {
        addresses(r) == ["10.77.0.13", "10.77.0.2"]
    });
    eprintln!("Node annotation changed -> a's peer replaced in {took:?}");

    let restart = cp
        .restart_apiserver()
        .unwrap_or_else(|e| panic!("{}", tabby_testkit::error_chain(&e)));
    eprintln!("apiserver restarted in {restart:?}");
    let started = Instant::now();
    rt.block_on(annotate_node(
        &nodes,
        &format!("{scope}.c"),
        json!({"tabby.dev/registered": null}),
    ));
    kubelet_node(&rt, &nodes, scope, "d", "10.77.0.4");
    for name in ["a", "b"] {
        let me = if name == "a" {
            "10.77.0.2"
        } else {
            "10.77.0.1"
        };
        until(
            dir.path(),
            name,
            "the changes made after the restart",
            |r| addresses(r) == [me, "10.77.0.4"] && up(r, me),
        );
    }
    eprintln!(
        "changes after the restart reached both agents {:?} after the first",
        started.elapsed()
    );
}

/// The nat rules the proxy wrote in `ns` in `mode`.
fn nat_rules(ns: &Netns, mode: &str) -> String {
    if mode == "nftables" {
        let out = ns.exec("nft", &["list", "table", "ip", "tabby-proxy"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        ns.exec_ok("iptables-nft-save", &["-t", "nat"])
    }
}

/// How `mode`'s rules write a DNAT to `ip`, port 8080 (nftables: an
/// element of an endpoints map).
fn endpoint(mode: &str, ip: &str) -> String {
    if mode == "nftables" {
        format!("{ip} . 8080")
    } else {
        format!("{ip}:8080")
    }
}

/// Waits until `ns`'s nat rules satisfy `done`; the time it took.
fn until_rules(ns: &Netns, mode: &str, what: &str, done: impl Fn(&str) -> bool) -> Duration {
    poll_for(
        Duration::from_millis(50),
        || nat_rules(ns, mode),
        |r| done(r),
    )
    .unwrap_or_else(|rules| panic!("{mode}: timed out waiting for {what}; nat rules:\n{rules}"))
}

/// An EndpointSlice of Service `web` with one ready endpoint per address.
fn web_slice(addresses: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn proxy_follows_the_api(mode: &str) {
    let Cluster {
        cp,
        apiserver,
        dir,
        scope,
        ..
    } = &Cluster::start("px");
    let (ns, peer) = (Netns::new("cwp"), Netns::new("cwq"));
    tabby_testkit::netns::veth_pair(&ns, "eth0", "10.78.0.1/24", &peer, "eth0", "10.78.0.2/24");
    forward_apiserver(&ns, *apiserver);
    let proxy = format!(
        "[proxy]\nenabled = true\nsource = \"kubernetes\"\nmode = \"{mode}\"\nbackend = \"nft\"\n\
         min_sync_period_ms = 50\ncluster_cidr = \"10.244.0.0/16\"\n"
    );
    let _agent = start_agent(&ns, "p", "10.78.0.1", scope, cp, dir.path(), &proxy);

    let rt = runtime();
    let (services, slices): (Api<Service>, Api<EndpointSlice>) = rt.block_on(async {
        (
            Api::default_namespaced(cp.client()),
            Api::default_namespaced(cp.client()),
        )
    });
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "ClusterIP", "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .unwrap();
    let svc = rt
        .block_on(services.create(&PostParams::default(), &svc))
        .unwrap();
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("a cluster IP");
    assert!(
        ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "cluster IP {ip:?}"
    );
    rt.block_on(slices.create(&PostParams::default(), &web_slice(&["10.244.1.5"])))
        .unwrap();
    let (first, second) = (endpoint(mode, "10.244.1.5"), endpoint(mode, "10.244.2.6"));
    let took = until_rules(&ns, mode, "the Service and its endpoint", |r| {
        r.contains(&ip) && r.contains(&first)
    });
    eprintln!("{mode}: Service {ip} and slice created -> in the rules in {took:?}");

    let mut changed = rt.block_on(slices.get("web-1")).unwrap();
    changed.endpoints = web_slice(&["10.244.2.6"]).endpoints;
    rt.block_on(slices.replace("web-1", &PostParams::default(), &changed))
        .unwrap();
    let took = until_rules(&ns, mode, "the replaced endpoint", |r| {
        r.contains(&ip) && r.contains(&second) && !r.contains(&first)
    });
    eprintln!("{mode}: endpoint replaced -> in the rules in {took:?}");

    rt.block_on(services.delete("web", &DeleteParams::default()))
        .unwrap();
    let took = until_rules(&ns, mode, "the Service to leave", |r| !r.contains(&ip));
    eprintln!("{mode}: Service deleted -> its cluster IP left the rules in {took:?}");
}

#[test]
fn services_and_endpoint_slices_changed_through_the_api_move_the_agents_iptables_rules() {
    if tabby_testkit::require_root("proxy_follows_the_api_iptables") {
        proxy_follows_the_api("iptables");
    }
}

#[test]
fn services_and_endpoint_slices_changed_through_the_api_move_the_agents_nftables_rules() {
    if tabby_testkit::require_root("proxy_follows_the_api_nftables") {
        proxy_follows_the_api("nftables");
    }
}
