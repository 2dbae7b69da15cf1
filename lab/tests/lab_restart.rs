//! An agent that crashes and comes back under load, in the lab: no request
//! fails and no node's route to the restarted node's block ever goes away
//! (root only; the lab of its own, torn down on drop).
//!
//! A pod on node-2 requests a ClusterIP (endpoints on every node) and a pod
//! on node-3 every 20 ms while node-2's agent is killed with SIGKILL and
//! started again 20 times (every third time after 2 s down). What keeps
//! the traffic flowing: the proxy's
//! first sync waits for its sources (the rules of the previous run stay),
//! the route thread keeps the learned routes of the previous run through
//! its grace, and the other nodes keep node-2's routes as stale (BGP
//! graceful restart) until it is back.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::*;
use tabby_dataplane::{Family, NetNs, Netlink};

const CLUSTER_IP: &str = "10.96.0.30";
const CYCLES: usize = 20;
/// Below TCP's first SYN retransmission (1 s): a dropped SYN is a failure,
/// not a slow success.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(900);
const PERIOD: Duration = Duration::from_millis(20);
/// How long the agent stays dead in every third cycle.
const DOWNTIME: Duration = Duration::from_secs(2);

/// One client: GET `target` every 20 ms from inside namespace `ns`.
struct Client {
    what: String,
    outcome: Arc<Mutex<Outcome>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Outcome {
    ok: u32,
    failures: Vec<String>,
    slowest: Duration,
}

fn get(target: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: restart\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "answer {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        ))
    }
}

impl Client {
    fn start(ns: &str, target: SocketAddr, stop: Arc<AtomicBool>) -> Client {
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let (out, started) = (Arc::clone(&outcome), Instant::now());
        let netns = NetNs::open(format!("/run/netns/{ns}")).unwrap();
        let thread = std::thread::spawn(move || {
            netns
                .run(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let result = get(target);
                        let took = t.elapsed();
                        let mut o = out.lock().unwrap();
                        o.slowest = o.slowest.max(took);
                        match result {
                            Ok(()) => o.ok += 1,
                            Err(e) => o
                                .failures
                                .push(format!("at {:.2} s: {e}", (t - started).as_secs_f64())),
                        }
                        drop(o);
                        std::thread::sleep(PERIOD.saturating_sub(took));
                    }
                })
                .unwrap();
        });
        Client {
            what: format!("{ns} -> {target}"),
            outcome,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Outcome {
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.outcome.lock().unwrap())
    }
}

/// Samples `node`'s routes of protocol 201 every 5 ms; records each time
/// `block` was missing.
fn sample_route(ns: &str, block: &str, stop: Arc<AtomicBool>) -> JoinHandle<(u32, Vec<String>)> {
    let netns = NetNs::open(format!("/run/netns/{ns}")).unwrap();
    let nl = Netlink::in_netns(&netns).unwrap();
    let (block, ns) = (block.to_string(), ns.to_string());
    std::thread::spawn(move || {
        let (mut samples, mut missing) = (0, Vec::new());
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let routes = nl.routes(Family::V4).unwrap();
            samples += 1;
            if !routes
                .iter()
                .any(|r| r.dst.to_string() == block && r.protocol == 201)
            {
                missing.push(format!("{ns} at {:.2} s", started.elapsed().as_secs_f64()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (samples, missing)
    })
}

/// `ip monitor route` in `ns`: every change of its routing table, as it happens.
fn monitor(ns: &str) -> Child {
    Command::new("ip")
        .args(["-n", ns, "monitor", "route"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The `node status` of `node`'s agent, from its status socket.
fn node_status(lab: &TestLab, node: &str) -> String {
    let Ok(mut s) = UnixStream::connect(lab.state_dir().join(format!("{node}.sock"))) else {
        return String::new();
    };
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Whether every BGP session of `node` is up.
fn sessions_up(lab: &TestLab, node: &str, peers: usize) -> bool {
    let status = node_status(lab, node);
    status.matches("\"state\":\"up\"").count() == peers
}

fn block_of(ip: &str) -> String {
    let ip: Ipv4Addr = ip.parse().unwrap();
    format!("{}/26", Ipv4Addr::from(u32::from(ip) & !63))
}

#[test]
fn twenty_agent_crashes_under_load_lose_no_request_and_flap_no_route() {
    if !require_root("twenty_agent_crashes_under_load_lose_no_request_and_flap_no_route") {
        return;
    }
    let lab = TestLab::new("k");
    let out = lab.run(&["up", "--nodes", "3", "--pods-per-node", "1"]);
    assert!(!out.contains("agent NOT running"), "{out}");
    let svc = lab.state.path().join("svc.yaml");
    std::fs::write(
        &svc,
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: default\nspec:\n  clusterIP: {CLUSTER_IP}\n  selector:\n    app: echo\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n"),
    )
    .unwrap();
    lab.run(&["apply", "-f", svc.to_str().unwrap()]);
    let client_ns = format!("{}-pod-node-2-pod1", lab.prefix);
    let cluster: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
    let remote: SocketAddr = format!("{}:8080", lab.pod_ip("node-3-pod1"))
        .parse()
        .unwrap();
    let netns = NetNs::open(format!("/run/netns/{client_ns}")).unwrap();
    for target in [cluster, remote] {
        assert!(
            eventually(Duration::from_secs(30), || netns
                .run(|| get(target).is_ok())
                .unwrap()),
            "{target} never answered from {client_ns}"
        );
    }
    assert!(
        eventually(Duration::from_secs(30), || sessions_up(&lab, "node-2", 2)),
        "node-2's sessions: {}",
        node_status(&lab, "node-2")
    );
    let block = block_of(&lab.pod_ip("node-2-pod1"));
    let others = [
        format!("{}-node-1", lab.prefix),
        format!("{}-node-3", lab.prefix),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let monitors: Vec<Child> = others.iter().map(|ns| monitor(ns)).collect();
    let samplers: Vec<_> = (others.iter())
        .map(|ns| sample_route(ns, &block, Arc::clone(&stop)))
        .collect();
    let clients = [
        Client::start(&client_ns, cluster, Arc::clone(&stop)),
        Client::start(&client_ns, remote, Arc::clone(&stop)),
    ];
    let started = Instant::now();
    for cycle in 1..=CYCLES {
        let killed = lab.run(&["agent", "kill", "node-2"]);
        assert!(killed.contains("SIGKILL"), "{killed}");
        // Every third crash stays down a while (the peers' sessions drop and
        // retry meanwhile); the others come back at once.
        if cycle % 3 == 0 {
            std::thread::sleep(DOWNTIME);
        }
        let back = lab.run(&["agent", "start", "node-2"]);
        assert!(back.contains("agent started"), "cycle {cycle}: {back}");
        assert!(
            eventually(Duration::from_secs(30), || sessions_up(&lab, "node-2", 2)),
            "cycle {cycle}: node-2's sessions did not come back: {}",
            node_status(&lab, "node-2")
        );
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);

    let mut report = Vec::new();
    for c in clients {
        let what = c.what.clone();
        let o = c.finish();
        eprintln!(
            "{what}: {} ok, {} failed, slowest {:?}",
            o.ok,
            o.failures.len(),
            o.slowest
        );
        if o.ok < 100 {
            report.push(format!("{what}: only {} requests succeeded", o.ok));
        }
        report.extend(o.failures.into_iter().map(|f| format!("{what} {f}")));
    }
    for s in samplers {
        let (samples, missing) = s.join().unwrap();
        eprintln!("route samples: {samples}, missing: {}", missing.len());
        assert!(samples > 100, "{samples} route samples");
        report.extend(
            missing
                .into_iter()
                .map(|m| format!("route {block} missing on {m}")),
        );
    }
    for (ns, mut m) in others.iter().zip(monitors) {
        let _ = m.kill();
        let mut text = String::new();
        m.stdout.take().unwrap().read_to_string(&mut text).unwrap();
        let _ = m.wait();
        let ip = block.trim_end_matches("/26");
        for line in text
            .lines()
            .filter(|l| l.starts_with("Deleted") && l.contains(ip))
        {
            report.push(format!("{ns}: {line}"));
        }
    }
    assert!(
        report.is_empty(),
        "{CYCLES} restarts of node-2's agent in {took:?}:\n{}",
        report.join("\n")
    );
}
