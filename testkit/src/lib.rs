//! Tabby's test kit (a dev-dependency only): the one place for what every
//! root test needs.
//!
//! - [`require_root`]: a test that needs root fails without it, unless
//!   `TABBY_ALLOW_SKIP=1` (then it prints `SKIP <test>: …` and is counted as
//!   skipped by `scripts/test.sh`).
//! - [`unique`]: names unique to the process and call (namespaces, links).
//! - [`netns::Netns`]: a named network namespace deleted on drop, also on panic.
//! - [`poll`]: waiting for a condition with a deadline, never for a fixed time.
//! - [`cni`]: running a CNI plugin the way a runtime does.
//! - [`bgp`]: a real BGP peer (BIRD 2 or GoBGP) in a namespace of its own.
//! - [`trace`]: a packet tracer over a generated iptables payload.
//! - [`bins`]: where the workspace's and the upstream binaries are.
//! - [`kube`]: a real control plane (etcd + kube-apiserver) per test binary.

pub mod bgp;
pub mod bins;
pub mod cni;
pub mod kube;
pub mod netns;
pub mod poll;
pub mod trace;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub use netns::Netns;
pub use poll::{eventually, poll_until, wait_for_message, wait_until};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid % 100000>x<n>`,
/// short enough for a link name when `prefix` has at most 4 characters.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command; fails the test with its stderr when it fails; returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the process runs as root (effective UID 0, from /proc/self/status).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2)?.parse::<u32>().ok())
        })
        == Some(0)
}

/// Call first in a test that needs root. As root it returns `true`. Without
/// root the test fails loudly, unless `TABBY_ALLOW_SKIP=1` is set: then it
/// prints `SKIP <test>: needs root` and returns `false`, and the test returns
/// at once (`if !require_root("name") { return; }`).
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip_or_fail(test, "needs root (network namespaces)")
}

/// Like [`require_root`] for any missing precondition (a binary, a kernel
/// feature): fails unless `TABBY_ALLOW_SKIP=1`, then prints `SKIP`.
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if std::env::var("TABBY_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP {test}: {why}");
        println!("SKIP {test}: {why}");
        return false;
    }
    panic!("{test} cannot run: {why} (set TABBY_ALLOW_SKIP=1 to count it as skipped instead)");
}

/// An error and its sources, `: `-separated (for test failure messages).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
