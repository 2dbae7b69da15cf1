//! Tabby's test kit (a dev-dependency only): the one place for what every
//! root test needs.
//!
//! - [`require_root`], [`require_programs`], [`skip_or_fail`]: a test that
//!   cannot run fails, unless `TABBY_ALLOW_SKIP=1` (then it prints
//!   `SKIP <test>: …` and `scripts/test.sh` counts it as skipped).
//!
//! Every helper here fails the test (panics, with the command and its
//! stderr) instead of returning a `Result`: tests read as straight lines of
//! steps and assertions.
//! - [`unique`]: names unique to the process and call (namespaces, links).
//! - [`netns::Netns`]: a named network namespace deleted on drop, also on panic.
//! - [`poll`]: waiting for a condition with a deadline, never for a fixed time.
//! - [`cni`]: running a CNI plugin the way a runtime does.
//! - [`bgp`]: a real BGP peer (BIRD 2 or GoBGP) in a namespace of its own.
//! - [`trace`]: a packet tracer over a generated iptables payload.
//! - [`bins`]: where the workspace's and the upstream binaries are.
//! - [`kube`]: a real control plane (etcd + kube-apiserver) per test binary.
//! - [`guest`]: qemu guests booted from Debian's kernel (for ipip), with an
//!   initramfs per test and their console read with a deadline.

pub mod bgp;
pub mod bins;
pub mod cni;
pub mod guest;
pub mod ipam;
pub mod kube;
pub mod netns;
pub mod poll;
pub mod trace;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub use netns::{Netns, NetnsSet};
pub use poll::{eventually, eventually_every, poll_until, wait_for_message, wait_until};

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
    let out = run_ok(Command::new(cmd).args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to completion; fails the test (naming the command, its exit
/// status and stderr) unless it exits with 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
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

/// Whether `program` is an executable file: a path as given, else a name
/// looked up on `PATH` (as `Command` does).
pub fn has_program(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

/// Call first in a test that runs outside programs (daemons, reference
/// plugins): `true` when every one of `programs` is there, else
/// [`skip_or_fail`] naming the missing ones.
pub fn require_programs(test: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !has_program(p))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(
        test,
        &format!(
            "needs {} (bash scripts/setup.sh installs them)",
            missing.join(", ")
        ),
    )
}

/// The name libtest gives the running test (the name of its thread), for
/// helpers that check a precondition on a test's behalf.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string()
}

/// Like [`require_root`] for any missing precondition (a binary, a kernel
/// feature): fails unless `TABBY_ALLOW_SKIP=1`. With it, prints
/// `SKIP <test>: <why>` on stdout and stderr, appends that line to the file
/// named by `TABBY_SKIP_LOG` (what `scripts/test.sh` counts: libtest
/// captures a passing test's output) and returns `false`.
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if std::env::var("TABBY_ALLOW_SKIP").as_deref() != Ok("1") {
        panic!("{test} cannot run: {why} (set TABBY_ALLOW_SKIP=1 to count it as skipped instead)");
    }
    let line = format!("SKIP {test}: {why}");
    eprintln!("{line}");
    println!("{line}");
    if let Some(log) = std::env::var_os("TABBY_SKIP_LOG") {
        // One write of one line with O_APPEND: test binaries running in
        // parallel never interleave their lines.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            panic!(
                "{test}: append to TABBY_SKIP_LOG {}: {e}",
                log.to_string_lossy()
            );
        }
    }
    false
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
