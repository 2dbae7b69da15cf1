//! A private containerd (upstream v2.3, `scripts/upstream.sh containerd`)
//! for `ctr run --cni` tests: its root, state, sockets, log, CNI config,
//! plugin and cache directories all live in a temp dir of the test, and it
//! runs in the test's "host" namespace, so tests run in parallel and leave
//! nothing behind.
//!
//! `ctr` reads the fixed `/etc/cni/net.d`, `/opt/cni/bin` and `/var/lib/cni`:
//! every `ctr` call runs in a private mount namespace in which the test's
//! directories are bind-mounted there ([`Containerd::ctr`]). The OCI runtime
//! is Debian's `runc` (package `runc`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tabby_testkit::bins::upstream_dir;
use tabby_testkit::{eventually, Netns};

/// A running containerd; stopped (with its shims) on drop.
#[derive(Debug)]
pub struct Containerd {
    daemon: Child,
    dir: PathBuf,
    host: PathBuf,
    socket: PathBuf,
}

/// The programs a containerd test needs besides root.
pub const CONTAINERD_PROGRAMS: [&str; 3] = ["containerd", "ctr", "containerd-shim-runc-v2"];

impl Containerd {
    /// Starts containerd in `host` with everything under `dir`, CNI config
    /// `conflist` (as `dir/net.d/10-tabby.conflist`) and the plugins of
    /// `bin_dirs` linked into `dir/cni-bin`.
    pub fn start(host: &Netns, dir: &Path, conflist: &Value, bin_dirs: &[&Path]) -> Containerd {
        for sub in ["root", "state", "net.d", "cni-bin", "cni-cache"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let text = serde_json::to_vec_pretty(conflist).unwrap();
        fs::write(dir.join("net.d/10-tabby.conflist"), text).unwrap();
        link_plugins(&dir.join("cni-bin"), bin_dirs);
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{sock}.debug"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        fs::write(dir.join("config.toml"), config).unwrap();
        let log = fs::File::create(dir.join("containerd.log")).unwrap();
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            upstream_dir().display()
        );
        let daemon = host
            .command(upstream_dir().join("containerd"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start containerd: {e}"));
        let c = Containerd {
            daemon,
            dir: dir.to_path_buf(),
            host: host.path(),
            socket,
        };
        let up = eventually(Duration::from_secs(30), || {
            c.ctr(&["version"]).status.success()
        });
        assert!(up, "containerd did not answer within 30 s: {}", c.log());
        c
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The libcni cache `ctr` uses (its `/var/lib/cni`).
    pub fn cni_cache(&self) -> PathBuf {
        self.dir.join("cni-cache")
    }

    /// The conflist `ctr` uses.
    pub fn conflist(&self) -> PathBuf {
        self.dir.join("net.d/10-tabby.conflist")
    }

    /// `ctr --address SOCK ARGS` in the host namespace with the test's CNI
    /// directories bind-mounted at the fixed paths; its output.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let (net_d, cni_bin, cache) = (
            self.dir.join("net.d"),
            self.dir.join("cni-bin"),
            self.cni_cache(),
        );
        let binds = [
            (net_d.as_path(), "/etc/cni/net.d"),
            (cni_bin.as_path(), "/opt/cni/bin"),
            (cache.as_path(), "/var/lib/cni"),
        ];
        crate::with_bind_mounts(&binds, &self.host, &upstream_dir().join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run ctr {args:?}: {e}"))
    }

    /// [`Containerd::ctr`], failing the test when it fails; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\ncontainerd's log:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            tail(&self.log(), 20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The status column of `ctr tasks ls` for `id` (`RUNNING`, `STOPPED`),
    /// `None` when there is no such task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["tasks", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        })
    }

    /// The pid of task `id`'s init process.
    pub fn task_pid(&self, id: &str) -> u32 {
        let out = self.ctr_ok(&["tasks", "ls"]);
        out.lines()
            .skip(1)
            .find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.first() == Some(&id)).then(|| cols.get(1)?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no task {id} in `ctr tasks ls`: {out}"))
    }

    /// Kills the daemon and the shims it started (found by their `-address`
    /// argument, our socket), by pid.
    fn stop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let needle = self.socket.display().to_string();
        let Ok(entries) = fs::read_dir("/proc") else {
            return;
        };
        for pid in entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Symlinks every executable of `dirs` into `into` (the first one wins).
fn link_plugins(into: &Path, dirs: &[&Path]) {
    for dir in dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let target = into.join(e.file_name());
            if !target.exists() && e.path().is_file() {
                let _ = std::os::unix::fs::symlink(e.path(), target);
            }
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A busybox-static rootfs in `dir` (Debian's `busybox-static`): `/bin/sh`,
/// `sleep`, `ping`, `ip` and the other applets as links.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "sys", "dev", "tmp", "etc", "run"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", bin.join("busybox")).unwrap_or_else(|e| panic!("copy busybox: {e}"));
    for applet in ["sh", "sleep", "ping", "ip", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    dir.to_path_buf()
}
