//! The service proxy end to end in the lab: real pods, real iptables or
//! nftables in every node namespace, real HTTP requests (root only; each test
//! has its own lab). Every test runs in both proxy modes
//! (`tabby-lab up --proxy-mode iptables|nftables`).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tabby_testkit::{current_test, eventually_every};

const CLUSTER_IP: &str = "10.96.0.10";

fn apply(lab: &TestLab, yaml: &str) {
    let file = lab.state.path().join(format!("apply-{}.yaml", yaml.len()));
    std::fs::write(&file, yaml).unwrap();
    lab.run(&["apply", "-f", &file.display().to_string()]);
}

fn service(name: &str, ip: &str, selector: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {ip}\n  selector:\n    {selector}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n{extra}"
    )
}

/// `n` GETs from `from` (a pod, or `external`) to `url`: the count of answers by Hostname, and failures
/// (which are printed).
fn requests(lab: &TestLab, from: &str, url: &str, n: u32) -> (BTreeMap<String, u32>, u32) {
    let out = lab
        .cmd(&[
            "exec",
            from,
            "--",
            "tabby-lab",
            "http-get",
            "--timeout-ms",
            "2000",
            "--count",
            &n.to_string(),
            url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut by_host = BTreeMap::new();
    for l in text.lines() {
        if let Some(h) = l.strip_prefix("Hostname: ") {
            *by_host.entry(h.to_string()).or_insert(0) += 1;
        }
    }
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    for e in &errors {
        eprintln!("{from} -> {url}: {e}");
    }
    let failures = errors.len() as u32;
    (by_host, failures)
}

/// One GET; its body or the error.
fn get(lab: &TestLab, from: &str, url: &str, timeout_ms: u32) -> Result<String, String> {
    let out = lab
        .cmd(&[
            "exec",
            from,
            "--",
            "tabby-lab",
            "http-get",
            "--timeout-ms",
            &timeout_ms.to_string(),
            url,
        ])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(text(&out))
    }
}

/// Waits until the proxy answers `url` from `from`.
fn wait_for(lab: &TestLab, from: &str, url: &str) {
    assert!(
        eventually(Duration::from_secs(20), || get(lab, from, url, 500).is_ok()),
        "{url} never answered from {from}: {:?}",
        get(lab, from, url, 500)
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }

    /// One letter for the lab's tag.
    fn tag(self) -> &'static str {
        match self {
            Mode::Iptables => "i",
            Mode::Nftables => "n",
        }
    }
}

/// The proxy's rules on `node`: `iptables-save -t nat` or `nft list table ip tabby-proxy`.
fn proxy_rules(lab: &TestLab, mode: Mode, node: &str) -> String {
    let ns = format!("{}-{node}", lab.prefix);
    let args: &[&str] = match mode {
        Mode::Iptables => &["iptables-save", "-t", "nat"],
        Mode::Nftables => &["nft", "list", "table", "ip", "tabby-proxy"],
    };
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn up(tag: &str, mode: Mode, pods_per_node: &str) -> TestLab {
    let lab = TestLab::new(&format!("{tag}{}", mode.tag()));
    let out = lab.run(&[
        "up",
        "--nodes",
        "3",
        "--pods-per-node",
        pods_per_node,
        "--proxy-mode",
        mode.name(),
    ]);
    assert!(!out.contains("agent NOT running"), "{out}");
    lab
}

/// Each scenario as one test per mode.
macro_rules! both_modes {
    ($scenario:ident, $iptables:ident, $nftables:ident) => {
        #[test]
        fn $iptables() {
            $scenario(Mode::Iptables);
        }
        #[test]
        fn $nftables() {
            $scenario(Mode::Nftables);
        }
    };
}

both_modes!(
    cluster_ip_spread,
    a_cluster_ip_spreads_requests_from_every_node_over_all_endpoints_and_hairpins,
    a_cluster_ip_spreads_requests_from_every_node_over_all_endpoints_and_hairpins_in_nftables_mode
);
both_modes!(
    session_affinity,
    session_affinity_keeps_a_client_on_one_endpoint_until_the_timeout,
    session_affinity_keeps_a_client_on_one_endpoint_until_the_timeout_in_nftables_mode
);
both_modes!(
    node_ports,
    node_ports_answer_outside_clients_on_every_node_and_local_policy_keeps_their_address,
    node_ports_answer_outside_clients_on_every_node_and_local_policy_keeps_their_address_in_nftables_mode
);
both_modes!(
    no_endpoints,
    a_service_without_endpoints_is_rejected_at_once,
    a_service_without_endpoints_is_rejected_at_once_in_nftables_mode
);
both_modes!(
    deleted_endpoint,
    a_deleted_endpoint_pod_leaves_the_rotation_within_a_second,
    a_deleted_endpoint_pod_leaves_the_rotation_within_a_second_in_nftables_mode
);

fn cluster_ip_spread(mode: Mode) {
    if !require_root(&current_test()) {
        return;
    }
    let lab = up("c", mode, "1");
    apply(&lab, &service("hello", CLUSTER_IP, "app: echo", ""));
    let url = format!("http://{CLUSTER_IP}/");
    for client in ["node-1-pod1", "node-2-pod1", "node-3-pod1"] {
        wait_for(&lab, client, &url);
        let (hosts, failures) = requests(&lab, client, &url, 100);
        assert_eq!(failures, 0, "{client}: {hosts:?}");
        assert_eq!(hosts.len(), 3, "{client} reached {hosts:?}");
        for (h, n) in &hosts {
            assert!(
                (15..=55).contains(n),
                "{client} -> {h}: {n} of 100 ({hosts:?})"
            );
        }
        // Hairpin: a pod reaches itself through its own service.
        assert!(
            hosts.get(client).copied().unwrap_or(0) > 0,
            "{client} never reached itself: {hosts:?}"
        );
    }
    let rules = proxy_rules(&lab, mode, "node-1");
    let want: &[&str] = match mode {
        Mode::Iptables => &[
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j TABBY-SERVICES",
            "-m statistic --mode random --probability 0.33333333349",
            "--comment \"default/hello:http cluster IP\"",
        ],
        Mode::Nftables => &[
            "type nat hook prerouting priority dstnat; policy accept;",
            "dnat ip to numgen random mod 3 ",
            "10.96.0.10 . tcp . 80 : goto service-",
        ],
    };
    for w in want {
        assert!(rules.contains(w), "{w} in:\n{rules}");
    }
}

fn session_affinity(mode: Mode) {
    if !require_root(&current_test()) {
        return;
    }
    let lab = up("a", mode, "1");
    let affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 5\n";
    apply(
        &lab,
        &service("sticky", "10.96.0.11", "app: echo", affinity),
    );
    let url = "http://10.96.0.11/";
    wait_for(&lab, "node-1-pod1", url);
    let (hosts, failures) = requests(&lab, "node-1-pod1", url, 100);
    assert_eq!(failures, 0);
    assert_eq!(hosts.len(), 1, "affinity broke: {hosts:?}");
    assert_eq!(hosts.values().sum::<u32>(), 100);
    let sticky = hosts.keys().next().unwrap().clone();
    let rules = proxy_rules(&lab, mode, "node-1");
    let want = match mode {
        Mode::Iptables => "--rcheck --seconds 5 --reap",
        Mode::Nftables => "timeout 5s",
    };
    assert!(rules.contains(want), "{want} in:\n{rules}");
    // Every request refreshes the client's entry, so only a 5 s silence lets
    // it move: probe with one request until it lands elsewhere, each probe
    // after the timeout has run out since the last one. Each new choice
    // stays with 1/3; failing to move in the ~10 probes of the deadline is
    // about 1 in 59049.
    let mut probes = Vec::new();
    let moved = eventually_every(Duration::from_secs(60), Duration::from_millis(5200), || {
        let (hosts, _) = requests(&lab, "node-1-pod1", url, 1);
        probes.push(hosts.keys().next().cloned().unwrap_or_default());
        hosts.keys().any(|h| *h != sticky)
    });
    assert!(
        moved,
        "the client never left {sticky} after the affinity timeout; probes: {probes:?}"
    );
}

fn node_ports(mode: Mode) {
    if !require_root(&current_test()) {
        return;
    }
    let lab = up("p", mode, "1");
    apply(
        &lab,
        &service("web", "10.96.0.12", "app: echo", "  type: NodePort\n").replace(
            "targetPort: 8080\n",
            "targetPort: 8080\n    nodePort: 30080\n",
        ),
    );
    let local = service(
        "local",
        "10.96.0.13",
        "tabby.dev/node: node-1",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
    )
    .replace(
        "targetPort: 8080\n",
        "targetPort: 8080\n    nodePort: 30081\n",
    );
    apply(&lab, &local);
    for i in 1..=3 {
        let url = format!("http://10.98.0.{i}:30080/");
        wait_for(&lab, "external", &url);
        let (hosts, failures) = requests(&lab, "external", &url, 20);
        assert_eq!(failures, 0, "node-{i}: {hosts:?}");
    }
    // externalTrafficPolicy: Local: served only where an endpoint lives, with the client's own address.
    let url = "http://10.98.0.1:30081/";
    wait_for(&lab, "external", url);
    let body = get(&lab, "external", url, 2000).unwrap();
    assert!(body.contains("Hostname: node-1-pod1"), "{body}");
    assert!(
        body.contains("RemoteAddr: 10.98.0.200:"),
        "the client address was not kept: {body}"
    );
    assert!(
        get(&lab, "external", "http://10.98.0.2:30081/", 1000).is_err(),
        "node-2 has no local endpoint and must not serve"
    );
    // The health check node port tells load balancers where endpoints are.
    wait_for(&lab, "external", "http://10.98.0.1:32000/");
    let health = get(&lab, "external", "http://10.98.0.1:32000/", 2000).unwrap();
    let compact: String = health.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(compact.contains("\"localEndpoints\":1"), "{health}");
    let none = get(&lab, "external", "http://10.98.0.2:32000/", 2000).unwrap_err();
    assert!(none.contains("503"), "{none}");
}

fn no_endpoints(mode: Mode) {
    if !require_root(&current_test()) {
        return;
    }
    let lab = up("r", mode, "1");
    apply(&lab, &service("empty", "10.96.0.14", "app: nothing", ""));
    apply(&lab, &service("hello", CLUSTER_IP, "app: echo", ""));
    wait_for(&lab, "node-1-pod1", &format!("http://{CLUSTER_IP}/"));
    let err = get(&lab, "node-1-pod1", "http://10.96.0.14/", 5000).unwrap_err();
    assert!(
        err.to_lowercase().contains("refused"),
        "expected a REJECT, got: {err}"
    );
}

fn deleted_endpoint(mode: Mode) {
    if !require_root(&current_test()) {
        return;
    }
    let lab = up("d", mode, "1");
    apply(&lab, &service("hello", CLUSTER_IP, "app: echo", ""));
    let url = format!("http://{CLUSTER_IP}/");
    wait_for(&lab, "node-1-pod1", &url);
    let gone_ip = lab.pod_ip("node-3-pod1");
    let dnat = match mode {
        Mode::Iptables => format!("--to-destination {gone_ip}:8080"),
        // An element of the endpoint maps the service chains dnat through.
        Mode::Nftables => format!("{gone_ip} . 8080"),
    };
    assert!(eventually(Duration::from_secs(10), || proxy_rules(
        &lab, mode, "node-1"
    )
    .contains(&dnat)));
    let start = Instant::now();
    lab.run(&["pod", "del", "node-3-pod1"]);
    let gone = eventually(Duration::from_secs(1), || {
        (1..=3).all(|i| !proxy_rules(&lab, mode, &format!("node-{i}")).contains(&dnat))
    });
    let took = start.elapsed();
    eprintln!("endpoint left every node's rules {took:?} after `pod del` started");
    assert!(
        gone,
        "the deleted pod is still a DNAT target after {took:?}"
    );
    let (hosts, failures) = requests(&lab, "node-1-pod1", &url, 40);
    assert_eq!(failures, 0, "{hosts:?}");
    assert!(!hosts.contains_key("node-3-pod1"), "{hosts:?}");
}
