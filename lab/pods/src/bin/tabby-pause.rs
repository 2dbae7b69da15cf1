//! `tabby-pause`: the lab's pause image, the process that holds a pod's
//! namespaces. Like Kubernetes' pause: waits for SIGTERM or SIGINT (exit 0)
//! and reaps every child reparented to it (SIGCHLD), nothing else.

use std::process::ExitCode;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> ExitCode {
    // Handlers, not blocked default actions: a PID namespace's init never
    // sees signals whose action is the default.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGCHLD]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tabby-pause: installing signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    for signal in signals.forever() {
        match signal {
            SIGCHLD => reap(),
            _ => {
                eprintln!("tabby-pause: shutting down, got signal {signal}");
                return ExitCode::SUCCESS;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Reaps every exited child; returns when none is left to reap.
fn reap() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}
