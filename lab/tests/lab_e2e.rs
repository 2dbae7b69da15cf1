//! End-to-end tests of `tabby-lab` with real namespaces, the real `tabby`
//! plugin and real echo servers. They need root and the release binaries
//! (`cargo build --release -p tabby-lab -p tabby-cni -p tabby-ctl`); each
//! test uses its own namespace prefix and state directory, so they run in
//! parallel with each other and with a developer's lab.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

#[test]
fn pods_on_the_same_node_reach_each_other_and_down_leaves_nothing_behind() {
    if !require_root("pods_on_the_same_node_reach_each_other_and_down_leaves_nothing_behind") {
        return;
    }
    let lab = TestLab::new("e");
    let out = lab.run(&["up", "--nodes", "2", "--pods-per-node", "2"]);
    for pod in ["node-1-pod1", "node-1-pod2", "node-2-pod1", "node-2-pod2"] {
        assert!(out.contains(&format!("pod {pod} 10.244.")), "{out}");
        assert!(lab
            .namespaces()
            .contains(&format!("{}-pod-{pod}", lab.prefix)));
    }
    assert!(
        out.contains("[1/2] node-1") && out.contains("[2/2] node-2"),
        "{out}"
    );

    assert_echo(&lab, "node-1-pod1", "node-1-pod2");
    assert_echo(&lab, "node-1-pod2", "node-1-pod1");
    assert_echo(&lab, "node-2-pod2", "node-2-pod1");

    // exec reaches pods, nodes and the external client, and passes the exit status through.
    let addr = lab.run(&[
        "exec", "external", "--", "ip", "-4", "-br", "addr", "show", "eth0",
    ]);
    assert!(addr.contains("10.98.0.200/24"), "{addr}");
    let routes = lab.run(&["exec", "node-1", "--", "ip", "route"]);
    assert!(
        routes.contains(&format!("{} dev tabby", lab.pod_ip("node-1-pod1"))),
        "{routes}"
    );
    let status = lab
        .cmd(&["exec", "node-2-pod1", "--", "sh", "-c", "exit 3"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));

    // pod add / pod del, and the EndpointSlice that follows them.
    let svc = lab.state.path().join("svc.yaml");
    std::fs::write(&svc, "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n").unwrap();
    lab.run(&["apply", "-f", svc.to_str().unwrap()]);
    let added = lab.run(&["pod", "add", "node-2", "web", "--labels", "app=web"]);
    assert!(added.contains("pod web 10.244."), "{added}");
    let slice = lab
        .state_dir()
        .join("resources/endpointslice-default-web-tabby-lab.yaml");
    assert!(std::fs::read_to_string(&slice)
        .unwrap()
        .contains(&lab.pod_ip("web")));
    assert_echo(&lab, "node-2-pod1", "web");
    lab.run(&["pod", "del", "web"]);
    assert!(!lab
        .namespaces()
        .contains(&format!("{}-pod-web", lab.prefix)));
    assert!(std::fs::read_to_string(&slice)
        .unwrap()
        .contains("endpoints: []"));

    let down = lab.run(&["down"]);
    assert!(down.contains("deleted"), "{down}");
    lab.assert_gone();
    // Idempotent.
    assert!(lab.run(&["down"]).contains("nothing to clean up"));
}

#[test]
fn down_cleans_up_after_up_is_killed_half_way() {
    if !require_root("down_cleans_up_after_up_is_killed_half_way") {
        return;
    }
    let lab = TestLab::with_idle_agents("k");
    let mut up = lab
        .cmd(&["up", "--nodes", "3", "--pods-per-node", "2"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Node 1 is done (its pods answer) and node 2 is being built.
    let first_node_done = eventually(Duration::from_secs(60), || {
        lab.state().is_some_and(|s| {
            let pods = s["pods"].as_array().cloned().unwrap_or_default();
            let ready = pods
                .iter()
                .filter(|p| p["node"] == "node-1" && p["ready"] == true)
                .count();
            ready == 2 && s["nodes"].as_array().is_some_and(|n| n.len() >= 2)
        })
    });
    up.kill().unwrap();
    up.wait().unwrap();
    assert!(
        first_node_done,
        "up never finished node-1: {:?}",
        lab.state()
    );
    assert!(
        lab.namespaces().len() >= 4,
        "too little was built to test: {:?}",
        lab.namespaces()
    );
    assert!(
        !lab.processes().is_empty(),
        "no agent or echo server was running"
    );

    let down = lab.run(&["down"]);
    assert!(down.contains("stopped"), "{down}");
    lab.assert_gone();
}

/// `ip -n NS route show proto 201` of a node: the routes tabby-node owns.
fn tabby_routes(lab: &TestLab, node: &str) -> Vec<String> {
    let ns = format!("{}-{node}", lab.prefix);
    let out = Command::new("ip")
        .args(["-n", &ns, "route", "show", "proto", "201"])
        .output()
        .unwrap();
    let mut r: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    r.sort();
    r
}

/// What node `i` (1-based) of `n` must own: a blackhole for its block, a route via each other node to theirs.
fn expected_routes(lab: &TestLab, i: usize, n: usize) -> Vec<String> {
    let block = |k: usize| {
        let ip: std::net::Ipv4Addr = lab.pod_ip(&format!("node-{k}-pod1")).parse().unwrap();
        let o = ip.octets();
        format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3] & 0xc0)
    };
    let mut want: Vec<String> = (1..=n)
        .map(|k| {
            if k == i {
                format!("blackhole {}", block(k))
            } else {
                format!("{} via 10.98.0.{k} dev eth0", block(k))
            }
        })
        .collect();
    want.sort();
    want
}

fn all_pods_reach_each_other(lab: &TestLab, pods: &[&str]) {
    for from in pods {
        for to in pods.iter().filter(|to| *to != from) {
            let to_ip = lab.pod_ip(to);
            let reached = eventually(Duration::from_secs(30), || {
                lab.http_get(from, &to_ip, 500).status.success()
            });
            assert!(reached, "{from} never reached {to} ({to_ip})");
            assert_echo(lab, from, to);
        }
    }
}

#[test]
fn pods_on_different_nodes_reach_each_other_and_survive_an_agent_crash() {
    if !require_root("pods_on_different_nodes_reach_each_other_and_survive_an_agent_crash") {
        return;
    }
    let lab = TestLab::new("x");
    let out = lab.run(&["up", "--nodes", "3", "--pods-per-node", "2"]);
    assert!(!out.contains("agent NOT running"), "{out}");
    let pods = [
        "node-1-pod1",
        "node-1-pod2",
        "node-2-pod1",
        "node-2-pod2",
        "node-3-pod1",
        "node-3-pod2",
    ];
    all_pods_reach_each_other(&lab, &pods);
    for i in 1..=3 {
        let want = expected_routes(&lab, i, 3);
        assert!(
            eventually(Duration::from_secs(10), || tabby_routes(
                &lab,
                &format!("node-{i}")
            ) == want),
            "node-{i}: {:?} != {want:?}",
            tabby_routes(&lab, &format!("node-{i}"))
        );
    }
    // No encapsulation: cross-node routes go straight out of the uplink.
    assert!(tabby_routes(&lab, "node-1")
        .iter()
        .all(|r| !r.contains("tunl0") && !r.contains("vxlan")));

    // A crash: the agent dies, its routes stay; a stale route of ours appears meanwhile.
    let killed = lab.run(&["agent", "kill", "node-2"]);
    assert!(killed.contains("SIGKILL"), "{killed}");
    let ns2 = format!("{}-node-2", lab.prefix);
    let stale = Command::new("ip")
        .args([
            "-n",
            &ns2,
            "route",
            "add",
            "10.244.250.0/26",
            "via",
            "10.98.0.3",
            "dev",
            "eth0",
            "proto",
            "201",
        ])
        .status()
        .unwrap();
    assert!(stale.success());
    let started = lab.run(&["agent", "start", "node-2"]);
    assert!(started.contains("agent started"), "{started}");
    let want2 = expected_routes(&lab, 2, 3);
    assert!(
        eventually(Duration::from_secs(45), || tabby_routes(&lab, "node-2")
            == want2),
        "after the restart node-2 owns {:?}, want {want2:?}",
        tabby_routes(&lab, "node-2")
    );
    for i in [1, 3] {
        let want = expected_routes(&lab, i, 3);
        assert!(
            eventually(Duration::from_secs(45), || tabby_routes(
                &lab,
                &format!("node-{i}")
            ) == want),
            "node-{i} after the restart"
        );
    }
    all_pods_reach_each_other(&lab, &pods);
    lab.run(&["down"]);
    lab.assert_gone();
}
