//! Helpers for Tabby's CNI conformance tests and benchmarks.
//!
//! Plugins are driven through `cnidriver` (conformance/go/cnidriver), a small
//! Go module over libcni v1.3.1, the library containerd and CRI-O use, and
//! through upstream `cnitool` v1.3.1; the peers are the upstream reference
//! plugins v1.10.0. `scripts/upstream.sh` builds cnitool and the plugins into
//! [`plugins_dir`]. The helpers here build the driver once per process (and
//! under a file lock across processes) and run it inside a test's own "host"
//! namespace ([`Driver`]), so a test never touches the real host's network.
//!
//! Namespaces, unique names, the release binaries and the root check are
//! `tabby-testkit`'s. Like testkit, every helper here fails the test
//! (panics with the command and its stderr) rather than returning a
//! `Result`; tests call [`ready`] first.

use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;
use tabby_testkit::bins::{target_dir, workspace_root};
use tabby_testkit::{run_ok, Netns};

pub mod containerd;
mod pod;
pub use pod::{
    assert_containers_reach_each_other_and_the_host, assert_gone, assert_released,
    assert_tabby_pod, k8s_args, runtime_host, tcp_echo,
};

/// The upstream reference plugins (v1.10) the conformance tests chain with
/// Tabby or measure it against.
pub const UPSTREAM_PLUGINS: [&str; 6] = [
    "ptp",
    "host-local",
    "portmap",
    "bandwidth",
    "tuning",
    "firewall",
];

/// The directory of the upstream reference plugins and cnitool: testkit's
/// upstream binaries (`/var/cache/tabby/bin` or `TABBY_UPSTREAM_BIN`).
pub fn plugins_dir() -> PathBuf {
    tabby_testkit::bins::upstream_dir()
}

/// `true` when every upstream binary in `names` is in [`plugins_dir`], else
/// [`tabby_testkit::skip_or_fail`] naming the missing ones.
pub fn require_upstream(test: &str, names: &[&str]) -> bool {
    let dir = plugins_dir();
    let missing: Vec<String> = names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| !tabby_testkit::has_program(&p.display().to_string()))
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "needs {} (bash scripts/upstream.sh cni plugins builds them)",
        missing.join(", ")
    );
    tabby_testkit::skip_or_fail(test, &why)
}

/// Call first in a conformance test: `true` when it can run (root, the
/// upstream reference plugins, the libcni driver built). Otherwise the test
/// fails, or with `TABBY_ALLOW_SKIP=1` is reported as skipped and returns.
pub fn ready(test: &str) -> bool {
    if !tabby_testkit::require_root(test) || !require_upstream(test, &UPSTREAM_PLUGINS) {
        return false;
    }
    match try_cnidriver() {
        Ok(_) => true,
        Err(e) => tabby_testkit::skip_or_fail(test, &format!("the libcni driver: {e}")),
    }
}

/// Holds an exclusive flock on `target/tabby-conformance.lock` while alive,
/// so builds started by parallel test binaries and benchmarks do not race.
fn build_lock() -> Result<Flock<File>, String> {
    let dir = target_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("tabby-conformance.lock"))
        .map_err(|e| format!("open the build lock: {e}"))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| format!("flock build lock: {e}"))
}

/// Path of the libcni driver, built (once per process) by
/// `scripts/build-cnidriver.sh`, which skips the build when the binary is
/// newer than its sources; fails the test when it cannot be built.
pub fn cnidriver() -> PathBuf {
    try_cnidriver().unwrap_or_else(|e| panic!("{e}"))
}

fn try_cnidriver() -> Result<PathBuf, String> {
    static DRIVER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DRIVER.get_or_init(build_cnidriver).clone()
}

fn build_cnidriver() -> Result<PathBuf, String> {
    let root = workspace_root();
    let bin = root.join("conformance/go/bin/cnidriver");
    let _lock = build_lock()?;
    let out = Command::new("bash")
        .arg(root.join("scripts/build-cnidriver.sh"))
        .output()
        .map_err(|e| format!("run scripts/build-cnidriver.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building cnidriver failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

/// Directory holding the release binaries `tabby`, `tabby-ipam` and
/// `tabbyctl` (built when missing).
pub fn release_dir() -> PathBuf {
    tabby_testkit::bins::release_dir()
}

/// libcni via `cnidriver`, run inside a "host" namespace with one conflist.
#[derive(Debug)]
pub struct Driver {
    bin: PathBuf,
    host: PathBuf,
    conflist: PathBuf,
    bin_dirs: String,
    cache_dir: PathBuf,
}

impl Driver {
    /// A driver for `conflist` (written to `dir/conflist.json`) whose plugins
    /// are searched in `bin_dirs` (CNI_PATH) and whose libcni cache is
    /// `dir/cache`; plugins run inside `host`.
    pub fn new(host: &Netns, dir: &Path, conflist: &Value, bin_dirs: &[&Path]) -> Driver {
        let path = dir.join("conflist.json");
        let text = serde_json::to_vec_pretty(conflist).expect("a conflist serializes");
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let bin_dirs: Vec<String> = bin_dirs.iter().map(|d| d.display().to_string()).collect();
        Driver {
            bin: cnidriver(),
            host: host.path(),
            conflist: path,
            bin_dirs: bin_dirs.join(":"),
            cache_dir: dir.join("cache"),
        }
    }

    fn command(&self, verb: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.host.display()))
            .arg(&self.bin)
            .arg(verb);
        cmd.arg("--conflist").arg(&self.conflist);
        cmd.arg("--bin-dirs").arg(&self.bin_dirs);
        cmd.arg("--cache-dir").arg(&self.cache_dir);
        cmd
    }

    fn single(&self, verb: &str, pod: &Netns, id: &str, extra: &[&str]) -> Output {
        let mut cmd = self.command(verb);
        cmd.arg("--netns")
            .arg(pod.path())
            .args(["--container-id", id])
            .args(extra);
        run_ok(&mut cmd)
    }

    /// ADD through libcni; returns the result libcni parsed. `extra` are
    /// more driver flags (`--args`, `--capability-args`, `--ifname`).
    pub fn add(&self, pod: &Netns, id: &str, extra: &[&str]) -> Value {
        let out = self.single("add", pod, id, extra);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "libcni ADD of {id}: the driver's result is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// CHECK through libcni (uses the cached ADD result as prevResult).
    pub fn check(&self, pod: &Netns, id: &str, extra: &[&str]) {
        self.single("check", pod, id, extra);
    }

    /// DEL through libcni.
    pub fn del(&self, pod: &Netns, id: &str, extra: &[&str]) {
        self.single("del", pod, id, extra);
    }

    /// GC through libcni: DELs every cached attachment not in `valid`
    /// (container ID, ifname), then (cniVersion >= 1.1.0) sends GC with
    /// `cni.dev/valid-attachments` = `valid` to every plugin.
    pub fn gc(&self, valid: &[(&str, &str)]) {
        let valid: Vec<String> = valid
            .iter()
            .map(|(id, ifname)| format!("{id}/{ifname}"))
            .collect();
        let mut cmd = self.command("gc");
        if !valid.is_empty() {
            cmd.arg("--valid").arg(valid.join(","));
        }
        run_ok(&mut cmd);
    }

    /// STATUS through libcni (every plugin of the list); the driver's output.
    pub fn status(&self) -> Output {
        self.command("status")
            .output()
            .unwrap_or_else(|e| panic!("run cnidriver status: {e}"))
    }

    /// Uses `dir` as libcni's result cache (a runtime's own, for GC).
    pub fn with_cache_dir(mut self, dir: &Path) -> Driver {
        self.cache_dir = dir.to_path_buf();
        self
    }

    /// The libcni result cache of this driver.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// A `cnidriver bench` command (ADD then DEL of `count` pods whose netns
    /// are `netns_pattern` with `%d` = 0..count, `concurrency` at a time).
    pub fn bench_command(
        &self,
        netns_pattern: &str,
        count: usize,
        concurrency: usize,
        id_prefix: &str,
    ) -> Command {
        let mut cmd = self.command("bench");
        cmd.args(["--netns-pattern", netns_pattern, "--id-prefix", id_prefix]);
        cmd.args([
            "--count",
            &count.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ]);
        cmd
    }
}

/// A command that runs `program` inside the network namespace at `netns`,
/// in a mount namespace of its own where each `(dir, fixed)` of `binds` is
/// bind-mounted on the fixed path (created when missing): a runtime's fixed
/// CNI paths (`/etc/cni/net.d`, `/var/lib/cni`...) pointed at a test's own
/// dirs. The program's arguments are the caller's to add.
pub fn with_bind_mounts(binds: &[(&Path, &str)], netns: &Path, program: &Path) -> Command {
    let mut script = String::new();
    for (i, (_, fixed)) in binds.iter().enumerate() {
        fs::create_dir_all(fixed).unwrap_or_else(|e| panic!("create {fixed}: {e}"));
        script += &format!("mount --bind \"${}\" {fixed} && ", i + 1);
    }
    let n = binds.len();
    script += &format!("exec nsenter --net=\"${}\" \"${{@:{}}}\"", n + 1, n + 2);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "bash", "-c"])
        .arg(script)
        .arg("bash")
        .args(binds.iter().map(|(dir, _)| dir))
        .arg(netns)
        .arg(program);
    cmd
}

/// The IPv4 address of the first entry of a CNI result's `ips`.
pub fn result_ipv4(result: &Value) -> Option<Ipv4Addr> {
    let addr = result["ips"][0]["address"].as_str()?;
    addr.split('/').next()?.parse().ok()
}

/// Files under `dir` (recursively) whose content contains `needle`.
pub fn files_mentioning(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) {
                found.push(path);
            }
        }
    }
    found
}

/// A distinct second octet for test pools (`10.<n>.0.0/16`), so concurrent
/// tests in one process never share a CIDR.
pub fn unique_octet() -> u8 {
    static NEXT: Mutex<u8> = Mutex::new(0);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    *next = next.wrapping_add(1);
    100 + (*next % 150)
}

/// A Tabby plugin entry for a conflist: `tabby` with `tabby-ipam` on a file
/// datastore in `dir/datastore`, logging to `dir/cni.log`, pool `cidr`.
pub fn tabby_plugin(dir: &Path, cidr: &str) -> Value {
    serde_json::json!({
        "type": "tabby",
        "nodename": "node-a",
        "mtu": 1450,
        "log_file": dir.join("cni.log"),
        "ipam": tabby_ipam(dir, cidr),
    })
}

/// A `tabby-ipam` section on the file datastore `dir/datastore`.
pub fn tabby_ipam(dir: &Path, cidr: &str) -> Value {
    serde_json::json!({
        "type": "tabby-ipam",
        "nodename": "node-a",
        "datastore": {"type": "file", "path": dir.join("datastore")},
        "pool": {"cidr": cidr, "blockSize": 26},
    })
}

/// A conflist named `k8s-pod-network` in `version` with `plugins`.
pub fn conflist(version: &str, plugins: Vec<Value>) -> Value {
    serde_json::json!({"cniVersion": version, "name": "k8s-pod-network", "plugins": plugins})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ipv4_reads_the_first_address_without_its_mask() {
        let result =
            serde_json::json!({"ips": [{"address": "10.244.0.7/32"}, {"address": "10.1.1.1/24"}]});
        assert_eq!(result_ipv4(&result), Some(Ipv4Addr::new(10, 244, 0, 7)));
        assert_eq!(result_ipv4(&serde_json::json!({"ips": []})), None);
    }

    #[test]
    fn with_bind_mounts_mounts_each_dir_then_enters_the_netns_and_runs_the_program() {
        let (net_d, cache) = (Path::new("/tmp/t/net.d"), Path::new("/tmp/t/cache"));
        let cmd = with_bind_mounts(
            &[(net_d, "/tmp"), (cache, "/tmp")],
            Path::new("/run/netns/h"),
            Path::new("/bin/ctr"),
        );
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(cmd.get_program(), "unshare");
        assert_eq!(
            args,
            [
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
                r#"mount --bind "$1" /tmp && mount --bind "$2" /tmp && exec nsenter --net="$3" "${@:4}""#,
                "bash",
                "/tmp/t/net.d",
                "/tmp/t/cache",
                "/run/netns/h",
                "/bin/ctr",
            ]
        );
    }

    #[test]
    fn files_mentioning_searches_nested_directories() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/doc.json"), r#"{"handle":"net.cid-1"}"#).unwrap();
        fs::write(dir.path().join("other.json"), "{}").unwrap();
        assert_eq!(
            files_mentioning(dir.path(), "cid-1"),
            vec![dir.path().join("a/b/doc.json")]
        );
        assert!(files_mentioning(dir.path(), "cid-2").is_empty());
    }
}
