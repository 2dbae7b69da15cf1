//! End-to-end tests of `tabby-lab up --kubernetes`: a real control plane,
//! containerd and kubelets in the lab's node namespaces, with Tabby (the
//! plugin exec'd by containerd, the agents' BGP and proxy) or the reference
//! ptp + host-local plugins and kube-proxy as the pod network, the echo
//! Deployment and the seeds' Services from lab/examples/k8s. They need root, the
//! upstream binaries (`bash scripts/upstream.sh`), runc, cgroup v1 and the
//! musl target (the images are built from static binaries).
//!
//! Each cluster takes both cores for a while: the tests here run one at a time.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// One cluster at a time.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/k8s")
}

/// `tabby-lab kubectl ARGS`, failing the test on a non-zero exit.
fn kubectl(lab: &TestLab, args: &[&str]) -> String {
    let mut all = vec!["kubectl"];
    all.extend_from_slice(args);
    lab.run(&all)
}

fn kubectl_json(lab: &TestLab, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&kubectl(lab, &all)).unwrap()
}

/// The echo pods that are Ready: name -> (node, IP).
fn ready_echo_pods(lab: &TestLab) -> BTreeMap<String, (String, String)> {
    let list = kubectl_json(lab, &["get", "pods", "-l", "app=echo"]);
    let mut pods = BTreeMap::new();
    for pod in list["items"].as_array().unwrap() {
        let ready = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
        if ready && !deleting {
            pods.insert(
                pod["metadata"]["name"].as_str().unwrap().to_string(),
                (
                    pod["spec"]["nodeName"].as_str().unwrap().to_string(),
                    pod["status"]["podIP"].as_str().unwrap().to_string(),
                ),
            );
        }
    }
    pods
}

/// Every pod of the namespace `default`, whatever its state.
fn all_pods(lab: &TestLab) -> usize {
    kubectl_json(lab, &["get", "pods"])["items"]
        .as_array()
        .unwrap()
        .len()
}

/// The pool's IPS IN USE, from `tabbyctl ipam show` on the lab's datastore.
fn ips_in_use(lab: &TestLab) -> u64 {
    let out = lab.run(&["tabbyctl", "ipam", "show"]);
    tabby_testkit::ipam::pool_in_use(&out).unwrap_or_else(|| panic!("no IPS IN USE in {out}"))
}

/// GETs echo pod `to` (name, IP) from pod `from` and checks `to` answered;
/// the body.
fn answered_by(lab: &TestLab, from: &str, to: &(String, String)) -> String {
    let body = get_from_pod(lab, from, &format!("http://{}:8080/", to.1), 1);
    assert!(body.contains(&format!("Hostname: {}\n", to.0)), "{body}");
    body
}

/// The DaemonSet's pods (`pod/NAME` lines), with more `kubectl get` flags.
fn tabby_pods(lab: &TestLab, more: &[&str]) -> String {
    let mut args = vec![
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=tabby",
        "-o",
        "name",
    ];
    args.extend_from_slice(more);
    kubectl(lab, &args)
}

/// `tabby-echo get` from inside `pod` (the real CRI exec path).
fn get_from_pod(lab: &TestLab, pod: &str, url: &str, count: u32) -> String {
    let count = count.to_string();
    kubectl(
        lab,
        &[
            "exec",
            pod,
            "--",
            "tabby-echo",
            "get",
            "--count",
            &count,
            url,
        ],
    )
}

fn hostnames(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("Hostname: "))
        .map(str::to_string)
        .collect()
}

/// The (pid, start time) of every process in the lab's cgroups.
fn cgroup_processes(prefix: &str) -> BTreeSet<(i32, String)> {
    let mut found = BTreeSet::new();
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return found;
    };
    for h in hierarchies.flatten() {
        for group in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            if group
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
            {
                collect(&group.path(), &mut found);
            }
        }
    }
    found
}

fn collect(dir: &Path, found: &mut BTreeSet<(i32, String)>) {
    for line in std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
    {
        if let Ok(pid) = line.trim().parse::<i32>() {
            found.insert((pid, start_time(pid).unwrap_or_default()));
        }
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect(&entry.path(), found);
        }
    }
}

/// A killed process its new parent (PID 1 here) has not reaped yet: dead.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .is_some_and(|i| s[i + 1..].trim_start().starts_with('Z'))
    })
}

fn start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// The lab's cgroups that still exist, in any hierarchy.
fn cgroups_left(prefix: &str) -> Vec<String> {
    let mut left = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for group in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            let name = group.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}-")) {
                left.push(group.path().display().to_string());
            }
        }
    }
    left
}

/// Mount points at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_string)
        .collect()
}

/// Processes whose command line names the lab's state dir or namespaces.
fn lab_processes(lab: &TestLab) -> Vec<String> {
    let needles = [
        lab.state_dir().display().to_string(),
        format!("/run/netns/{}-", lab.prefix),
    ];
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie =
            std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| s.contains(") Z "));
        if !zombie && needles.iter().any(|n| cmdline.contains(n.as_str())) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Asserts that nothing of the lab is left: namespaces, mounts under the
/// state dir, processes (also those seen in its cgroups before), cgroups,
/// the state dir.
fn assert_nothing_left(lab: &TestLab, seen: &BTreeSet<(i32, String)>) {
    assert_eq!(
        lab.namespaces(),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    assert_eq!(
        mounts_under(&lab.state_dir()),
        Vec::<String>::new(),
        "mounts left behind"
    );
    assert_eq!(
        lab_processes(lab),
        Vec::<String>::new(),
        "processes left behind"
    );
    let alive: Vec<_> = seen
        .iter()
        .filter(|(pid, start)| start_time(*pid).as_ref() == Some(start) && !is_zombie(*pid))
        .collect();
    assert!(
        alive.is_empty(),
        "processes of the lab's cgroups still run: {alive:?}"
    );
    assert_eq!(
        cgroups_left(&lab.prefix),
        Vec::<String>::new(),
        "cgroups left behind"
    );
    assert!(!lab.state_dir().exists(), "state dir left behind");
}

fn require_cluster_parts(test: &str) -> bool {
    if !tabby_testkit::require_root(test) {
        return false;
    }
    let kubelet = tabby_testkit::bins::upstream_dir().join("kubelet");
    if !kubelet.exists() {
        return tabby_testkit::skip_or_fail(
            test,
            "the upstream binaries are not built (bash scripts/upstream.sh)",
        );
    }
    true
}

/// Echo pods on `node` of `pods`: (name, IP).
fn on_node(pods: &BTreeMap<String, (String, String)>, node: &str) -> Vec<(String, String)> {
    pods.iter()
        .filter(|(_, (n, _))| n == node)
        .map(|(p, (_, ip))| (p.clone(), ip.clone()))
        .collect()
}

/// The pod sandboxes containerd runs on `node` (containers of the pause image).
fn sandboxes(lab: &TestLab, node: &str) -> Vec<String> {
    let out = lab.run(&[
        "exec",
        node,
        "--",
        "ctr",
        "-n",
        "k8s.io",
        "containers",
        "ls",
    ]);
    out.lines()
        .skip(1)
        .filter(|l| l.contains("lab.tabby.dev/pause:dev"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn a_tabby_cluster_connects_pods_across_nodes_and_serves_cluster_ips_and_down_leaves_nothing() {
    let test =
        "a_tabby_cluster_connects_pods_across_nodes_and_serves_cluster_ips_and_down_leaves_nothing";
    if !require_cluster_parts(test) {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let lab = TestLab::new("kt");
    let started = Instant::now();
    let out = lab.run(&["up", "--kubernetes", "--nodes", "2"]);
    eprintln!(
        "UP --kubernetes (tabby) took {:.1?}\n{out}",
        started.elapsed()
    );
    assert!(out.contains("every node Ready (2)"), "{out}");
    assert!(out.contains("BGP full mesh Established"), "{out}");

    kubectl(&lab, &["apply", "-f", &examples().display().to_string()]);
    tabby_testkit::wait_until("4 echo pods Ready", Duration::from_secs(120), || {
        ready_echo_pods(&lab).len() == 4
    });
    let pods = ready_echo_pods(&lab);
    let (one, two) = (on_node(&pods, "node-1"), on_node(&pods, "node-2"));
    assert_eq!(
        (one.len(), two.len()),
        (2, 2),
        "spread over both nodes: {pods:?}"
    );
    assert!(
        pods.values().all(|(_, ip)| ip.starts_with("10.244.")),
        "Tabby's pool: {pods:?}"
    );

    // Through the real CRI path: containerd exec'd the plugin for the
    // sandbox of each echo pod (the DaemonSet's pod has the host's network:
    // no CNI call for its sandbox).
    for (node, echo) in [("node-1", &one), ("node-2", &two)] {
        // The plugin's default log, in the node's private /var/log.
        let path = lab
            .state_dir()
            .join(format!("nodes/{node}/var-log/tabby/cni.log"));
        let log =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ids = sandboxes(&lab, node);
        let wired: Vec<&String> = ids
            .iter()
            .filter(|id| log.contains(&format!("container={id}")))
            .collect();
        assert_eq!(
            wired.len(),
            echo.len(),
            "{node}: sandboxes {ids:?}, CNI calls for {wired:?}"
        );
    }

    // Pod to pod across nodes over TCP, the client's address kept.
    let body = answered_by(&lab, &one[0].0, &two[0]);
    assert!(
        body.contains(&format!("RemoteAddr: {}:", one[0].1)),
        "{body}"
    );
    answered_by(&lab, &two[1].0, &one[1]);

    // The ClusterIP spreads over endpoints on both nodes (Tabby's proxy).
    let mut answered = BTreeSet::new();
    tabby_testkit::wait_until(
        "the ClusterIP answers from both nodes' pods",
        Duration::from_secs(30),
        || {
            let out = lab
                .cmd(&[
                    "kubectl",
                    "exec",
                    &one[0].0,
                    "--",
                    "tabby-echo",
                    "get",
                    "--count",
                    "20",
                    "http://10.96.0.10/",
                ])
                .output()
                .unwrap();
            answered = hostnames(&String::from_utf8_lossy(&out.stdout));
            answered.iter().any(|h| one.iter().any(|(p, _)| p == h))
                && answered.iter().any(|h| two.iter().any(|(p, _)| p == h))
        },
    );
    assert!(
        answered.iter().all(|h| pods.contains_key(h)),
        "{answered:?}"
    );

    // Node-1's Tabby pod deleted: the DaemonSet makes a new one, and the
    // pods keep talking across nodes meanwhile and after (the routes stay
    // in the kernel while no agent runs; the new agent takes them over).
    let old = tabby_pods(&lab, &["--field-selector", "spec.nodeName=node-1"]);
    let old = old.trim();
    assert!(old.starts_with("pod/tabby-node-"), "{old:?}");
    kubectl(&lab, &["-n", "kube-system", "delete", old, "--wait=false"]);
    answered_by(&lab, &one[0].0, &two[0]);
    kubectl(
        &lab,
        &[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/tabby-node",
            "--timeout=120s",
        ],
    );
    let pods_now = tabby_pods(&lab, &[]);
    assert!(!pods_now.contains(old), "{old} still there: {pods_now}");
    answered_by(&lab, &one[0].0, &two[0]);
    answered_by(&lab, &two[0].0, &one[0]);

    // Scaling down releases the addresses of the deleted pods.
    assert_eq!(ips_in_use(&lab), 4);
    kubectl(&lab, &["scale", "deployment/echo", "--replicas=2"]);
    tabby_testkit::wait_until(
        "2 echo pods and 2 addresses in use",
        Duration::from_secs(60),
        || all_pods(&lab) == 2 && ips_in_use(&lab) == 2,
    );

    // The agents' own view, from their sockets in the nodes' /run (both
    // sessions Established again after node-1's new agent), and the blocks
    // of the Kubernetes datastore.
    let mut status = String::new();
    tabby_testkit::wait_until(
        "status showing both nodes' sessions Established",
        Duration::from_secs(60),
        || {
            status = lab.run(&["status"]);
            status.matches("| Established |").count() == 2
        },
    );
    assert!(
        status.contains("tabby-node") && status.contains("kubeconfig: "),
        "{status}"
    );
    assert!(status.contains("--- tabbyctl node status"), "{status}");
    assert!(
        status.contains("=== IPAM") && status.contains("10.244."),
        "{status}"
    );
    let seen = cgroup_processes(&lab.prefix);
    assert!(
        seen.len() > 10,
        "containerd, kubelets, shims, pods: {seen:?}"
    );
    let started = Instant::now();
    let down = lab.run(&["down"]);
    eprintln!("DOWN took {:.1?}\n{down}", started.elapsed());
    assert_nothing_left(&lab, &seen);
}

#[test]
fn a_reference_cluster_serves_pods_services_and_node_ports_and_down_leaves_nothing() {
    if !require_cluster_parts(
        "a_reference_cluster_serves_pods_services_and_node_ports_and_down_leaves_nothing",
    ) {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let lab = TestLab::new("k");
    let started = Instant::now();
    let out = lab.run(&["up", "--kubernetes", "--nodes", "2", "--cni", "reference"]);
    eprintln!("UP --kubernetes took {:.1?}\n{out}", started.elapsed());
    assert!(out.contains("every node Ready (2)"), "{out}");
    let nodes = kubectl_json(&lab, &["get", "nodes"]);
    assert_eq!(nodes["items"].as_array().unwrap().len(), 2);
    let status = lab.run(&["status"]);
    assert!(
        status.contains("kubeconfig: ") && status.contains("node-2"),
        "{status}"
    );

    // The echo Deployment and the Services.
    kubectl(&lab, &["apply", "-f", &examples().display().to_string()]);
    tabby_testkit::wait_until("4 echo pods Ready", Duration::from_secs(120), || {
        ready_echo_pods(&lab).len() == 4
    });
    let pods = ready_echo_pods(&lab);
    let on = |node: &str| -> Vec<(String, String)> {
        pods.iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(p, (_, ip))| (p.clone(), ip.clone()))
            .collect()
    };
    let (one, two) = (on("node-1"), on("node-2"));
    assert_eq!(
        (one.len(), two.len()),
        (2, 2),
        "spread over both nodes: {pods:?}"
    );
    assert!(
        one.iter().all(|(_, ip)| ip.starts_with("10.244.1.")),
        "{one:?}"
    );
    assert!(
        two.iter().all(|(_, ip)| ip.starts_with("10.244.2.")),
        "{two:?}"
    );

    // Pod to pod across nodes over TCP, the client's address kept.
    let body = answered_by(&lab, &one[0].0, &two[0]);
    assert!(
        body.contains(&format!("RemoteAddr: {}:", one[0].1)),
        "{body}"
    );
    answered_by(&lab, &two[1].0, &one[1]);

    // The ClusterIP spreads over endpoints on both nodes (kube-proxy).
    let spread = get_from_pod(&lab, &one[0].0, "http://10.96.0.10/", 40);
    let answered = hostnames(&spread);
    assert!(
        answered.iter().any(|h| one.iter().any(|(p, _)| p == h)),
        "{answered:?}"
    );
    assert!(
        answered.iter().any(|h| two.iter().any(|(p, _)| p == h)),
        "{answered:?}"
    );

    // NodePort from a client outside the cluster, on each node.
    let client = env!("CARGO_BIN_EXE_tabby-lab");
    for node_ip in ["10.98.0.1", "10.98.0.2"] {
        let out = lab.run(&[
            "exec",
            "external",
            "--",
            client,
            "http-get",
            &format!("http://{node_ip}:30080/"),
        ]);
        let from: BTreeSet<String> = hostnames(&out);
        assert!(
            from.iter().all(|h| pods.contains_key(h)) && !from.is_empty(),
            "{out}"
        );
    }

    // Scale down: one pod left, the others gone with their addresses.
    kubectl(&lab, &["scale", "deployment/echo", "--replicas=1"]);
    tabby_testkit::wait_until("one echo pod left", Duration::from_secs(90), || {
        all_pods(&lab) == 1
    });
    let left = ready_echo_pods(&lab);
    assert_eq!(left.len(), 1, "{left:?}");
    let leases: usize = ["node-1", "node-2"]
        .iter()
        .map(|n| {
            let dir = lab
                .state_dir()
                .join(format!("nodes/{n}/var-lib-cni/networks/lab-ptp"));
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
                        .count()
                })
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(leases, 1, "host-local released the deleted pods' addresses");
    let (survivor, _) = left.iter().next().unwrap();
    let only = get_from_pod(&lab, survivor, "http://10.96.0.10/", 10);
    assert_eq!(
        hostnames(&only),
        BTreeSet::from([survivor.clone()]),
        "{only}"
    );

    let seen = cgroup_processes(&lab.prefix);
    assert!(
        seen.len() > 10,
        "containerd, kubelets, shims, pods: {seen:?}"
    );
    let started = Instant::now();
    let down = lab.run(&["down"]);
    eprintln!("DOWN took {:.1?}\n{down}", started.elapsed());
    assert_nothing_left(&lab, &seen);
}

#[test]
fn down_after_up_was_killed_half_way_leaves_nothing() {
    if !require_cluster_parts("down_after_up_was_killed_half_way_leaves_nothing") {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let lab = TestLab::new("kc");
    let mut up = lab
        .cmd(&["up", "--kubernetes", "--nodes", "1", "--cni", "reference"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the kubelet runs: containerd, the node's mounts, the
    // control plane and the forwarder are all there by then.
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let reached = loop {
        match lines.next() {
            Some(Ok(line)) => {
                let hit = line.contains("kubelets started");
                printed.push(line);
                if hit {
                    break true;
                }
            }
            _ => break false,
        }
    };
    assert!(
        reached,
        "up never started its kubelets:\n{}",
        printed.join("\n")
    );
    up.kill().unwrap();
    let _ = up.wait();
    let seen = cgroup_processes(&lab.prefix);
    assert!(!seen.is_empty(), "the half-built cluster has processes");
    assert!(!mounts_under(&lab.state_dir()).is_empty(), "and mounts");

    let down = lab.run(&["down"]);
    assert!(down.contains("removed"), "{down}");
    assert_nothing_left(&lab, &seen);
    // Idempotent.
    assert!(lab.run(&["down"]).contains("nothing to clean up"));
}
