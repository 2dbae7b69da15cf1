//! Scratch network namespaces for the root-only tests.
//!
//! Every test makes its own uniquely named namespaces, so tests run in
//! parallel, and never moves the test process itself into one.
#![allow(dead_code)]

use std::ops::Deref;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tabby_dataplane::{NetNs, Netlink};

/// The MAC of every host-side veth.
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// Serializes `ip netns add/del`: the first `add` sets up the shared
/// `/run/netns` mount, which is racy when done twice at once.
static IP_NETNS: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh network namespace `/run/netns/tdp-<pid>-<n>`, deleted on drop
/// (also when the test panics).
pub struct ScratchNetns {
    name: String,
    ns: NetNs,
}

impl ScratchNetns {
    /// `ip netns add tdp-<pid>-<n>`.
    pub fn new() -> ScratchNetns {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("tdp-{}-{n}", std::process::id());
        {
            let _lock = IP_NETNS.lock().unwrap_or_else(|e| e.into_inner());
            run_ok(Command::new("ip").args(["netns", "add", &name]));
        }
        let ns = NetNs::open(format!("/run/netns/{name}")).unwrap();
        ScratchNetns { name, ns }
    }

    /// The name given to `ip netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A netlink socket inside this namespace.
    pub fn netlink(&self) -> Netlink {
        Netlink::in_netns(&self.ns).unwrap()
    }

    /// `ip netns exec NAME ARGS...`.
    pub fn exec(&self, args: &[&str]) -> Output {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap();
        output
    }

    /// `ip netns exec NAME ARGS...`, panicking on failure.
    pub fn exec_ok(&self, args: &[&str]) {
        let output = self.exec(args);
        assert!(
            output.status.success(),
            "ip netns exec {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Deref for ScratchNetns {
    type Target = NetNs;

    fn deref(&self) -> &NetNs {
        &self.ns
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _lock = IP_NETNS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run_ok(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls `check` until it holds or `timeout` passes; returns the last answer.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A name unique to this test process, at most 15 characters.
pub fn veth_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("tdp{}v{n}", std::process::id() % 100_000)
}

/// The inode of the calling thread's network namespace.
pub fn thread_netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}
