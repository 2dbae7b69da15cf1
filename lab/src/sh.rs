//! Running the system's tools (`ip`, `nsenter`) with errors that say what
//! was run and what it printed.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

use anyhow::Context;

use crate::names::netns_path;

/// Runs `ip ARGS...`; fails with its stderr when it exits non-zero.
///
/// The lab shells out to iproute2 on purpose: every step it takes is one
/// command an operator can copy and replay.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(cmd).map(|_| ())
}

/// Runs `cmd` and returns its stdout; fails with the command line and its
/// stderr when it exits non-zero.
pub fn run(mut cmd: Command) -> anyhow::Result<String> {
    let line = describe(&cmd);
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nsenter --net=/run/netns/NS -- PROGRAM`, ready for arguments.
pub fn in_netns(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program);
    cmd
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether named namespace `ns` exists.
pub fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

/// Every named network namespace (`ip netns list`, names only).
pub fn list_netns() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Creates named namespace `ns` with its loopback up.
pub fn add_netns(ns: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// Deletes named namespace `ns`; a missing one is already deleted.
pub fn del_netns(ns: &str) -> anyhow::Result<()> {
    if !netns_exists(ns) {
        return Ok(());
    }
    ip(&["netns", "delete", ns])
}

/// Writes a `net/` sysctl inside namespace `ns`, e.g. `net/ipv4/ip_forward`.
pub fn netns_sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let handle = tabby_dataplane::NetNs::open(netns_path(ns))
        .with_context(|| format!("opening namespace {ns}"))?;
    handle
        .run(|| tabby_dataplane::sysctl::set(key, value))
        .with_context(|| format!("entering namespace {ns}"))?
        .with_context(|| format!("sysctl {key}={value} in {ns}"))
}
