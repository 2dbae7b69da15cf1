//! Processes the lab starts (agents, echo servers): spawning them detached
//! inside a namespace, recognising them again later, and stopping them.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::names::netns_path;

/// How long stopped processes get between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// A process the lab started, identified by pid *and* start time so that a
/// recycled pid is never signalled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    /// The process id.
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

impl ProcRef {
    /// Whether this very process is still running (a zombie counts as gone).
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }
}

/// The state letter and start time of `pid`, from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is the start time.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

/// Identifies a running process by pid.
pub fn proc_ref(pid: i32) -> Option<ProcRef> {
    proc_stat(pid).map(|(_, start_time)| ProcRef { pid, start_time })
}

/// Starts `program args...` inside namespace `ns` (through `nsenter --net`,
/// which execs it, so the pid is the program's), detached from the caller's
/// terminal and process group, with stdout and stderr appended to `log`.
pub fn spawn_in_netns(
    ns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<ProcRef> {
    launch(&Launch {
        netns: Some(ns),
        ..Launch::new(program, args, log)
    })
}

/// How to start a detached process: in which namespaces and cgroup.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// A named network namespace.
    pub netns: Option<&'a str>,
    /// A mount namespace file (a node's).
    pub mount_ns: Option<&'a Path>,
    /// A UTS namespace file (a node's).
    pub uts_ns: Option<&'a Path>,
    /// The `cgroup.procs` files the process joins before it execs the
    /// program (every hierarchy's), so that its children are in the tree too.
    pub cgroup_procs: Vec<PathBuf>,
    /// Extra environment.
    pub env: Vec<(&'a str, String)>,
    /// The program.
    pub program: &'a Path,
    /// Its arguments.
    pub args: &'a [String],
    /// Where stdout and stderr go (appended).
    pub log: &'a Path,
}

impl<'a> Launch<'a> {
    /// `program args...` in the caller's namespaces and cgroups.
    pub fn new(program: &'a Path, args: &'a [String], log: &'a Path) -> Launch<'a> {
        Launch {
            netns: None,
            mount_ns: None,
            uts_ns: None,
            cgroup_procs: Vec::new(),
            env: Vec::new(),
            program,
            args,
            log,
        }
    }
}

/// Starts `l.program`, detached from the caller's terminal and process
/// group, entering the namespaces with `nsenter` and the cgroup with a
/// `sh` that execs the program: the pid returned is the program's.
pub fn launch(l: &Launch<'_>) -> anyhow::Result<ProcRef> {
    let out = open_log(l.log)?;
    let err = out.try_clone().context("duplicating the log file")?;
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    let namespaces = [
        l.netns
            .map(|ns| format!("--net={}", netns_path(ns).display())),
        l.mount_ns.map(|f| format!("--mount={}", f.display())),
        l.uts_ns.map(|f| format!("--uts={}", f.display())),
    ];
    if namespaces.iter().any(Option::is_some) {
        argv.push("nsenter".into());
        argv.extend(namespaces.into_iter().flatten().map(Into::into));
        argv.push("--".into());
    }
    if !l.cgroup_procs.is_empty() {
        // $0 is `sh`, "$@" the program and its arguments.
        let script =
            r#"for f in $TABBY_LAB_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done; exec "$@""#;
        argv.extend(["sh", "-c", script, "sh"].map(Into::into));
    }
    argv.push(l.program.into());
    argv.extend(l.args.iter().map(Into::into));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let procs: Vec<String> = l
        .cgroup_procs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    cmd.env("TABBY_LAB_CGROUP_PROCS", procs.join(" "));
    for (key, value) in &l.env {
        cmd.env(key, value);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", l.program.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // The child is reparented to init when the lab exits; it is never waited on here.
    proc_ref(pid).with_context(|| {
        format!(
            "{} exited at once (see {})",
            l.program.display(),
            l.log.display()
        )
    })
}

fn open_log(log: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))
}

/// The pids of every process inside named namespace `ns` (`ip netns pids`).
pub fn netns_pids(ns: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills `p` with SIGKILL at once (a crash, for tests) and waits until it is gone.
pub fn kill_now(p: &ProcRef) -> anyhow::Result<()> {
    kill(Pid::from_raw(p.pid), Signal::SIGKILL)
        .with_context(|| format!("SIGKILL pid {}", p.pid))?;
    if poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
        !p.alive()
    }) {
        Ok(())
    } else {
        anyhow::bail!("pid {} survived SIGKILL", p.pid)
    }
}

/// Stops `procs`: SIGTERM to each, then SIGKILL to those still running
/// after `grace`. Returns how many needed SIGKILL.
pub fn stop_all(procs: &[ProcRef], grace: Duration) -> usize {
    let live: Vec<&ProcRef> = procs.iter().filter(|p| p.alive()).collect();
    for p in &live {
        // ESRCH means it just went away: that is what we want.
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut remaining: Vec<&ProcRef> = live;
    while !remaining.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        remaining.retain(|p| p.alive());
    }
    for p in &remaining {
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
    }
    let killed = remaining.len();
    let deadline = Instant::now() + Duration::from_secs(2);
    while remaining.iter().any(|p| p.alive()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

/// Polls `check` every `every` until it returns true or `timeout` passes.
pub fn poll_until(timeout: Duration, every: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_recognised_and_a_wrong_start_time_is_not() {
        let me = proc_ref(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let impostor = ProcRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.alive());
    }

    #[test]
    fn stopping_a_child_terminates_it_and_a_gone_process_is_ignored() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let r = proc_ref(child.id() as i32).unwrap();
        let waiter = std::thread::spawn(move || child.wait().unwrap());
        assert_eq!(
            stop_all(std::slice::from_ref(&r), Duration::from_secs(2)),
            0
        );
        assert!(!waiter.join().unwrap().success());
        assert!(!r.alive());
        assert_eq!(stop_all(&[r], Duration::from_secs(1)), 0);
    }
}
