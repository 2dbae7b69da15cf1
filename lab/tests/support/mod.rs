//! The harness of the lab's end-to-end tests: a lab per test with its own
//! namespace prefix and state directory, torn down on drop.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
// Shared by every lab test binary; not each of them uses both.
#[allow(unused_imports)]
pub use tabby_testkit::{eventually, require_root};

/// One lab under test, torn down on drop.
pub struct TestLab {
    pub prefix: String,
    pub state: tempfile::TempDir,
    pub bin_dir: PathBuf,
    /// A bin dir with a stand-in `tabby-node`, kept alive with the lab.
    _fake_bins: Option<tempfile::TempDir>,
}

impl TestLab {
    /// A lab named `tl<tag><pid>`, using the real binaries.
    pub fn new(tag: &str) -> TestLab {
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
    pub fn with_idle_agents(tag: &str) -> TestLab {
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
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tabby-lab"));
        cmd.arg("--prefix")
            .arg(&self.prefix)
            .arg("--state-dir")
            .arg(self.state_dir());
        cmd.arg("--bin-dir").arg(&self.bin_dir).args(args);
        cmd
    }

    /// Runs the lab with `args` and returns its output, failing on a non-zero exit.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "tabby-lab {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("lab")
    }

    /// The parsed `lab.json`, if it exists and parses.
    pub fn state(&self) -> Option<Value> {
        let bytes = std::fs::read(self.state_dir().join("lab.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The address of pod `name`, from the state file.
    pub fn pod_ip(&self, name: &str) -> String {
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
    pub fn http_get(&self, from: &str, ip: &str, timeout_ms: u32) -> Output {
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
    pub fn namespaces(&self) -> Vec<String> {
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
    pub fn processes(&self) -> Vec<String> {
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
    pub fn assert_gone(&self) {
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

/// Where the real plugin, tabbyctl and tabby-node are: testkit's release
/// directory (built when one is missing).
pub fn real_bin_dir() -> PathBuf {
    tabby_testkit::bins::release_dir()
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that `from` gets an echo answer from pod `to` showing `to`'s
/// hostname and address and `from`'s address as the client.
pub fn assert_echo(lab: &TestLab, from: &str, to: &str) {
    let (from_ip, to_ip) = (lab.pod_ip(from), lab.pod_ip(to));
    let out = lab.http_get(from, &to_ip, 5000);
    let body = text(&out);
    assert!(out.status.success(), "{from} -> {to} failed: {body}");
    assert!(body.contains(&format!("Hostname: {to}\n")), "{body}");
    assert!(body.contains(&format!("IP: {to_ip}\n")), "{body}");
    assert!(body.contains(&format!("RemoteAddr: {from_ip}:")), "{body}");
    assert!(body.contains("GET / HTTP/1.1\n"), "{body}");
}
