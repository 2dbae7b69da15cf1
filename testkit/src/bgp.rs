//! A real BGP peer for interop tests: two fresh namespaces joined by a
//! veth, a peer daemon (BIRD 2 or GoBGP) in one of them, all removed on
//! drop, also when a test panics.

use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::sched::{setns, CloneFlags};

use crate::netns::{veth_pair, Netns};

/// The peer daemon's address on the veth.
pub const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Tabby's address on the veth.
pub const TABBY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// Tabby's AS.
pub const TABBY_ASN: u32 = 64512;
/// The prefix Tabby announces in these tests.
pub const TABBY_PREFIX: &str = "10.244.1.0/26";
/// The prefix the peer announces.
pub const PEER_PREFIX: &str = "10.244.2.0/26";

/// Runs a command, failing the test with its stderr when it fails.
pub fn run(cmd: &[&str]) -> String {
    crate::sh(cmd[0], &cmd[1..])
}

/// Two namespaces, a veth between them, a temp dir and the peer daemon;
/// all removed on drop.
pub struct Lab {
    /// The name of Tabby's namespace.
    pub tabby_ns: String,
    /// The name of the peer's namespace.
    pub peer_ns: String,
    /// Scratch directory (configs, logs, control sockets).
    pub dir: PathBuf,
    daemon: Option<Child>,
    // Dropped after the daemon is killed (fields drop in order).
    _tabby: Netns,
    _peer: Netns,
}

impl Lab {
    /// A fresh pair of namespaces; `None` when the running test is skipped
    /// (no root, or BIRD or GoBGP missing, and `TABBY_ALLOW_SKIP=1`; without
    /// it the test fails). Both daemons are required whichever the test
    /// runs: `scripts/setup.sh` installs them together.
    pub fn new() -> Option<Lab> {
        let test = crate::current_test();
        if !crate::require_root(&test)
            || !crate::require_programs(&test, &["bird", "birdc", "gobgpd", "gobgp"])
        {
            return None;
        }
        let (tabby, peer) = (Netns::new("tbgt"), Netns::new("tbgp"));
        veth_pair(
            &tabby,
            "veth-t",
            &format!("{TABBY_ADDR}/24"),
            &peer,
            "veth-p",
            &format!("{PEER_ADDR}/24"),
        );
        let dir = std::env::temp_dir().join(format!("tabby-bgp-{}", tabby.name()));
        std::fs::create_dir_all(&dir).unwrap();
        Some(Lab {
            tabby_ns: tabby.name().to_string(),
            peer_ns: peer.name().to_string(),
            dir,
            daemon: None,
            _tabby: tabby,
            _peer: peer,
        })
    }

    pub fn peer_cmd(&self, args: &[&str]) -> String {
        let mut cmd = vec!["ip", "netns", "exec", &self.peer_ns];
        cmd.extend_from_slice(args);
        let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    pub fn start_daemon(&mut self, args: &[&str]) {
        let log = File::create(self.dir.join("daemon.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.peer_ns])
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
    }

    pub fn signal_daemon(&self, signal: &str) {
        if let Some(child) = &self.daemon {
            run(&["kill", &format!("-{signal}"), &child.id().to_string()]);
        }
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn bird(&mut self, peer_asn: u32, password: Option<&str>) -> Peer {
        let password = password
            .map(|p| format!("password \"{p}\";"))
            .unwrap_or_default();
        let conf = self.dir.join("bird.conf");
        std::fs::write(
            &conf,
            format!(
                r#"router id {PEER_ADDR};
protocol device {{ scan time 10; }}
protocol direct {{ ipv4; interface "veth-p"; }}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; scan time 10; }}
protocol static static1 {{ ipv4; route {PEER_PREFIX} blackhole; }}
protocol bgp tabby {{
  local {PEER_ADDR} as {peer_asn}; neighbor {TABBY_ADDR} as {TABBY_ASN};
  hold time 9; keepalive time 3; connect retry time 2; error wait time 1, 5; {password}
  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
"#
            ),
        )
        .unwrap();
        let ctl = self.dir.join("bird.ctl").display().to_string();
        let pid = self.dir.join("bird.pid").display().to_string();
        self.start_daemon(&[
            "bird",
            "-f",
            "-c",
            &conf.display().to_string(),
            "-s",
            &ctl,
            "-P",
            &pid,
        ]);
        Peer::Bird { ctl }
    }

    pub fn gobgp(&mut self, peer_asn: u32, password: Option<&str>) -> Peer {
        let password = password
            .map(|p| format!("auth-password = \"{p}\""))
            .unwrap_or_default();
        let conf = self.dir.join("gobgpd.toml");
        std::fs::write(
            &conf,
            format!(
                r#"[global.config]
  as = {peer_asn}
  router-id = "{PEER_ADDR}"
  local-address-list = ["{PEER_ADDR}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{TABBY_ADDR}"
    peer-as = {TABBY_ASN}
    {password}
  [neighbors.timers.config]
    connect-retry = 2
    hold-time = 9
    keepalive-interval = 3
"#
            ),
        )
        .unwrap();
        self.start_daemon(&[
            "gobgpd",
            "-f",
            &conf.display().to_string(),
            "--api-hosts",
            "127.0.0.1:50051",
        ]);
        Peer::Gobgp
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_daemon();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The daemon running in the peer namespace.
pub enum Peer {
    /// BIRD 2, with its control socket.
    Bird {
        /// The control socket.
        ctl: String,
    },
    /// GoBGP, with its API on 127.0.0.1:50051 of the peer namespace.
    Gobgp,
}

impl Peer {
    /// Whether the peer has Tabby's prefix (BIRD: in its table and the kernel).
    pub fn has_tabby_route(&self, lab: &Lab) -> bool {
        match self {
            Peer::Bird { ctl } => {
                lab.peer_cmd(&["birdc", "-s", ctl, "show", "route", TABBY_PREFIX])
                    .contains(TABBY_PREFIX)
                    && lab
                        .peer_cmd(&["ip", "route", "show", TABBY_PREFIX])
                        .contains("proto bird")
            }
            Peer::Gobgp => lab
                .peer_cmd(&[
                    "gobgp",
                    "-u",
                    "127.0.0.1",
                    "-p",
                    "50051",
                    "neighbor",
                    &TABBY_ADDR.to_string(),
                    "adj-in",
                ])
                .contains(TABBY_PREFIX),
        }
    }

    pub fn announce(&self, lab: &Lab) {
        if let Peer::Gobgp = self {
            lab.peer_cmd(&[
                "gobgp",
                "-u",
                "127.0.0.1",
                "-p",
                "50051",
                "global",
                "rib",
                "add",
                PEER_PREFIX,
                "-a",
                "ipv4",
            ]);
        }
    }

    /// Announces the peer's prefix again after [`Peer::withdraw`].
    pub fn announce_again(&self, lab: &Lab) {
        match self {
            Peer::Bird { ctl } => {
                lab.peer_cmd(&["birdc", "-s", ctl, "enable", "static1"]);
            }
            Peer::Gobgp => self.announce(lab),
        }
    }

    pub fn withdraw(&self, lab: &Lab) {
        match self {
            Peer::Bird { ctl } => lab.peer_cmd(&["birdc", "-s", ctl, "disable", "static1"]),
            Peer::Gobgp => lab.peer_cmd(&[
                "gobgp",
                "-u",
                "127.0.0.1",
                "-p",
                "50051",
                "global",
                "rib",
                "del",
                PEER_PREFIX,
                "-a",
                "ipv4",
            ]),
        };
    }
}

/// Runs `body` on a new thread inside namespace `ns`, on its own runtime.
pub fn in_netns<Fut: Future<Output = ()>>(ns: &str, body: impl FnOnce() -> Fut + Send + 'static) {
    let ns = File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}
