//! One qemu process per guest: booted with `-accel tcg` from qboot and the
//! PVH kernel, its serial console on stdout read by a thread, killed on drop.

use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Kernel, QBOOT, QEMU};

/// A virtio NIC whose frames travel as UDP datagrams on the loopback
/// (`-netdev socket,udp=...,localaddr=...`): no listener has to come first.
#[derive(Debug, Clone)]
pub struct Nic {
    /// The guest's MAC.
    pub mac: String,
    /// The UDP port this end receives on.
    pub local: u16,
    /// The UDP port of the other end.
    pub remote: u16,
}

static MACS: AtomicU32 = AtomicU32::new(1);

/// Two NICs joined by a wire: give one to each guest.
pub fn link() -> [Nic; 2] {
    // Ports the kernel just handed out, free again when qemu binds them.
    let port = || {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free UDP port")
            .port()
    };
    let (a, b) = (port(), port());
    let mac = || {
        let n = MACS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        format!(
            "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
            (pid >> 8) & 0xff,
            pid & 0xff,
            (n >> 8) & 0xff,
            n & 0xff
        )
    };
    [
        Nic {
            mac: mac(),
            local: a,
            remote: b,
        },
        Nic {
            mac: mac(),
            local: b,
            remote: a,
        },
    ]
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// A name for messages and the console log.
    pub name: String,
    /// Initramfs archives, concatenated in this order.
    pub initrd: Vec<PathBuf>,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// The NICs: eth0, eth1, ... in this order.
    pub nics: Vec<Nic>,
}

/// A running guest; dropping it kills qemu.
pub struct Guest {
    name: String,
    child: Child,
    lines: Receiver<String>,
    console: Arc<Mutex<Vec<String>>>,
    started: Instant,
    _dir: tempfile::TempDir,
}

/// What a guest reported before it powered off.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The guest's name.
    pub name: String,
    /// `TABBY-RESULT key=value` lines, in order.
    pub results: Vec<(String, String)>,
    /// `TABBY-FAIL` lines.
    pub failures: Vec<String>,
    /// The script's exit status (`TABBY-EXIT`), `None` if it never ended.
    pub exit: Option<i32>,
    /// Seconds of guest uptime when `/init` started the script.
    pub booted_at: Option<f64>,
    /// From starting qemu to its exit.
    pub wall: Duration,
    /// Every console line.
    pub console: Vec<String>,
}

impl GuestRun {
    /// The last value of `key`; fails the test (with the console) if absent.
    pub fn get(&self, key: &str) -> &str {
        self.results
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{}: no result {key}\n{}", self.name, self.console_text()))
    }

    /// The last value of `key` parsed as a number.
    pub fn number(&self, key: &str) -> u64 {
        let v = self.get(key);
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{}: result {key}={v:?} is not a number", self.name))
    }

    /// Fails the test, showing the console, unless the script exited 0
    /// without a `TABBY-FAIL`.
    pub fn assert_ok(&self) {
        assert!(
            self.exit == Some(0) && self.failures.is_empty(),
            "guest {} exited {:?} with failures {:?}; console:\n{}",
            self.name,
            self.exit,
            self.failures,
            self.console_text()
        );
    }

    /// The console as one text.
    pub fn console_text(&self) -> String {
        self.console.join("\n")
    }
}

impl Guest {
    /// Starts qemu; the guest boots in the background.
    pub fn boot(kernel: &Kernel, spec: &GuestSpec) -> Guest {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tabby-guest-{}-", spec.name))
            .tempdir()
            .expect("a guest directory");
        let initrd = dir.path().join("initrd.cpio");
        concat(&spec.initrd, &initrd);
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-bios",
            QBOOT,
        ])
        .args(["-m", &spec.memory_mb.to_string(), "-smp", "1"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(kernel.vmlinux())
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"]);
        for (i, nic) in spec.nics.iter().enumerate() {
            cmd.arg("-netdev").arg(format!(
                "socket,id=n{i},udp=127.0.0.1:{},localaddr=127.0.0.1:{}",
                nic.remote, nic.local
            ));
            cmd.arg("-device").arg(format!(
                "virtio-net-pci,netdev=n{i},mac={},romfile=",
                nic.mac
            ));
        }
        let stderr = std::fs::File::create(dir.path().join("qemu.stderr")).expect("qemu's log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {QEMU}: {e}"));
        let (tx, lines) = mpsc::channel();
        let console = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let log = Arc::clone(&console);
        std::thread::spawn(move || read_console(stdout, &tx, &log));
        Guest {
            name: spec.name.clone(),
            child,
            lines,
            console,
            started: Instant::now(),
            _dir: dir,
        }
    }

    /// Waits until the guest powers off or `deadline` passes (then kills
    /// it and fails the test with its console).
    pub fn wait(mut self, deadline: Instant) -> GuestRun {
        let mut run = GuestRun {
            name: self.name.clone(),
            results: Vec::new(),
            failures: Vec::new(),
            exit: None,
            booted_at: None,
            wall: Duration::ZERO,
            console: Vec::new(),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => parse_marker(&line, &mut run),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "guest {} did not power off in time; console:\n{}\nqemu: {}",
                        self.name,
                        self.console_text(),
                        self.qemu_log()
                    );
                }
            }
        }
        let status = self.child.wait().expect("wait for qemu");
        run.wall = self.started.elapsed();
        run.console = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        assert!(
            status.success(),
            "qemu of guest {} exited with {status}: {}\nconsole:\n{}",
            self.name,
            self.qemu_log(),
            run.console_text()
        );
        run
    }

    fn console_text(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    fn qemu_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("qemu.stderr")).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_console(stdout: impl Read, tx: &mpsc::Sender<String>, log: &Mutex<Vec<String>>) {
    for line in BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line)
            .trim_end_matches('\r')
            .to_string();
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.clone());
        if tx.send(line).is_err() {
            break;
        }
    }
}

fn parse_marker(line: &str, run: &mut GuestRun) {
    // A marker may follow kernel output on the same console line.
    let Some(at) = line.find("TABBY-") else {
        return;
    };
    let marker = &line[at..];
    if let Some(rest) = marker.strip_prefix("TABBY-RESULT ") {
        if let Some((k, v)) = rest.split_once('=') {
            run.results.push((k.to_string(), v.to_string()));
        }
    } else if let Some(rest) = marker.strip_prefix("TABBY-FAIL ") {
        run.failures.push(rest.to_string());
    } else if let Some(rest) = marker.strip_prefix("TABBY-EXIT ") {
        run.exit = rest.trim().parse().ok();
    } else if let Some(rest) = marker.strip_prefix("TABBY-BOOTED ") {
        run.booted_at = rest.trim().parse().ok();
    }
}

fn concat(parts: &[PathBuf], out: &Path) {
    let mut file = std::fs::File::create(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    for part in parts {
        let mut src =
            std::fs::File::open(part).unwrap_or_else(|e| panic!("{}: {e}", part.display()));
        std::io::copy(&mut src, &mut file).unwrap_or_else(|e| panic!("{}: {e}", part.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_become_results_failures_and_the_exit_status() {
        let mut run = GuestRun {
            name: "g".into(),
            results: vec![],
            failures: vec![],
            exit: None,
            booted_at: None,
            wall: Duration::ZERO,
            console: vec![],
        };
        for line in [
            "[    1.0] random kernel line",
            "TABBY-BOOTED 2.51",
            "TABBY-RESULT route=10.244.0.64/26 via 10.98.0.2 dev tunl0 proto 201 onlink",
            "TABBY-FAIL timed out waiting for x",
            "[    3.2] virtio_net: TABBY-RESULT n=1",
            "TABBY-EXIT 0",
        ] {
            parse_marker(line, &mut run);
        }
        assert_eq!(run.booted_at, Some(2.51));
        assert_eq!(
            run.get("route"),
            "10.244.0.64/26 via 10.98.0.2 dev tunl0 proto 201 onlink"
        );
        assert_eq!(run.number("n"), 1);
        assert_eq!(run.failures, ["timed out waiting for x"]);
        assert_eq!(run.exit, Some(0));
    }
}
