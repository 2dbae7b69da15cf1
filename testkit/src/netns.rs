//! A named network namespace (`ip netns add`) that is deleted, with
//! everything in it, when the guard drops — also when the test panics.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use tabby_dataplane::{NetNs, Netlink};

use crate::{sh, unique};

/// Serializes `ip netns add/del` inside the process.
static IN_PROCESS: Mutex<()> = Mutex::new(());

/// Holds the lock `ip netns add` needs: the first `add` on a machine sets up
/// the shared `/run/netns` mount, which races when two processes do it at
/// once (test binaries run in parallel). Held only around add and del.
struct NetnsLock {
    _flock: Flock<File>,
    _guard: std::sync::MutexGuard<'static, ()>,
}

fn lock() -> NetnsLock {
    let guard = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/tabby-testkit-netns.lock")
        .unwrap_or_else(|e| panic!("open /run/tabby-testkit-netns.lock: {e}"));
    let flock =
        Flock::lock(file, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("flock: {e}"));
    NetnsLock {
        _flock: flock,
        _guard: guard,
    }
}

/// A uniquely named network namespace with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<prefix><pid>x<n>` (see [`unique`]).
    pub fn new(prefix: &str) -> Self {
        Self::named(unique(prefix))
    }

    /// Creates the namespace `name` exactly (the caller keeps it unique).
    pub fn named(name: String) -> Self {
        {
            let _lock = lock();
            sh("ip", &["netns", "add", &name]);
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path under /run/netns.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace as a handle for setns-based code.
    pub fn open(&self) -> NetNs {
        NetNs::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.name))
    }

    /// A netlink socket inside the namespace.
    pub fn netlink(&self) -> Netlink {
        Netlink::in_netns(&self.open()).unwrap_or_else(|e| panic!("netlink in {}: {e}", self.name))
    }

    /// `ip -n NAME ARGS`, failing the test when it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// A command that runs `program` inside the namespace: `nsenter
    /// --net=PATH PROGRAM`, which leaves /sys and the cgroup mounts alone
    /// (unlike `ip netns exec`) and execs the program (same pid).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg(program);
        cmd
    }

    /// Runs `cmd ARGS` inside the namespace (see [`Netns::command`]) and
    /// returns its output.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        self.command(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("exec {cmd} in {}: {e}", self.name))
    }

    /// [`Netns::exec`], failing the test when the command fails; returns stdout.
    pub fn exec_ok(&self, cmd: &str, args: &[&str]) -> String {
        let out = self.exec(cmd, args);
        assert!(
            out.status.success(),
            "{cmd} {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether one ping to `ip` from here is answered (within 2 s).
    pub fn ping(&self, ip: &str) -> bool {
        self.exec("ping", &["-c1", "-W2", ip]).status.success()
    }

    /// Gives the namespace the uplink of a node: `up0` (a veth to `up1`,
    /// both here and up) with 192.0.2.1/24 and a default route via
    /// 192.0.2.254. Proxy ARP answers for the pods' 169.254.1.1 only when
    /// the node has a route to it.
    pub fn add_uplink(&self) {
        self.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
        self.ip(&["link", "set", "up1", "up"]);
        self.ip(&["link", "set", "up0", "up"]);
        self.ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        self.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
            "dev",
            "up0",
        ]);
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// `ip route show` and `ip -6 route show` lines, minus the kernel's
    /// link-local and multicast entries.
    pub fn routes(&self) -> Vec<String> {
        let mut r: Vec<String> = self
            .ip(&["route", "show"])
            .lines()
            .map(str::to_string)
            .collect();
        r.extend(
            self.ip(&["-6", "route", "show"])
                .lines()
                .filter(|l| !l.starts_with("fe80") && !l.starts_with("multicast"))
                .map(str::to_string),
        );
        r
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _lock = lock();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Many namespaces `<prefix>-0` … `<prefix>-<count-1>` made and deleted in
/// one `ip -batch` each (hundreds of pods for a benchmark). Unlike
/// [`Netns`], their `lo` stays down.
#[derive(Debug)]
pub struct NetnsSet {
    prefix: String,
    count: usize,
}

impl NetnsSet {
    /// Creates the namespaces; `prefix` must be unique (see [`unique`]).
    pub fn new(prefix: String, count: usize) -> Self {
        let set = Self { prefix, count };
        let out = set.batch("add");
        assert!(
            out.status.success(),
            "ip -batch netns add {}-*: {}",
            set.prefix,
            String::from_utf8_lossy(&out.stderr)
        );
        set
    }

    /// The path of namespace `i`.
    pub fn path(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}-{i}", self.prefix))
    }

    /// The paths as a pattern with `%d` for the index.
    pub fn pattern(&self) -> String {
        format!("/run/netns/{}-%d", self.prefix)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn batch(&self, verb: &str) -> Output {
        let script: String = (0..self.count)
            .map(|i| format!("netns {verb} {}-{i}\n", self.prefix))
            .collect();
        let _lock = lock();
        let mut child = Command::new("ip")
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run ip -batch: {e}"));
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("write to ip -batch: {e}"));
        drop(stdin);
        child.wait_with_output().expect("wait for ip -batch")
    }
}

impl Drop for NetnsSet {
    fn drop(&mut self) {
        let _ = self.batch("del");
    }
}

/// Joins two namespaces with a veth: `a_dev` in `a` with `a_addr`, `b_dev`
/// in `b` with `b_addr` (CIDR notation), both up.
pub fn veth_pair(a: &Netns, a_dev: &str, a_addr: &str, b: &Netns, b_dev: &str, b_addr: &str) {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_dev]);
    b.ip(&["addr", "add", b_addr, "dev", b_dev]);
    a.ip(&["link", "set", a_dev, "up"]);
    b.ip(&["link", "set", b_dev, "up"]);
}
