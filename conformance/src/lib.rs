//! Helpers for Tabby's CNI conformance tests and benchmarks.
//!
//! Plugins are driven through `cnidriver` (conformance/go/cnidriver), a small
//! Go program over Debian's libcni, the library containerd and CRI-O use. The
//! helpers here:
//! - build that driver once per process (and under a file lock across
//!   processes) and find the release binaries `tabby`, `tabby-ipam`,
//!   `tabbyctl`;
//! - create uniquely named network namespaces that are deleted on drop, even
//!   when a test panics ([`Netns`]);
//! - run the driver inside a test's own "host" namespace ([`Driver`]), so a
//!   test never touches the real host's network.
//!
//! Everything here needs root; tests call [`skip_unless_root`] first.

use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;

/// Directory of Debian's reference CNI plugins (containernetworking-plugins).
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate sits in the workspace")
        .to_path_buf()
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn skip_unless_root(test: &str) -> bool {
    if effective_uid() == Some(0) {
        return false;
    }
    eprintln!("SKIP {test}: needs root (network namespaces)");
    true
}

/// The effective user ID, from /proc/self/status (no unsafe libc call).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Holds an exclusive flock on `target/tabby-conformance.lock` while alive,
/// so builds started by parallel test binaries and benchmarks do not race.
fn build_lock() -> Result<Flock<File>> {
    let dir = target_dir();
    fs::create_dir_all(&dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("tabby-conformance.lock"))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| anyhow!("flock build lock: {e}"))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Path of the libcni driver, built (once per process) with
/// `scripts/build-cnidriver.sh` when missing or older than its source.
pub fn cnidriver() -> Result<PathBuf> {
    static DRIVER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| build_cnidriver().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_cnidriver() -> Result<PathBuf> {
    let root = workspace_root();
    let bin = root.join("conformance/go/bin/cnidriver");
    let src = root.join("conformance/go/cnidriver/main.go");
    let _lock = build_lock()?;
    if mtime(&bin).is_some() && mtime(&bin) >= mtime(&src) {
        return Ok(bin);
    }
    let out = Command::new("bash")
        .arg(root.join("scripts/build-cnidriver.sh"))
        .output()
        .context("run scripts/build-cnidriver.sh")?;
    if !out.status.success() {
        bail!(
            "building cnidriver failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(bin)
}

/// Directory holding the release binaries `tabby`, `tabby-ipam` and
/// `tabbyctl`; runs `cargo build --release -p tabby-cni -p tabby-ctl` (once
/// per process) when one of them is missing.
pub fn release_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| ensure_release_bins().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn ensure_release_bins() -> Result<PathBuf> {
    let dir = target_dir().join("release");
    let missing = |d: &Path| {
        ["tabby", "tabby-ipam", "tabbyctl"]
            .iter()
            .any(|b| !d.join(b).exists())
    };
    if !missing(&dir) {
        return Ok(dir);
    }
    let _lock = build_lock()?;
    if missing(&dir) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "tabby-cni", "-p", "tabby-ctl"])
            .current_dir(workspace_root())
            .status()
            .context("run cargo build --release")?;
        if !status.success() || missing(&dir) {
            bail!(
                "release binaries tabby, tabby-ipam, tabbyctl are missing from {}",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// A name unique to this process and call: `<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and returns its output; fails with its stderr otherwise.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `ip ARGS` and returns stdout.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = run(Command::new("ip").args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace under /run/netns, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Result<Netns> {
        Self::named(unique_name(tag))
    }

    /// Creates the namespace `name` with loopback up.
    pub fn named(name: String) -> Result<Netns> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Takes ownership of an existing namespace (deleted on drop).
    pub fn adopt(name: String) -> Netns {
        Netns { name }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, e.g. `/run/netns/<name>`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// True when `ping -c 1` to `addr` from inside this namespace succeeds.
    pub fn ping(&self, addr: Ipv4Addr) -> bool {
        self.command("ping")
            .args(["-c", "1", "-W", "2", &addr.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// libcni via `cnidriver`, run inside a "host" namespace with one conflist.
#[derive(Debug)]
pub struct Driver {
    bin: PathBuf,
    host: String,
    conflist: PathBuf,
    bin_dirs: String,
    cache_dir: PathBuf,
    path_prefix: Option<PathBuf>,
}

impl Driver {
    /// A driver for `conflist` (written to `dir/conflist.json`) whose plugins
    /// are searched in `bin_dirs` (CNI_PATH) and whose libcni cache is
    /// `dir/cache`; plugins run inside `host`.
    pub fn new(host: &Netns, dir: &Path, conflist: &Value, bin_dirs: &[&Path]) -> Result<Driver> {
        let path = dir.join("conflist.json");
        fs::write(&path, serde_json::to_vec_pretty(conflist)?)?;
        let bin_dirs: Vec<String> = bin_dirs.iter().map(|d| d.display().to_string()).collect();
        Ok(Driver {
            bin: cnidriver()?,
            host: host.name().to_string(),
            conflist: path,
            bin_dirs: bin_dirs.join(":"),
            cache_dir: dir.join("cache"),
            path_prefix: None,
        })
    }

    /// Puts `dir` first on the PATH the driver and the plugins see (to pick
    /// the iptables flavour a chained plugin runs).
    pub fn with_path_prefix(mut self, dir: &Path) -> Driver {
        self.path_prefix = Some(dir.to_path_buf());
        self
    }

    fn command(&self, verb: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host])
            .arg(&self.bin)
            .arg(verb);
        cmd.arg("--conflist").arg(&self.conflist);
        cmd.arg("--bin-dirs").arg(&self.bin_dirs);
        cmd.arg("--cache-dir").arg(&self.cache_dir);
        if let Some(prefix) = &self.path_prefix {
            let path =
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
            cmd.env("PATH", format!("{}:{path}", prefix.display()));
        }
        cmd
    }

    fn single(&self, verb: &str, pod: &Netns, id: &str, extra: &[&str]) -> Result<Output> {
        let mut cmd = self.command(verb);
        cmd.args(["--netns", &pod.path(), "--container-id", id])
            .args(extra);
        run(&mut cmd).with_context(|| format!("libcni {verb} of {id}"))
    }

    /// ADD through libcni; returns the result libcni parsed. `extra` are
    /// more driver flags (`--args`, `--capability-args`, `--ifname`).
    pub fn add(&self, pod: &Netns, id: &str, extra: &[&str]) -> Result<Value> {
        let out = self.single("add", pod, id, extra)?;
        serde_json::from_slice(&out.stdout).context("parse the driver's result JSON")
    }

    /// CHECK through libcni (uses the cached ADD result as prevResult).
    pub fn check(&self, pod: &Netns, id: &str, extra: &[&str]) -> Result<()> {
        self.single("check", pod, id, extra).map(drop)
    }

    /// DEL through libcni.
    pub fn del(&self, pod: &Netns, id: &str, extra: &[&str]) -> Result<()> {
        self.single("del", pod, id, extra).map(drop)
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

/// The IPv4 address of the first entry of a CNI result's `ips`.
pub fn result_ipv4(result: &Value) -> Result<Ipv4Addr> {
    let addr = result["ips"][0]["address"]
        .as_str()
        .ok_or_else(|| anyhow!("result has no ips[0].address: {result}"))?;
    let ip = addr.split('/').next().unwrap_or(addr);
    ip.parse().with_context(|| format!("parse {addr}"))
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
        assert_eq!(result_ipv4(&result).unwrap(), Ipv4Addr::new(10, 244, 0, 7));
        assert!(result_ipv4(&serde_json::json!({"ips": []})).is_err());
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

    #[test]
    fn unique_names_differ_within_a_process() {
        assert_ne!(unique_name("x"), unique_name("x"));
    }
}
