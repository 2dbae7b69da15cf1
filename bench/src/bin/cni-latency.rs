//! `cni-latency`: CNI ADD/DEL latency of Tabby against the upstream reference
//! plugins v1.10 `ptp` + `host-local`, both driven through the same libcni
//! v1.3.1 driver in the same run, and the kernel's own floor.
//!
//! Scenarios (each ADDs every pod, then DELs every pod):
//! - 200 pods one after another;
//! - 200 pods, 32 in flight at a time;
//! - 100 pods all at once on one node: wall time until all are ready.
//!
//! Candidates: (a) `tabby` + `tabby-ipam` on a file datastore, (b) upstream
//! `ptp` + `host-local` (built by `scripts/upstream.sh plugins`). Each
//! candidate runs in a fresh "host" namespace of its own and the pods live in
//! fresh namespaces; everything is removed at the end, also when a run
//! fails. Needs root.
//!
//! The floor: in a host namespace of its own, one after another for every
//! pod, one netlink request creates a bare veth pair whose peer is created
//! in the pod's (fresh, never used) namespace, and one deletes it: what any
//! veth-based plugin must pay, without IPAM, addresses, routes or exec.
//! Tabby's DEL p50 is printed as a multiple of the floor's DEL p50.
//!
//! Run: `cargo run --release -p tabby-bench --bin cni-latency` (as root).
//! Options: `--pods N` (default 200), `--concurrency K` (32), `--burst M` (100).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::json;
use tabby_conformance::{
    cnidriver, conflist, plugins_dir, release_dir, tabby_plugin, Driver, UPSTREAM_PLUGINS,
};
use tabby_testkit::{Netns, NetnsSet};

#[path = "cni-latency/floor.rs"]
mod floor;

/// One operation's summary line printed by `cnidriver bench`.
#[derive(Debug, Clone, Deserialize)]
struct Phase {
    op: String,
    ok: usize,
    failed: usize,
    wall_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    #[serde(default)]
    first_error: String,
}

/// ADD and DEL summaries of one scenario for one candidate.
#[derive(Debug, Clone)]
struct Run {
    add: Phase,
    del: Phase,
}

/// A CNI configuration under test, with its own host namespace.
struct Candidate {
    label: &'static str,
    host: Netns,
    driver: Driver,
    _dir: tempfile::TempDir,
}

fn main() -> Result<()> {
    let opts = Opts::parse()?;
    if !tabby_testkit::is_root() {
        bail!("cni-latency needs root (it creates network namespaces)");
    }
    progress("building/locating the libcni driver and the release binaries");
    cnidriver();
    for p in &UPSTREAM_PLUGINS[..2] {
        let path = plugins_dir().join(p);
        if !path.exists() {
            bail!(
                "{} is missing: run `bash scripts/upstream.sh plugins`",
                path.display()
            );
        }
    }
    let release = release_dir();

    let pid = std::process::id();
    let pod_count = opts.pods.max(opts.burst);
    progress(&format!("creating {pod_count} pod namespaces"));
    let pods = NetnsSet::new(format!("tbench{pid}-pod"), pod_count);

    progress(&format!(
        "kernel floor: bare veth pair into a fresh netns, {} pods",
        opts.pods
    ));
    let floor = floor::measure(&format!("tbench{pid}-host-c"), &pods, opts.pods)?;
    println!(
        "    create p50 {:.2} ms p99 {:.2} ms | delete p50 {:.2} ms p99 {:.2} ms",
        floor.create_p50_ms, floor.create_p99_ms, floor.delete_p50_ms, floor.delete_p99_ms
    );
    let candidates = [tabby_candidate(&release, pid)?, baseline_candidate(pid)?];
    for c in &candidates {
        progress(&format!("warm-up: {} (5 pods)", c.label));
        measure(c, &pods, 5, 1, "warm")?;
    }

    let scenarios = [
        (
            format!("{} pods one after another", opts.pods),
            opts.pods,
            1,
        ),
        (
            format!("{} pods, {} at a time", opts.pods, opts.concurrency),
            opts.pods,
            opts.concurrency,
        ),
        (
            format!("{} pods at once", opts.burst),
            opts.burst,
            opts.burst,
        ),
    ];
    let mut table = Vec::new();
    let mut failed = false;
    for (i, (name, count, conc)) in scenarios.iter().enumerate() {
        let mut runs = Vec::new();
        for c in &candidates {
            progress(&format!("{name}: {}", c.label));
            match measure(c, &pods, *count, *conc, &format!("s{i}")) {
                Ok(run) => {
                    println!(
                        "    ADD p50 {:.1} ms p99 {:.1} ms wall {:.0} ms | DEL p50 {:.1} ms p99 {:.1} ms wall {:.0} ms",
                        run.add.p50_ms, run.add.p99_ms, run.add.wall_ms, run.del.p50_ms, run.del.p99_ms, run.del.wall_ms
                    );
                    runs.push(Some(run));
                }
                Err(e) => {
                    println!("    FAILED: {e:#}");
                    failed = true;
                    runs.push(None);
                }
            }
        }
        table.push((name.clone(), runs));
    }
    report(&candidates, &table);
    report_floor(&floor, &table);
    drop(candidates);
    drop(pods);
    if failed {
        bail!("some benchmark runs failed (see above)");
    }
    Ok(())
}

/// Command-line options.
struct Opts {
    pods: usize,
    concurrency: usize,
    burst: usize,
}

impl Opts {
    fn parse() -> Result<Opts> {
        let mut o = Opts {
            pods: 200,
            concurrency: 32,
            burst: 100,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value: usize = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()?;
            match flag.as_str() {
                "--pods" => o.pods = value,
                "--concurrency" => o.concurrency = value,
                "--burst" => o.burst = value,
                _ => bail!("unknown option {flag} (--pods N, --concurrency K, --burst M)"),
            }
        }
        Ok(o)
    }
}

fn progress(msg: &str) {
    println!("==> {msg}");
}

/// (a) tabby + tabby-ipam on a fresh file datastore.
fn tabby_candidate(release: &Path, pid: u32) -> Result<Candidate> {
    let dir = tempfile::tempdir()?;
    let host = Netns::named(format!("tbench{pid}-host-a"));
    let list = conflist("1.1.0", vec![tabby_plugin(dir.path(), "10.240.0.0/16")]);
    let driver = Driver::new(&host, dir.path(), &list, &[release]);
    Ok(Candidate {
        label: "tabby + tabby-ipam",
        host,
        driver,
        _dir: dir,
    })
}

/// (b) upstream ptp + host-local v1.10.
fn baseline_candidate(pid: u32) -> Result<Candidate> {
    let dir = tempfile::tempdir()?;
    let host = Netns::named(format!("tbench{pid}-host-b"));
    let plugin = json!({
        "type": "ptp", "mtu": 1450, "ipMasq": false,
        "ipam": {"type": "host-local", "dataDir": dir.path().join("host-local"),
                 "ranges": [[{"subnet": "10.241.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]},
    });
    let driver = Driver::new(
        &host,
        dir.path(),
        &conflist("1.1.0", vec![plugin]),
        &[&plugins_dir()],
    );
    Ok(Candidate {
        label: "ptp + host-local",
        host,
        driver,
        _dir: dir,
    })
}

/// Runs `cnidriver bench` for one scenario and parses its two summary lines.
fn measure(
    c: &Candidate,
    pods: &NetnsSet,
    count: usize,
    concurrency: usize,
    tag: &str,
) -> Result<Run> {
    let out = c
        .driver
        .bench_command(
            &pods.pattern(),
            count,
            concurrency,
            &format!("{tag}-{}", c.host.name()),
        )
        .output()
        .context("run cnidriver bench")?;
    let phases: Vec<Phase> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let find = |op: &str| phases.iter().find(|p| p.op == op).cloned();
    let (Some(add), Some(del)) = (find("ADD"), find("DEL")) else {
        bail!(
            "cnidriver bench printed no summary: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    if add.failed + del.failed > 0 {
        bail!(
            "{} ADD and {} DEL failed (ok {}/{}); first: {}",
            add.failed,
            del.failed,
            add.ok,
            del.ok,
            if add.first_error.is_empty() {
                &del.first_error
            } else {
                &add.first_error
            }
        );
    }
    Ok(Run { add, del })
}

/// Prints the comparison table and the targets.
fn report(candidates: &[Candidate; 2], table: &[(String, Vec<Option<Run>>)]) {
    let (a, b) = (candidates[0].label, candidates[1].label);
    println!();
    println!("CNI latency through libcni (ms; a = {a}, b = {b})");
    println!(
        "{:<30} {:<4} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "scenario", "op", "a p50", "a p99", "b p50", "b p99", "p50 a/b"
    );
    for (name, runs) in table {
        let (Some(Some(ra)), Some(Some(rb))) = (runs.first(), runs.get(1)) else {
            println!("{name:<30} (failed)");
            continue;
        };
        for (op, pa, pb) in [("ADD", &ra.add, &rb.add), ("DEL", &ra.del, &rb.del)] {
            println!(
                "{:<30} {:<4} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2}",
                name,
                op,
                pa.p50_ms,
                pa.p99_ms,
                pb.p50_ms,
                pb.p99_ms,
                pa.p50_ms / pb.p50_ms
            );
        }
        let sum_a = ra.add.p50_ms + ra.del.p50_ms;
        let sum_b = rb.add.p50_ms + rb.del.p50_ms;
        println!(
            "{:<30} {:<4} {:>9.1} {:>9} {:>9.1} {:>9} {:>10.2}   (target <= 0.6)",
            name,
            "A+D",
            sum_a,
            "",
            sum_b,
            "",
            sum_a / sum_b
        );
    }
    if let Some((name, runs)) = table.last() {
        for (c, run) in candidates.iter().zip(runs) {
            if let Some(run) = run {
                println!(
                    "{name}: {} all ready after {:.2} s (target < 2 s), all deleted after {:.2} s",
                    c.label,
                    run.add.wall_ms / 1000.0,
                    run.del.wall_ms / 1000.0
                );
            }
        }
    }
}

/// Tabby's DEL against the kernel floor (the first scenario: one after
/// another, like the floor).
fn report_floor(floor: &floor::Floor, table: &[(String, Vec<Option<Run>>)]) {
    println!(
        "kernel floor (bare veth pair into a fresh netns, one netlink request each): \
         create p50 {:.2} ms p99 {:.2} ms, delete p50 {:.2} ms p99 {:.2} ms",
        floor.create_p50_ms, floor.create_p99_ms, floor.delete_p50_ms, floor.delete_p99_ms
    );
    let Some((name, runs)) = table.first() else {
        return;
    };
    for (label, run) in ["tabby", "ptp + host-local"].iter().zip(runs) {
        if let Some(run) = run {
            println!(
                "{name}: {label} DEL p50 {:.1} ms = {:.1}x the floor's delete \
                 (p99 {:.1}x){}",
                run.del.p50_ms,
                run.del.p50_ms / floor.delete_p50_ms,
                run.del.p99_ms / floor.delete_p99_ms,
                if *label == "tabby" {
                    " (target <= 1.5x)"
                } else {
                    ""
                }
            );
        }
    }
}
