//! Helpers of the fault tests: running a plugin that can be SIGKILLed at a
//! chosen point, reading what the namespaces and the datastore hold, and
//! `tabbyctl`. Shared by several test binaries, so not every one uses all.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tabby_dataplane::{NetNs, Netlink};
use tabby_ipam::{Datastore, FileDatastore};
use tabby_tests::{Netns, Node};

/// Where the release binaries are: `TABBY_BIN_DIR`, else the profile
/// directory this test binary was built into (`target/release`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TABBY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/release/deps/<test> -> target/release
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf();
    for bin in ["tabby", "tabby-ipam", "tabbyctl"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: run `cargo build --release -p tabby-cni -p tabby-ctl` first",
            dir.join(bin).display()
        );
    }
    dir
}

/// One plugin invocation, as a runtime makes it.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// CNI_COMMAND.
    pub command: String,
    /// CNI_CONTAINERID.
    pub id: String,
    /// CNI_NETNS.
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
}

impl Invocation {
    /// `command` for container `id` in `netns` on eth0.
    pub fn new(command: &str, id: &str, netns: &str) -> Self {
        Self {
            command: command.into(),
            id: id.into(),
            netns: netns.into(),
            ifname: "eth0".into(),
        }
    }

    /// Starts the `tabby` plugin inside `node` with `conf` on stdin.
    pub fn spawn(&self, node: &Netns, conf: &[u8]) -> Child {
        let dir = bin_dir();
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", node.path().display()))
            .arg(dir.join("tabby"))
            .env("CNI_COMMAND", &self.command)
            .env("CNI_CONTAINERID", &self.id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", &self.ifname)
            .env("CNI_ARGS", "")
            .env("CNI_PATH", format!("{}:/usr/lib/cni", dir.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tabby");
        // The config is far smaller than a pipe buffer: this never blocks.
        let mut stdin = child.stdin.take().expect("piped stdin");
        let _ = stdin.write_all(conf);
        child
    }
}

/// How a watched plugin run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It exited by itself; `true` when successfully.
    Exited(bool),
    /// It was SIGKILLed.
    Killed,
}

/// SIGKILLs `child` as soon as `point` holds; polls as fast as it can.
pub fn kill_when(mut child: Child, mut point: impl FnMut() -> bool) -> Ending {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if point() {
            return kill(child);
        }
        if let Some(status) = child.try_wait().expect("wait for plugin") {
            return Ending::Exited(status.success());
        }
        assert!(Instant::now() < deadline, "the plugin hangs");
    }
}

/// SIGKILLs `child` unless it has exited already, and reaps it.
pub fn kill(mut child: Child) -> Ending {
    if let Some(status) = child.try_wait().expect("wait for plugin") {
        return Ending::Exited(status.success());
    }
    // Between try_wait and kill the child may exit; kill then fails harmlessly.
    let killed = child.kill().is_ok();
    let status = child.wait().expect("reap plugin");
    if killed && status.code().is_none() {
        Ending::Killed
    } else {
        Ending::Exited(status.success())
    }
}

/// Waits for `child` and returns whether it succeeded, with its stdout.
pub fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("wait for plugin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A netlink socket in the namespace at `path`; `None` once it is gone.
pub fn netlink(path: &Path) -> Option<Netlink> {
    let ns = NetNs::open(path).ok()?;
    Netlink::in_netns(&ns).ok()
}

/// Every address on every link but `lo` in the namespace `nl` is bound to.
pub fn addresses(nl: &Netlink) -> Vec<IpAddr> {
    let Ok(links) = nl.links() else {
        return Vec::new();
    };
    links
        .iter()
        .filter(|l| l.name != "lo")
        .flat_map(|l| nl.addresses(l.index).unwrap_or_default())
        .map(|a| a.ip())
        .collect()
}

/// Names of the host veths (`tabby*`) on the node.
pub fn host_veths(nl: &Netlink) -> Vec<String> {
    nl.links()
        .expect("list node links")
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n.starts_with("tabby"))
        .collect()
}

/// The handle documents of the datastore at `dir`: handle -> its raw JSON.
pub fn handles(dir: &Path) -> BTreeMap<String, String> {
    let ds = FileDatastore::open(dir).expect("open datastore");
    ds.list("handles/")
        .expect("list handles")
        .into_iter()
        .map(|e| (e.key, String::from_utf8_lossy(&e.value).into_owned()))
        .collect()
}

/// Runs `tabbyctl ARGS` on `node` (in its namespace, with its /sys) over its datastore.
pub fn tabbyctl(node: &Node, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", node.ns.name()])
        .arg(bin_dir().join("tabbyctl"))
        .arg("--datastore")
        .arg(node.datastore())
        .args(args)
        .output()
        .expect("run tabbyctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `tabbyctl ipam check` on `node`: the number of problems it found, with its report.
pub fn ipam_check(node: &Node) -> (usize, String) {
    let (ok, text) = tabbyctl(node, &["ipam", "check", "--node", &node.name]);
    assert!(ok, "tabbyctl ipam check failed: {text}");
    let problems = text
        .lines()
        .find_map(|l| l.strip_prefix("Check complete; Found "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no problem count in {text}"));
    (problems, text)
}

/// A small deterministic PRNG (xorshift64*), so that a failing run can be
/// replayed from the seed it prints.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `TABBY_STORM_SEED`, else from the clock.
    pub fn from_env(what: &str) -> Self {
        let seed = std::env::var("TABBY_STORM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{what}: TABBY_STORM_SEED={seed}");
        Self::new(seed)
    }

    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
