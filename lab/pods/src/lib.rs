//! What runs inside the lab's pods, in both modes: the HTTP echo server
//! that answers like traefik/whoami, its client (ureq), and the signal
//! handling a container's PID 1 needs.
//!
//! The namespace lab runs them as `tabby-lab echo-server` / `http-get`; the
//! Kubernetes lab packs the static `tabby-echo` and `tabby-pause` binaries
//! into its images (`lab/src/kube/images.rs`).

pub mod echo;

use std::time::Duration;

/// `http-get`: GETs `url` `count` times, each on a new connection, and
/// prints every body (a line per failure when `count` > 1, so a caller can
/// count answers). Returns the exit code: 0 when every request got a 2xx
/// answer, else 22 (curl's code for HTTP errors); a lone request that
/// cannot connect is an error.
pub fn http_get(url: &str, timeout: Duration, count: u32) -> anyhow::Result<u8> {
    use std::io::Write;
    let client = echo::Client::new(timeout);
    if count <= 1 {
        let response = client.get(url)?;
        std::io::stdout().write_all(&response.body)?;
        if !(200..300).contains(&response.status) {
            eprintln!("http-get: {url} answered {}", response.status);
            return Ok(22);
        }
        return Ok(0);
    }
    let mut failed = 0;
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        match client.get(url) {
            Ok(r) if (200..300).contains(&r.status) => out.write_all(&r.body)?,
            Ok(r) => {
                failed += 1;
                writeln!(out, "error: {url} answered {}", r.status)?;
            }
            Err(e) => {
                failed += 1;
                writeln!(out, "error: {e:#}")?;
            }
        }
    }
    Ok(if failed == 0 { 0 } else { 22 })
}

/// Ends the process with status 0 on SIGTERM or SIGINT, from a thread of
/// its own. A container's PID 1 needs a handler for these: the kernel drops
/// signals whose action is the default for a namespace's init, and the
/// kubelet's SIGTERM would wait for the grace period's SIGKILL instead.
pub fn exit_on_term() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!("got signal {signal}, exiting");
                std::process::exit(0);
            }
        })?;
    Ok(())
}
