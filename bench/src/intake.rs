//! Helpers of `bgp-intake` (included with `#[path]`): the daemons it runs,
//! GoBGP's RIB loading from a generated MRT stream, and the kernel watchers
//! that count each receiver's routes.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tabby_testkit::{run_ok, Netns};

use super::rtnl::{self, nap, Batch, Rtnl, GROUP_IPV4_ROUTE};
use super::{ASN, FIRST, GOBGP_T};

/// A daemon in a namespace; SIGTERM (then SIGKILL after 3 s) on drop.
pub struct Daemon {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(name: &'static str, ns: &Netns, dir: &Path, args: &[&str]) -> Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = ns
            .command(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", args[0]))?;
        Ok(Daemon { name, child, log })
    }
    pub fn pid(&self) -> u32 {
        self.child.id() // `ip netns exec` execs the daemon: same pid
    }
    pub fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let _ = kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one receiver's watcher saw.
#[derive(Default)]
pub struct Seen {
    pub count: usize,
    pub first: Option<Instant>,
    pub full: Option<Instant>,
    pub lost: usize,
}

/// Counts a receiver's routes in the range from kernel notifications, on its own thread.
pub struct Watcher {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    pub fn start(ns: &str, proto: u8, want: usize) -> Result<Watcher> {
        let mut sock = Rtnl::open_in(ns, GROUP_IPV4_ROUTE)?;
        let (seen, stop) = (
            Arc::new(Mutex::new(Seen::default())),
            Arc::new(AtomicBool::new(false)),
        );
        let (s2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let lo = u32::from(FIRST);
        let ours = move |r: &rtnl::V4Route| {
            r.protocol == proto && r.len == 32 && (lo..lo + want as u32).contains(&u32::from(r.dst))
        };
        let thread = std::thread::spawn(move || {
            let mut set = HashSet::with_capacity(want);
            while !stop2.load(Ordering::Relaxed) {
                let changes = match sock.recv_changes() {
                    Ok(Batch::Changes(c)) => c,
                    Ok(Batch::Idle) => continue,
                    Ok(Batch::Lost) | Err(_) => {
                        // Overflowed: resynchronise from a dump (adds only in this benchmark).
                        s2.lock().unwrap().lost += 1;
                        sock.dump_v4()
                            .unwrap_or_default()
                            .into_iter()
                            .filter(&ours)
                            .map(|r| (true, r))
                            .collect()
                    }
                };
                let now = Instant::now();
                for (added, r) in changes.iter().filter(|(_, r)| ours(r)) {
                    if *added {
                        set.insert(r.dst)
                    } else {
                        set.remove(&r.dst)
                    };
                }
                let mut s = s2.lock().unwrap();
                s.count = set.len();
                if s.first.is_none() && s.count > 0 {
                    s.first = Some(now);
                }
                if s.full.is_none() && s.count == want {
                    s.full = Some(now);
                }
            }
        });
        Ok(Watcher {
            seen,
            stop,
            thread: Some(thread),
        })
    }
    pub fn get<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fills GoBGP's global RIB with `n` /32s: `gobgp mrt inject global` reads
/// them from a FIFO that stays open until GoBGP's RIB holds all of them
/// (gobgp 3.10's CLI drops whatever its server has not processed yet when
/// it exits at end of file: a plain file loaded only ~450 of 1,000).
pub fn load_rib(g: &Netns, dir: &Path, n: u32) -> Result<()> {
    let fifo = dir.join("routes.mrt");
    run_ok(Command::new("mkfifo").arg(&fifo));
    let mut inject = Daemon::start(
        "gobgp-inject",
        g,
        dir,
        &[
            "gobgp",
            "-u",
            "127.0.0.1",
            "-p",
            "50051",
            "mrt",
            "inject",
            "global",
            &fifo.display().to_string(),
        ],
    )?;
    let data = mrt(n);
    let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
    // The open blocks until the CLI opens its end; on failure the thread
    // stays blocked until the process exits.
    std::thread::spawn(move || {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&fifo) {
            let _ = std::io::Write::write_all(&mut f, &data);
            let _ = close_rx.recv();
        }
    });
    let t0 = Instant::now();
    loop {
        nap(Duration::from_millis(200))?;
        let summary = gobgp(g, &["global", "rib", "summary", "-a", "ipv4"])?;
        if summary.contains(&format!("Destination: {n},")) {
            break;
        }
        inject.check_alive()?;
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "GoBGP's RIB did not reach {n} routes in 300 s: {}",
            summary.trim()
        );
    }
    drop(close_tx);
    let _ = inject.child.wait();
    Ok(())
}

/// An MRT TABLE_DUMP_V2 stream (RFC 6396): one peer, `n` /32 RIB entries.
pub fn mrt(n: u32) -> Vec<u8> {
    fn record(out: &mut Vec<u8>, subtype: u16, body: &[u8]) {
        out.extend_from_slice(&0u32.to_be_bytes()); // timestamp
        out.extend_from_slice(&13u16.to_be_bytes()); // TABLE_DUMP_V2
        out.extend_from_slice(&subtype.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    let id: Ipv4Addr = GOBGP_T.parse().expect("a constant address");
    let mut out = Vec::with_capacity(n as usize * 48);
    // PEER_INDEX_TABLE: collector id, empty view name, 1 peer (IPv4, 4-octet AS).
    let mut peers = id.octets().to_vec();
    peers.extend_from_slice(&0u16.to_be_bytes());
    peers.extend_from_slice(&1u16.to_be_bytes());
    peers.push(0x02);
    peers.extend_from_slice(&id.octets());
    peers.extend_from_slice(&id.octets());
    peers.extend_from_slice(&ASN.to_be_bytes());
    record(&mut out, 1, &peers);
    // ORIGIN IGP, empty AS_PATH (iBGP, originated), NEXT_HOP 0.0.0.0, LOCAL_PREF 100.
    let attrs: [u8; 21] = [
        0x40, 1, 1, 0, 0x40, 2, 0, 0x40, 3, 4, 0, 0, 0, 0, 0x40, 5, 4, 0, 0, 0, 100,
    ];
    for i in 0..n {
        let mut rib = i.to_be_bytes().to_vec(); // sequence number
        rib.push(32);
        rib.extend_from_slice(&(u32::from(FIRST) + i).to_be_bytes());
        rib.extend_from_slice(&1u16.to_be_bytes()); // entry count
        rib.extend_from_slice(&0u16.to_be_bytes()); // peer index
        rib.extend_from_slice(&0u32.to_be_bytes()); // originated time
        rib.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        rib.extend_from_slice(&attrs);
        record(&mut out, 2, &rib); // RIB_IPV4_UNICAST
    }
    out
}

pub fn gobgp(ns: &Netns, args: &[&str]) -> Result<String> {
    let out = run_ok(
        ns.command("gobgp")
            .args(["-u", "127.0.0.1", "-p", "50051"])
            .args(args),
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
