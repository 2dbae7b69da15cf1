//! Shared by the BGP benchmarks (`lab-convergence`, `bgp-intake`), included
//! with `#[path]`: a minimal IPv4 rtnetlink reader that lives in another
//! network namespace, Ctrl-C handling, and `/proc` readings (agent start
//! times, peak RSS, per-thread CPU).
//!
//! Only what the benchmarks count is parsed: destination, gateway, route
//! type and protocol. No `unsafe`: sockets and `setns` come from nix.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// `RTPROT_BIRD`: the protocol BIRD writes its routes with.
pub const PROTO_BIRD: u8 = 12;
/// Tabby's route protocol number (`proto 201`).
pub const PROTO_TABBY: u8 = 201;
/// `RTN_BLACKHOLE`.
pub const RTN_BLACKHOLE: u8 = 6;
/// `RTMGRP_IPV4_ROUTE`: the multicast group of IPv4 route changes.
pub const GROUP_IPV4_ROUTE: u32 = 0x40;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;

/// One IPv4 route as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct V4Route {
    pub dst: Ipv4Addr,
    pub len: u8,
    pub gateway: Option<Ipv4Addr>,
    /// `RTN_*`: 1 unicast, 6 blackhole...
    pub kind: u8,
    pub protocol: u8,
}

/// What one receive returned.
pub enum Batch {
    /// Route changes: `(added, route)`; `added == false` is a delete.
    Changes(Vec<(bool, V4Route)>),
    /// Nothing within the receive timeout.
    Idle,
    /// The socket buffer overflowed (ENOBUFS): changes were lost; re-dump.
    Lost,
}

/// A NETLINK_ROUTE socket created inside a named namespace (it stays there).
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket in `/run/netns/<ns>`, subscribed to `groups` (0: none).
    pub fn open_in(ns: &str, groups: u32) -> Result<Rtnl> {
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // setns on a throwaway thread, so the caller's thread never moves.
        let fd = std::thread::spawn(move || -> Result<OwnedFd> {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkRoute,
            )
            .context("netlink socket")?;
            Ok(fd)
        })
        .join()
        .map_err(|_| anyhow!("netns thread panicked"))??;
        if groups != 0 {
            // Room for a burst of 100k notifications; root may force it.
            let _ = setsockopt(&fd, sockopt::RcvBufForce, &(256 << 20));
        }
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000))
            .context("SO_RCVTIMEO")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).context("bind netlink")?;
        Ok(Rtnl {
            fd,
            seq: 1,
            buf: vec![0; 1 << 20],
        })
    }

    /// Dumps the main IPv4 routing table.
    pub fn dump_v4(&mut self) -> Result<Vec<V4Route>> {
        self.seq += 1;
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&28u32.to_ne_bytes());
        req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
        req.extend_from_slice(&(0x1u16 | 0x300).to_ne_bytes()); // NLM_F_REQUEST | NLM_F_DUMP
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[libc_af_inet(), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // struct rtmsg
        sendto(
            self.fd.as_raw_fd(),
            &req,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .context("netlink send")?;
        let mut out = Vec::new();
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => bail!("netlink dump timed out"),
                Err(e) => bail!("netlink recv: {e}"),
            };
            let mut done = false;
            for (ty, seq, body) in messages(&self.buf[..n]) {
                if seq != self.seq {
                    continue; // a notification or an old answer
                }
                match ty {
                    NLMSG_DONE => done = true,
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        if code != 0 {
                            bail!("netlink dump: error {code}");
                        }
                    }
                    RTM_NEWROUTE => out.extend(parse_route(body)),
                    _ => {}
                }
            }
            if done {
                return Ok(out);
            }
        }
    }

    /// Waits (up to the 200 ms receive timeout) for route notifications.
    pub fn recv_changes(&mut self) -> Result<Batch> {
        let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => return Ok(Batch::Idle),
            Err(Errno::ENOBUFS) => return Ok(Batch::Lost),
            Err(e) => bail!("netlink recv: {e}"),
        };
        let mut changes = Vec::new();
        for (ty, _, body) in messages(&self.buf[..n]) {
            let added = match ty {
                RTM_NEWROUTE => true,
                RTM_DELROUTE => false,
                _ => continue,
            };
            if let Some(r) = parse_route(body) {
                changes.push((added, r));
            }
        }
        Ok(Batch::Changes(changes))
    }
}

fn libc_af_inet() -> u8 {
    AddressFamily::Inet as i32 as u8
}

/// Splits a receive buffer into `(type, seq, body)` netlink messages.
fn messages(mut buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        out.push((ty, seq, &buf[16..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// Parses `struct rtmsg` and its attributes; main-table IPv4 routes only.
fn parse_route(body: &[u8]) -> Option<V4Route> {
    if body.len() < 12 || body[0] != libc_af_inet() || body[4] != 254 {
        return None;
    }
    let (len, protocol, kind) = (body[1], body[5], body[7]);
    let (mut dst, mut gateway) = (Ipv4Addr::UNSPECIFIED, None);
    let mut attrs = &body[12..];
    while attrs.len() >= 4 {
        let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let aty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if alen < 4 || alen > attrs.len() {
            break;
        }
        let data = &attrs[4..alen];
        if data.len() == 4 {
            let a = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
            match aty {
                RTA_DST => dst = a,
                RTA_GATEWAY => gateway = Some(a),
                _ => {}
            }
        }
        attrs = &attrs[((alen + 3) & !3).min(attrs.len())..];
    }
    Some(V4Route {
        dst,
        len,
        gateway,
        kind,
        protocol,
    })
}

/// Set by SIGINT/SIGTERM once [`catch_signals`] ran.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turns SIGINT and SIGTERM into [`INTERRUPTED`], so that loops stop and the
/// cleanup guards run instead of the process dying mid-way.
pub fn catch_signals() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
                return;
            };
            loop {
                let what = tokio::select! { s = int.recv() => ("SIGINT", s), s = term.recv() => ("SIGTERM", s) };
                if what.1.is_none() {
                    return; // the signal driver went away: nothing more will come
                }
                eprintln!("\n{}: cleaning up", what.0);
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        });
    });
}

/// Fails when the user pressed Ctrl-C.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early on Ctrl-C.
pub fn nap(d: Duration) -> Result<()> {
    std::thread::sleep(d);
    check_interrupted()
}

/// `VmHWM` (peak resident set) of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Clock ticks per second of `/proc/*/stat` (`getconf CLK_TCK`, else 100).
pub fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields 3.. of `/proc/<path>/stat` (after the parenthesised name).
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    Some(
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// User + system CPU seconds of a process or thread (`/proc/.../stat`).
pub fn cpu_seconds(stat_path: &str) -> Option<f64> {
    let f = stat_fields(stat_path)?;
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck())
}

/// CPU seconds per thread name of a process, busiest first.
pub fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for task in dir.flatten() {
        let p = task.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if let Some(s) = cpu_seconds(&p.join("stat").display().to_string()) {
            *by_name.entry(name).or_default() += s;
        }
    }
    let mut v: Vec<_> = by_name.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Seconds a process has been running: boot clock now (`/proc/uptime`)
/// minus its start time (`/proc/PID/stat` field 22, or `start_ticks` when
/// given). Resolution: one clock tick (10 ms).
pub fn process_age(start_ticks: u64) -> Option<f64> {
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(up - start_ticks as f64 / clk_tck())
}
