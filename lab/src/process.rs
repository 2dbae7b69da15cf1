//! Processes the lab starts (agents, echo servers): spawning them detached
//! inside a namespace, recognising them again later, and stopping them.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::Path;
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
    let out = open_log(log)?;
    let err = out.try_clone().context("duplicating the log file")?;
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", program.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // The child is reparented to init when the lab exits; it is never waited on here.
    proc_ref(pid).with_context(|| {
        format!(
            "{} exited at once (see {})",
            program.display(),
            log.display()
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
