//! End-to-end tests of `tabby-lab` with real namespaces, the real `tabby`
//! plugin and real echo servers. They need root and the release binaries
//! (`cargo build --release -p tabby-lab -p tabby-cni -p tabby-ctl`); each
//! test uses its own namespace prefix and state directory, so they run in
//! parallel with each other and with a developer's lab.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One lab under test, torn down on drop.
struct TestLab {
    prefix: String,
    state: tempfile::TempDir,
    bin_dir: PathBuf,
    /// A bin dir with a stand-in `tabby-node`, kept alive with the lab.
    _fake_bins: Option<tempfile::TempDir>,
}

impl TestLab {
    /// A lab named `tl<tag><pid>`, using the real binaries.
    fn new(tag: &str) -> TestLab {
        TestLab {
            prefix: format!("tl{tag}{}", std::process::id()),
            state: tempfile::tempdir().unwrap(),
            bin_dir: real_bin_dir(),
            _fake_bins: None,
        }
    }

    /// Like [`TestLab::new`], with a `tabby-node` that runs but never
    /// answers (so each node takes its agent's whole start window):
    /// `tail -f` of its config file, so its command line names the lab.
    fn with_idle_agents(tag: &str) -> TestLab {
        let fake = tempfile::tempdir().unwrap();
        let real = real_bin_dir();
        for bin in ["tabby", "tabby-ipam", "tabbyctl"] {
            std::os::unix::fs::symlink(real.join(bin), fake.path().join(bin)).unwrap();
        }
        let agent = fake.path().join("tabby-node");
        std::fs::write(&agent, "#!/bin/sh\nexec tail -f \"$2\"\n").unwrap();
        std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut lab = TestLab::new(tag);
        lab.bin_dir = fake.path().to_path_buf();
        lab._fake_bins = Some(fake);
        lab
    }

    /// `tabby-lab --prefix P --state-dir D --bin-dir B ARGS...`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tabby-lab"));
        cmd.arg("--prefix")
            .arg(&self.prefix)
            .arg("--state-dir")
            .arg(self.state_dir());
        cmd.arg("--bin-dir").arg(&self.bin_dir).args(args);
        cmd
    }

    /// Runs the lab with `args` and returns its output, failing on a non-zero exit.
    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "tabby-lab {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join("lab")
    }

    /// The parsed `lab.json`, if it exists and parses.
    fn state(&self) -> Option<Value> {
        let bytes = std::fs::read(self.state_dir().join("lab.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The address of pod `name`, from the state file.
    fn pod_ip(&self, name: &str) -> String {
        let state = self.state().expect("a state file");
        let pod = state["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .expect("the pod");
        pod["ip"].as_str().expect("an address").to_string()
    }

    /// `http-get` from inside `from` to `http://ip:8080/`.
    fn http_get(&self, from: &str, ip: &str, timeout_ms: u32) -> Output {
        let url = format!("http://{ip}:8080/");
        self.cmd(&[
            "exec",
            from,
            "--",
            "tabby-lab",
            "http-get",
            "--timeout-ms",
            &timeout_ms.to_string(),
            &url,
        ])
        .output()
        .unwrap()
    }

    /// Namespaces of this lab that still exist.
    fn namespaces(&self) -> Vec<String> {
        let mine = format!("{}-", self.prefix);
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&mine))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Live processes of this lab: echo servers (`--lab PREFIX`) and agents
    /// (their config file is in the state dir).
    fn processes(&self) -> Vec<String> {
        let lab_arg = format!("--lab\0{}\0", self.prefix);
        let agent_config = format!("{}/node-", self.state_dir().display());
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
            let zombie = std::fs::read_to_string(entry.path().join("stat"))
                .is_ok_and(|s| s.contains(") Z "));
            if !zombie && (cmdline.contains(&lab_arg) || cmdline.contains(&agent_config)) {
                found.push(format!(
                    "{}: {}",
                    entry.file_name().to_string_lossy(),
                    cmdline.replace('\0', " ")
                ));
            }
        }
        found
    }

    /// Asserts that `down` left no namespace, process or state file behind.
    fn assert_gone(&self) {
        assert_eq!(
            self.namespaces(),
            Vec::<String>::new(),
            "namespaces left behind"
        );
        assert_eq!(
            self.processes(),
            Vec::<String>::new(),
            "processes left behind"
        );
        assert!(!self.state_dir().exists(), "state dir left behind");
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.cmd(&["down"]).stdout(Stdio::null()).status();
    }
}

/// Where the real plugin and tabbyctl are: beside tabby-lab, else target/release.
fn real_bin_dir() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_tabby-lab"));
    let here = exe.parent().unwrap().to_path_buf();
    let dir = if here.join("tabby").is_file() {
        here
    } else {
        here.parent().unwrap().join("release")
    };
    for bin in ["tabby", "tabbyctl"] {
        assert!(
            dir.join(bin).is_file(),
            "{} missing: cargo build --release -p tabby-lab -p tabby-cni -p tabby-ctl",
            dir.join(bin).display()
        );
    }
    dir
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Root is needed for namespaces; without it the test says so and passes.
fn is_root() -> bool {
    // /proc/self belongs to the process's effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

/// Polls `check` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    check()
}

/// Asserts that `from` gets an echo answer from pod `to` showing `to`'s
/// hostname and address and `from`'s address as the client.
fn assert_echo(lab: &TestLab, from: &str, to: &str) {
    let (from_ip, to_ip) = (lab.pod_ip(from), lab.pod_ip(to));
    let out = lab.http_get(from, &to_ip, 5000);
    let body = text(&out);
    assert!(out.status.success(), "{from} -> {to} failed: {body}");
    assert!(body.contains(&format!("Hostname: {to}\n")), "{body}");
    assert!(body.contains(&format!("IP: {to_ip}\n")), "{body}");
    assert!(body.contains(&format!("RemoteAddr: {from_ip}:")), "{body}");
    assert!(body.contains("GET / HTTP/1.1\n"), "{body}");
}

#[test]
fn pods_on_the_same_node_reach_each_other_and_down_leaves_nothing_behind() {
    if !is_root() {
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
    std::fs::write(&svc, "kind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n").unwrap();
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
    if !is_root() {
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
    let out = Command::new("ip").args(["-n", &ns, "route", "show", "proto", "201"]).output().unwrap();
    let mut r: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).collect();
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
        .map(|k| if k == i { format!("blackhole {}", block(k)) } else { format!("{} via 10.98.0.{k} dev eth0", block(k)) })
        .collect();
    want.sort();
    want
}

fn all_pods_reach_each_other(lab: &TestLab, pods: &[&str]) {
    for from in pods {
        for to in pods.iter().filter(|to| *to != from) {
            let to_ip = lab.pod_ip(to);
            let reached = eventually(Duration::from_secs(30), || lab.http_get(from, &to_ip, 500).status.success());
            assert!(reached, "{from} never reached {to} ({to_ip})");
            assert_echo(lab, from, to);
        }
    }
}

#[test]
fn pods_on_different_nodes_reach_each_other_and_survive_an_agent_crash() {
    if !is_root() {
        return;
    }
    let lab = TestLab::new("x");
    let out = lab.run(&["up", "--nodes", "3", "--pods-per-node", "2"]);
    assert!(!out.contains("agent NOT running"), "{out}");
    let pods = ["node-1-pod1", "node-1-pod2", "node-2-pod1", "node-2-pod2", "node-3-pod1", "node-3-pod2"];
    all_pods_reach_each_other(&lab, &pods);
    for i in 1..=3 {
        let want = expected_routes(&lab, i, 3);
        assert!(eventually(Duration::from_secs(10), || tabby_routes(&lab, &format!("node-{i}")) == want), "node-{i}: {:?} != {want:?}", tabby_routes(&lab, &format!("node-{i}")));
    }
    // No encapsulation: cross-node routes go straight out of the uplink.
    assert!(tabby_routes(&lab, "node-1").iter().all(|r| !r.contains("tunl0") && !r.contains("vxlan")));

    // A crash: the agent dies, its routes stay; a stale route of ours appears meanwhile.
    let killed = lab.run(&["agent", "kill", "node-2"]);
    assert!(killed.contains("SIGKILL"), "{killed}");
    let ns2 = format!("{}-node-2", lab.prefix);
    let stale = Command::new("ip")
        .args(["-n", &ns2, "route", "add", "10.244.250.0/26", "via", "10.98.0.3", "dev", "eth0", "proto", "201"])
        .status()
        .unwrap();
    assert!(stale.success());
    let started = lab.run(&["agent", "start", "node-2"]);
    assert!(started.contains("agent started"), "{started}");
    let want2 = expected_routes(&lab, 2, 3);
    assert!(
        eventually(Duration::from_secs(45), || tabby_routes(&lab, "node-2") == want2),
        "after the restart node-2 owns {:?}, want {want2:?}",
        tabby_routes(&lab, "node-2")
    );
    for i in [1, 3] {
        let want = expected_routes(&lab, i, 3);
        assert!(eventually(Duration::from_secs(45), || tabby_routes(&lab, &format!("node-{i}")) == want), "node-{i} after the restart");
    }
    all_pods_reach_each_other(&lab, &pods);
    lab.run(&["down"]);
    lab.assert_gone();
}
