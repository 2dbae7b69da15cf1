//! `tabby-node install-cni` in a temporary root, as the DaemonSet's init
//! container runs it: files and modes, a kubeconfig that works against the
//! real apiserver, idempotence, refusal of a foreign conflist, uninstall,
//! and an atomic replace while another process execs the plugin in a loop.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tabby_testkit::poll::wait_until;

/// A temporary host: `bin/` and `net.d/`, and the plugin sources in `src/`.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Self {
        let root = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(root.src()).unwrap();
        for name in ["tabby", "tabby-ipam"] {
            std::fs::copy(bin(name), root.src().join(name)).unwrap();
        }
        root
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn src(&self) -> PathBuf {
        self.path("src")
    }

    /// Runs install-cni with this root's dirs and `extra` flags.
    fn install(&self, extra: &[&str]) -> Output {
        let out = Command::new(bin("tabby-node"))
            .arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(self.path("bin"))
            .arg("--cni-conf-dir")
            .arg(self.path("net.d"))
            .arg("--host-conf-dir")
            .arg(self.path("net.d"))
            .arg("--node-name")
            .arg("node-1")
            .args(extra)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .output()
            .expect("run tabby-node install-cni");
        eprintln!(
            "install-cni {extra:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Installs with `--source-dir src` and the agent's kubeconfig.
    fn install_with_token(&self, agent_kubeconfig: &Path, extra: &[&str]) -> Output {
        let src = self.src();
        let kubeconfig = agent_kubeconfig.to_str().unwrap();
        let mut args = vec![
            "--source-dir",
            src.to_str().unwrap(),
            "--api-kubeconfig",
            kubeconfig,
        ];
        args.extend_from_slice(extra);
        self.install(&args)
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn agent_kubeconfig(dir: &Path) -> PathBuf {
    let cp = installed();
    token_kubeconfig(cp, dir, "agent-kubeconfig", &token(cp, AGENT_SA))
}

fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(tabby_testkit::bins::upstream_bin("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

#[test]
fn install_writes_the_plugin_its_conflist_and_a_working_kubeconfig_and_a_rerun_changes_nothing() {
    let root = Root::new();
    let agent = agent_kubeconfig(root.dir.path());
    let out = root.install_with_token(&agent, &[]);
    assert!(out.status.success());

    for name in ["tabby", "tabby-ipam"] {
        let installed = root.path(&format!("bin/{name}"));
        assert_eq!(mode(&installed), 0o755, "{name}");
        assert!(
            std::fs::read(&installed).unwrap() == std::fs::read(root.src().join(name)).unwrap(),
            "{name} is a faithful copy"
        );
    }
    let conflist = root.path("net.d/10-tabby.conflist");
    assert_eq!(mode(&conflist), 0o644);
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    let kubeconfig = root.path("net.d/tabby-kubeconfig");
    assert_eq!(conf["plugins"][0]["type"], "tabby");
    assert_eq!(conf["plugins"][0]["nodename"], "node-1");
    assert_eq!(
        conf["plugins"][0]["ipam"]["datastore"]["kubeconfig"],
        kubeconfig.display().to_string()
    );
    assert_eq!(mode(&kubeconfig), 0o600);

    // The kubeconfig is the plugin's ServiceAccount, not the agent's.
    let whoami = kubectl_as(
        &kubeconfig,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        format!("system:serviceaccount:{NAMESPACE}:{PLUGIN_SA}"),
        "{}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    let blocks = kubectl_as(&kubeconfig, &["get", "ipamblocks.crd.tabby.dev"]);
    assert!(
        blocks.status.success(),
        "{}",
        String::from_utf8_lossy(&blocks.stderr)
    );

    // Again: the same files, the binaries not even rewritten.
    let inode = std::fs::metadata(root.path("bin/tabby")).unwrap().ino();
    let again = root.install_with_token(&agent, &[]);
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    for name in ["bin/tabby", "bin/tabby-ipam", "net.d/10-tabby.conflist"] {
        let line = format!("unchanged {}", root.path(name).display());
        assert!(stdout.lines().any(|l| l == line), "{line} in\n{stdout}");
    }
    assert_eq!(
        std::fs::metadata(root.path("bin/tabby")).unwrap().ino(),
        inode
    );
    for dir in ["bin", "net.d"] {
        let names: Vec<String> = std::fs::read_dir(root.path(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with('.')),
            "temporary files left: {names:?}"
        );
    }
}

#[test]
fn a_foreign_conflist_is_refused_unless_forced_and_uninstall_removes_only_tabbys_files() {
    let root = Root::new();
    let agent = agent_kubeconfig(root.dir.path());
    std::fs::create_dir_all(root.path("net.d")).unwrap();
    std::fs::create_dir_all(root.path("bin")).unwrap();
    let foreign = r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#;
    std::fs::write(root.path("net.d/10-tabby.conflist"), foreign).unwrap();
    std::fs::write(root.path("net.d/05-other.conflist"), foreign).unwrap();
    std::fs::write(root.path("bin/loopback"), b"not ours").unwrap();

    let refused = root.install_with_token(&agent, &[]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--force") && stderr.contains("bridge"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(root.path("net.d/10-tabby.conflist")).unwrap(),
        foreign
    );
    assert!(
        !root.path("bin/tabby").exists(),
        "a refused install changes nothing"
    );
    assert!(
        !root.path("net.d/tabby-kubeconfig").exists(),
        "a refused install changes nothing"
    );

    // Uninstall leaves a foreign conflist alone.
    assert!(root.install(&["--uninstall"]).status.success());
    assert_eq!(
        std::fs::read_to_string(root.path("net.d/10-tabby.conflist")).unwrap(),
        foreign
    );

    assert!(root
        .install_with_token(&agent, &["--force"])
        .status
        .success());
    let conf: Value = serde_json::from_str(
        &std::fs::read_to_string(root.path("net.d/10-tabby.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(conf["plugins"][0]["type"], "tabby");

    let out = root.install(&["--uninstall"]);
    assert!(out.status.success());
    for gone in [
        "bin/tabby",
        "bin/tabby-ipam",
        "net.d/10-tabby.conflist",
        "net.d/tabby-kubeconfig",
    ] {
        assert!(!root.path(gone).exists(), "{gone} is still there");
    }
    for kept in ["bin/loopback", "net.d/05-other.conflist"] {
        assert!(root.path(kept).exists(), "{kept} was removed");
    }
    assert!(
        root.install(&["--uninstall"]).status.success(),
        "a second uninstall is success"
    );
}

/// Execs `plugin` VERSION in a loop until `stop`; counts runs and failures.
fn exec_loop(plugin: PathBuf, stop: Arc<AtomicBool>, runs: Arc<AtomicU64>) -> Vec<String> {
    let mut failures = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let out = Command::new(&plugin)
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() && o.stdout.starts_with(b"{") => {}
            Ok(o) => failures.push(format!(
                "{}: {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => failures.push(format!("exec: {e}")),
        }
        runs.fetch_add(1, Ordering::Relaxed);
    }
    failures
}

#[test]
fn replacing_the_plugin_never_breaks_an_exec_running_alongside() {
    let root = Root::new();
    // A second build of the plugin: the same program with other bytes.
    let other = root.path("src2");
    std::fs::create_dir_all(&other).unwrap();
    let mut bytes = std::fs::read(root.src().join("tabby")).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, 4096));
    std::fs::write(other.join("tabby"), &bytes).unwrap();
    std::fs::set_permissions(other.join("tabby"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let src = root.src();
    let sources = [src.to_str().unwrap(), other.to_str().unwrap()];
    let first = root.install(&["--skip-kubeconfig", "--source-dir", sources[0]]);
    assert!(first.status.success());

    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let looper = {
        let (plugin, stop, runs) = (root.path("bin/tabby"), stop.clone(), runs.clone());
        std::thread::spawn(move || exec_loop(plugin, stop, runs))
    };
    wait_until("the exec loop runs", Duration::from_secs(20), || {
        runs.load(Ordering::Relaxed) > 0
    });
    let mut replaced = 0;
    for i in 0..30 {
        let out = root.install(&["--skip-kubeconfig", "--source-dir", sources[(i + 1) % 2]]);
        assert!(out.status.success());
        let line = format!("wrote {}", root.path("bin/tabby").display());
        replaced += usize::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l == line),
        );
    }
    let before = runs.load(Ordering::Relaxed);
    wait_until(
        "more execs after the last replace",
        Duration::from_secs(20),
        || runs.load(Ordering::Relaxed) > before,
    );
    stop.store(true, Ordering::Relaxed);
    let failures = looper.join().unwrap();
    assert_eq!(replaced, 30, "every install replaced the binary");
    assert!(
        failures.is_empty(),
        "{} of {} execs failed: {:?}",
        failures.len(),
        runs.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    eprintln!(
        "{} execs across 30 replacements, none failed",
        runs.load(Ordering::Relaxed)
    );
}
