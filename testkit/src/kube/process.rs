//! Child processes that die with the test process.
//!
//! A control plane kept in a `static` is never dropped, so its processes
//! must end by themselves when the test binary exits. Each one is started
//! through `setpriv --pdeathsig KILL`, whose parent-death signal fires when
//! the *thread* that forked it exits: so every spawn happens on one thread
//! that lives as long as the process (no `pre_exec`, `unsafe` is denied).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Error, Result};

/// What to run: a program, its arguments and the file its output goes to.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Where stdout and stderr go (appended).
    pub log: PathBuf,
    /// The signal the child gets when the test process exits.
    pub death_signal: &'static str,
}

type Reply = mpsc::Sender<std::io::Result<Child>>;

/// The thread every tied child is forked from.
fn spawner() -> &'static Mutex<mpsc::Sender<(Spec, Reply)>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(Spec, Reply)>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Spec, Reply)>();
        std::thread::Builder::new()
            .name("tabby-testkit-spawner".into())
            .spawn(move || {
                // Lives until the process exits: the receiver never closes
                // because the sender sits in a static.
                for (spec, reply) in rx {
                    let _ = reply.send(spawn_now(&spec));
                }
            })
            .expect("spawn the testkit spawner thread");
        Mutex::new(tx)
    })
}

fn spawn_now(spec: &Spec) -> std::io::Result<Child> {
    let log = File::options().create(true).append(true).open(&spec.log)?;
    let err = log.try_clone()?;
    Command::new("setpriv")
        .args(["--pdeathsig", spec.death_signal, "--"])
        .arg(&spec.program)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
}

/// A running child tied to the test process; stopped on drop.
#[derive(Debug)]
pub struct Tied {
    child: Child,
    spec: Spec,
}

impl Tied {
    /// Starts `spec` from the spawner thread.
    pub fn spawn(spec: Spec) -> Result<Self> {
        let (reply, answer) = mpsc::channel();
        let sent = spawner()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((spec.clone(), reply));
        let gone = || std::io::Error::other("the testkit spawner thread is gone");
        let spawned = match sent {
            Ok(()) => answer.recv().unwrap_or_else(|_| Err(gone())),
            Err(_) => Err(gone()),
        };
        let child = spawned.map_err(|e| Error::Spawn {
            program: spec.program.display().to_string(),
            source: e,
        })?;
        Ok(Self { child, spec })
    }

    /// What it runs.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.spec.log, lines)
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for it to exit.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // setpriv has exec'd the program: this pid is the program itself.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tied {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The last `lines` lines of a file ("" when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes `dir` when the test process exits, whatever way it exits: a
/// tied shell waits for its parent-death signal and then deletes it.
pub fn remove_at_exit(dir: &Path) -> Result<()> {
    let script = r#"trap 'kill $! 2>/dev/null; for i in 1 2 3 4 5; do rm -rf -- "$0" 2>/dev/null && break; sleep 0.2; done; exit 0' TERM
while :; do sleep 3600 & wait $!; done"#;
    let spec = Spec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into(), dir.as_os_str().to_owned()],
        log: "/dev/null".into(),
        death_signal: "TERM",
    };
    let tied = Tied::spawn(spec)?;
    // Never stopped by us: it must outlive every other child.
    std::mem::forget(tied);
    Ok(())
}
