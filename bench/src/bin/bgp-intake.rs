//! `bgp-intake`: how fast 100,000 BGP routes reach the kernel through
//! (a) `tabby-node` and (b) BIRD 2, both fed by the same GoBGP in one run.
//!
//! ```text
//!            10.97.1.1/24 ── veth ── 10.97.1.2  ns ib-tabby-*: tabby-node (proto 201)
//!  ns ib-gobgp-*: gobgpd
//!            10.97.2.1/24 ── veth ── 10.97.2.2  ns ib-bird-*:  bird, kernel export all (proto bird)
//! ```
//!
//! 1. gobgpd starts with both receivers configured `admin-down`, and its RIB
//!    is filled with 100.64.0.0 .. +99,999 as /32s by `gobgp mrt inject
//!    global` of an MRT TABLE_DUMP_V2 file written here (one gRPC stream
//!    fed through a FIFO: seconds, where one `gobgp global rib add` per
//!    prefix would take over an hour).
//!    Next hop 0.0.0.0: GoBGP sends its local address on each iBGP session.
//! 2. tabby-node (a file datastore with GoBGP as a global `BGPPeer`, iBGP AS
//!    64512, no other node) and BIRD start; netlink watchers subscribe to
//!    IPv4 route changes in both receiver namespaces.
//! 3. GoBGP's neighbors are enabled (`gobgp neighbor X enable`): by default
//!    tabby-node's first, BIRD's once tabby-node has every route, so the two
//!    receivers do not compete for the 2 cores; `--together` enables both at
//!    once. GoBGP sends its whole RIB as soon as a session is Established.
//! 4. The watchers count each receiver's routes in the range (by protocol)
//!    from the kernel's notifications (a listener costs each receiver the
//!    same per-route multicast); progress is printed every second and a
//!    final netlink dump checks the counts.
//!
//! Intake time = from the session's Established (seen by polling `gobgp
//! neighbor` every 100 ms, or the first route if that came earlier) to the
//! last route in the kernel; first -> last route and the time from the
//! enable are printed too. Also: routes/s, the ratio a/b (target ≤ 1.0),
//! peak RSS (VmHWM) and CPU seconds of each daemon, tabby-node's CPU per
//! thread (where its time goes).
//!
//! Everything (daemons, namespaces, temp dir) is removed on drop, also on
//! error, panic or Ctrl-C. Run (root): `cargo run --release -p tabby-bench
//! --bin bgp-intake [-- --prefixes N] [--together]` (`--help` says more);
//! needs `bird`, `gobgpd`, `gobgp`.

#[path = "../intake.rs"]
mod intake;
#[path = "../rtnl.rs"]
mod rtnl;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use intake::{gobgp, load_rib, Daemon, Watcher};
use rtnl::{nap, Rtnl, PROTO_BIRD, PROTO_TABBY};
use tabby_testkit::{run_ok, Netns};

const ASN: u32 = 64512;
const FIRST: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
const GOBGP_T: &str = "10.97.1.1";
const TABBY: &str = "10.97.1.2";
const GOBGP_B: &str = "10.97.2.1";
const BIRD: &str = "10.97.2.2";
const DEADLINE: Duration = Duration::from_secs(600);

/// When a receiver's session was enabled and seen Established.
#[derive(Default, Clone, Copy)]
struct Timing {
    enable: Option<Instant>,
    established: Option<Instant>,
}

const PEERS: [&str; 2] = [TABBY, BIRD];

/// Enables GoBGP's sessions to the receivers `which` (0 tabby-node, 1 BIRD)
/// and waits until each has every route in its kernel, printing progress.
fn enable_and_wait(
    g: &Netns,
    which: &[usize],
    w: &[&Watcher; 2],
    daemons: &mut [Daemon],
    times: &mut [Timing; 2],
) -> Result<()> {
    let t0 = Instant::now();
    for &i in which {
        gobgp(g, &["neighbor", PEERS[i], "enable"])?;
        times[i].enable = Some(Instant::now());
    }
    let mut last_print = Instant::now();
    while !which.iter().all(|&i| w[i].get(|s| s.full.is_some())) {
        nap(Duration::from_millis(100))?;
        if which.iter().any(|&i| times[i].established.is_none()) {
            let table = gobgp(g, &["neighbor"]).unwrap_or_default();
            for &i in which {
                let up = table
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(PEERS[i]) && l.contains("Establ"));
                if up && times[i].established.is_none() {
                    times[i].established = Some(Instant::now());
                    println!(
                        "  {:>5.2} s: session with {} Established",
                        t0.elapsed().as_secs_f64(),
                        PEERS[i]
                    );
                }
            }
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "  {:>5.2} s: tabby-node {:>6} routes, bird {:>6} routes",
                t0.elapsed().as_secs_f64(),
                w[0].get(|s| s.count),
                w[1].get(|s| s.count)
            );
        }
        for d in daemons.iter_mut() {
            d.check_alive()?;
        }
        if t0.elapsed() > DEADLINE {
            println!("WARNING: gave up waiting after {} s", DEADLINE.as_secs());
            break;
        }
    }
    Ok(())
}

fn secs(from: Instant, to: Option<Instant>) -> Option<f64> {
    to.map(|t| t.saturating_duration_since(from).as_secs_f64())
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{s:.2} s"))
}

const HELP: &str = "\
bgp-intake: GoBGP announces N /32s to (a) tabby-node and (b) BIRD 2 in the same
run; prints each receiver's intake time (session Established -> all routes in
the kernel), the ratio a/b (target <= 1.0), peak RSS (VmHWM) and CPU.

usage: bgp-intake [--prefixes N] [--together]
  --prefixes N   routes GoBGP announces (default 100000, at most 1048576)
  --together     enable both sessions at once (default: tabby-node's first,
                 BIRD's once tabby-node has every route)
  -h, --help     this text

Needs root, bird, gobgpd and gobgp, and the release binaries:
cargo build --release -p tabby-bench -p tabby-node -p tabby-ctl";

fn main() -> std::process::ExitCode {
    rtnl::catch_signals();
    tabby_bench::exit_code("bgp-intake", real_main())
}

/// The command line: how many prefixes, whether both sessions start together.
struct Options {
    prefixes: u32,
    together: bool,
}

/// Parses the flags; `None` after printing the help.
fn options() -> Result<Option<Options>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{HELP}");
        return Ok(None);
    }
    if let Some(a) = args
        .iter()
        .find(|a| a.starts_with('-') && !["--prefixes", "--together"].contains(&a.as_str()))
    {
        bail!("unknown option {a} (see --help)");
    }
    let prefixes: u32 = tabby_bench::flag(&args, "--prefixes", 100_000)?;
    anyhow::ensure!(
        (1..=1 << 20).contains(&prefixes),
        "--prefixes must be 1..=1048576"
    );
    let together = args.iter().any(|a| a == "--together");
    Ok(Some(Options { prefixes, together }))
}

/// Root, the release binaries (tabby-node, tabbyctl) and the peers' tools.
fn check_prerequisites() -> Result<(PathBuf, PathBuf)> {
    let release =
        tabby_bench::release_dir(&["tabby-node", "tabbyctl"], "-p tabby-node -p tabby-ctl")?;
    let (node_bin, ctl_bin) = (release.join("tabby-node"), release.join("tabbyctl"));
    for tool in ["bird", "gobgpd", "gobgp"] {
        Command::new(tool)
            .arg("--version")
            .output()
            .with_context(|| format!("`{tool}` is not installed (apt-get install bird2 gobgpd)"))?;
    }
    Ok((node_bin, ctl_bin))
}

/// GoBGP's namespace joined to each receiver's by a veth.
fn namespaces(dir: &Path) -> Result<(Netns, Netns, Netns)> {
    let (g, t, b) = (
        Netns::new("ib-gobgp"),
        Netns::new("ib-tabby"),
        Netns::new("ib-bird"),
    );
    for (ns, dev, mine, peer) in [
        (&t, "to-tabby", GOBGP_T, TABBY),
        (&b, "to-bird", GOBGP_B, BIRD),
    ] {
        let link = ["link", "add", dev, "type", "veth", "peer", "name", "eth0"];
        g.ip(&[&link[..], &["netns", ns.name()]].concat());
        g.ip(&["addr", "add", &format!("{mine}/24"), "dev", dev]);
        g.ip(&["link", "set", dev, "up"]);
        ns.ip(&["addr", "add", &format!("{peer}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
    }
    println!(
        "namespaces: {} (gobgpd), {} (tabby-node), {} (bird); files in {}",
        g.name(),
        t.name(),
        b.name(),
        dir.display()
    );
    Ok((g, t, b))
}

/// gobgpd with both neighbors admin-down, then its RIB of `n` routes.
fn start_gobgp(g: &Netns, dir: &Path, n: u32) -> Result<Daemon> {
    let neighbor = |addr: &str| {
        format!("[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{addr}\"\n    peer-as = {ASN}\n    admin-down = true\n  [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 90\n    keepalive-interval = 30\n")
    };
    let conf = dir.join("gobgpd.toml");
    std::fs::write(
        &conf,
        format!(
            "[global.config]\n  as = {ASN}\n  router-id = \"{GOBGP_T}\"\n{}{}",
            neighbor(TABBY),
            neighbor(BIRD)
        ),
    )?;
    let conf = conf.display().to_string();
    let args = [
        "gobgpd",
        "-f",
        &conf,
        "--api-hosts",
        "127.0.0.1:50051",
        "-l",
        "warn",
    ];
    let mut daemon = Daemon::start("gobgpd", g, dir, &args)?;
    let t0 = Instant::now();
    while gobgp(g, &["global"]).is_err() {
        daemon.check_alive()?;
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "gobgpd's API did not come up in 20 s"
        );
        nap(Duration::from_millis(100))?;
    }
    let t0 = Instant::now();
    load_rib(g, dir, n)?;
    println!(
        "GoBGP RIB loaded with {n} routes in {:.2} s (gobgp mrt inject)",
        t0.elapsed().as_secs_f64()
    );
    Ok(daemon)
}

/// tabby-node (GoBGP as a global BGPPeer in a file datastore) and BIRD.
fn start_receivers(
    (t, b): (&Netns, &Netns),
    dir: &Path,
    (node_bin, ctl_bin): (&Path, &Path),
) -> Result<[Daemon; 2]> {
    let ds = dir.join("datastore");
    let asn = ASN.to_string();
    let peer = [
        "bgp",
        "peer",
        "create",
        "--name",
        "gobgp",
        "--peer-ip",
        GOBGP_T,
        "--as-number",
        &asn,
    ];
    // Storing GoBGP as a BGPPeer.
    run_ok(Command::new(ctl_bin).arg("--datastore").arg(&ds).args(peer));
    let node_conf = dir.join("tabby-node.toml");
    std::fs::write(
        &node_conf,
        format!(
            "node_name = \"intake\"\nbgp_address = \"{TABBY}\"\ndatastore = {:?}\nuplink = \"eth0\"\nas_number = {ASN}\nhold_time = 90\nconnect_retry = 1\nstatus_socket = {:?}\nhealth_listen = \"127.0.0.1:9099\"\nmtu_file = {:?}\n",
            ds.display().to_string(),
            dir.join("node.sock").display().to_string(),
            dir.join("node.mtu").display().to_string()
        ),
    )?;
    let bird_conf = dir.join("bird.conf");
    std::fs::write(
        &bird_conf,
        format!(
            "router id {BIRD};\nprotocol device {{ scan time 10; }}\nprotocol kernel {{ ipv4 {{ export all; }}; }}\n\
             protocol bgp gobgp {{\n  local {BIRD} as {ASN}; neighbor {GOBGP_B} as {ASN};\n  connect delay time 1; connect retry time 1; error wait time 1, 2;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    )?;
    let (node_bin, node_conf) = (
        node_bin.display().to_string(),
        node_conf.display().to_string(),
    );
    let tabby = Daemon::start("tabby-node", t, dir, &[&node_bin, "--config", &node_conf])?;
    let path = |f: &str| dir.join(f).display().to_string();
    let (ctl, pid, conf) = (
        path("bird.ctl"),
        path("bird.pid"),
        bird_conf.display().to_string(),
    );
    let bird = Daemon::start(
        "bird",
        b,
        dir,
        &["bird", "-f", "-c", &conf, "-s", &ctl, "-P", &pid],
    )?;
    Ok([tabby, bird])
}

fn real_main() -> Result<()> {
    let Some(Options {
        prefixes: n,
        together,
    }) = options()?
    else {
        return Ok(());
    };
    let (node_bin, ctl_bin) = check_prerequisites()?;
    println!("bgp-intake: GoBGP announces {n} /32s from {FIRST} to (a) tabby-node and (b) BIRD 2, iBGP AS {ASN}");

    // Drop order (reverse of declaration): watchers, daemons, namespaces, temp dir.
    let dir = tempfile::Builder::new()
        .prefix("tabby-bgp-intake-")
        .tempdir()?;
    let (g, t, b) = namespaces(dir.path())?;
    // 1. gobgpd with both neighbors admin-down, then its RIB.
    let mut daemons: Vec<Daemon> = vec![start_gobgp(&g, dir.path(), n)?];
    // 2. The receivers and their kernel watchers.
    let watch_t = Watcher::start(t.name(), PROTO_TABBY, n as usize)?;
    let watch_b = Watcher::start(b.name(), PROTO_BIRD, n as usize)?;
    daemons.extend(start_receivers(
        (&t, &b),
        dir.path(),
        (&node_bin, &ctl_bin),
    )?);
    nap(Duration::from_secs(1))?;
    for d in daemons.iter_mut() {
        d.check_alive()?;
    }
    let cpu0: Vec<f64> = daemons
        .iter()
        .map(|d| rtnl::cpu_seconds(&format!("/proc/{}/stat", d.pid())).unwrap_or(0.0))
        .collect();

    // 3. Enable the sessions, one receiver after the other (or both at once).
    let watchers = [&watch_t, &watch_b];
    let mut times = [Timing::default(), Timing::default()];
    println!(
        "receivers: tabby-node pid {}, bird pid {}; {}",
        daemons[1].pid(),
        daemons[2].pid(),
        if together {
            "both sessions at once"
        } else {
            "one session at a time (they would compete for CPU)"
        }
    );
    let batches: &[&[usize]] = if together { &[&[0, 1]] } else { &[&[0], &[1]] };
    for which in batches {
        enable_and_wait(&g, which, &watchers, &mut daemons, &mut times)?;
    }
    nap(Duration::from_millis(300))?; // let both settle before the dump check

    // 4. Figures.
    report(n, (&t, &b), &watchers, &daemons, &times, &cpu0)?;
    drop((watch_t, watch_b));
    daemons.reverse(); // receivers first: no withdraw churn when gobgpd goes
    drop(daemons);
    drop((g, t, b));
    drop(dir);
    println!("cleaned up: daemons stopped, namespaces and temp dir removed");
    Ok(())
}

/// Prints each receiver's figures, the ratio, and tabby-node's threads and log.
fn report(
    n: u32,
    (t, b): (&Netns, &Netns),
    watchers: &[&Watcher; 2],
    daemons: &[Daemon],
    times: &[Timing; 2],
    cpu0: &[f64],
) -> Result<()> {
    let lo = u32::from(FIRST);
    let count = |ns: &Netns, proto: u8| -> Result<usize> {
        let routes = Rtnl::open_in(ns.name(), 0)?.dump_v4()?;
        Ok(routes
            .iter()
            .filter(|r| {
                r.protocol == proto && r.len == 32 && (lo..lo + n).contains(&u32::from(r.dst))
            })
            .count())
    };
    let dumps = [count(t, PROTO_TABBY)?, count(b, PROTO_BIRD)?];
    println!("\n== bgp-intake: {n} /32 routes, GoBGP -> kernel ==");
    let labels = ["(a) tabby-node", "(b) BIRD 2    "];
    let mut intake = [None, None];
    for i in 0..2 {
        intake[i] = receiver(
            n,
            labels[i],
            watchers[i],
            dumps[i],
            &daemons[i + 1],
            times[i],
            cpu0[i + 1],
        );
    }
    match intake {
        [Some(a), Some(b)] => println!(
            "ratio a/b (tabby-node / BIRD intake time): {:.2}  (target <= 1.0)",
            a / b
        ),
        _ => println!("ratio a/b: n/a (a receiver did not get every route)"),
    }
    println!(
        "gobgpd peak RSS {}",
        rtnl::peak_rss_mib(daemons[0].pid()).map_or("-".into(), |m| format!("{m:.1} MiB"))
    );
    let threads: Vec<String> = rtnl::thread_cpu(daemons[1].pid())
        .into_iter()
        .take(6)
        .map(|(name, s)| format!("{name} {s:.2} s"))
        .collect();
    println!(
        "tabby-node CPU by thread (whole run): {}",
        threads.join(", ")
    );
    let log = std::fs::read_to_string(&daemons[1].log).unwrap_or_default();
    let syncs = log.lines().filter(|l| l.contains("routes synced")).count();
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    println!("tabby-node log: {syncs} logged route-sync batches (of >= 50 routes), {warns} warnings/errors");
    Ok(())
}

/// Prints one receiver's figures; returns its intake time in seconds.
fn receiver(
    n: u32,
    label: &str,
    w: &Watcher,
    dump: usize,
    d: &Daemon,
    times: Timing,
    cpu0: f64,
) -> Option<f64> {
    let (first, full, lost) = w.get(|s| (s.first, s.full, s.lost));
    // GoBGP is polled every 100 ms: a first route seen earlier bounds Established.
    let est = times.established.map(|e| first.map_or(e, |f| e.min(f)));
    let t_enable = times.enable.unwrap_or_else(Instant::now);
    let intake = est.and_then(|e| secs(e, full));
    let rate = intake.map_or("-".into(), |s| format!("{:.0} routes/s", f64::from(n) / s));
    let cpu = rtnl::cpu_seconds(&format!("/proc/{}/stat", d.pid()))
        .map(|c| c - cpu0)
        .unwrap_or(f64::NAN);
    let rss = rtnl::peak_rss_mib(d.pid()).map_or("-".into(), |m| format!("{m:.1} MiB"));
    println!(
        "{label}: intake {} ({rate}): Established -> all {n} routes in the kernel",
        fmt(intake)
    );
    println!(
        "      Established {} after enable; first route +{}; first -> last route {}; from enable {}",
        fmt(secs(t_enable, est)),
        fmt(est.and_then(|e| secs(e, first))),
        fmt(first.and_then(|f| secs(f, full))),
        fmt(secs(t_enable, full))
    );
    let lost = if lost > 0 {
        format!("; {lost} notification overflows (resynced by dump)")
    } else {
        String::new()
    };
    println!("      kernel dump {dump}/{n}; CPU {cpu:.2} s; peak RSS (VmHWM) {rss}{lost}");
    intake
}
