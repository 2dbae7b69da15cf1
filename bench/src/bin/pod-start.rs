//! `pod-start`: pod start latency through the real kubelet and containerd
//! (issue 13). For each CNI of the Kubernetes lab, in the same run, a
//! cluster of its own (`tabby-lab up --kubernetes --nodes 2 --cni C`), then:
//!
//! - **start**: from `kubectl create` of a Deployment of `--replicas` echo
//!   pods spread evenly over the nodes to every pod Ready;
//! - **release**: from `kubectl delete` of it to every address released:
//!   Tabby's IPS IN USE back to 0 (`tabbyctl ipam show` on the Kubernetes
//!   datastore), host-local's reservation files gone from each node's
//!   `/var/lib/cni/networks`.
//!
//! The baseline is `--cni reference` (upstream ptp + host-local, with
//! kube-proxy); the ratio is Tabby's time over the baseline's (goal ≤ 0.8).
//! Every lab is removed by `tabby-lab down` from a drop guard, also on
//! error or panic.
//!
//! Run (root): `cargo build --release -p tabby-bench -p tabby-node -p
//! tabby-lab -p tabby-cni -p tabby-ctl`, then `target/release/pod-start
//! [--replicas 50] [--runs 1]`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tabby_bench::lab::Lab;
use tabby_bench::{flag, LAB_BINS, LAB_BUILD};

/// How long one phase may take before the run fails.
const DEADLINE: Duration = Duration::from_secs(600);
/// Time between two looks at the cluster.
const POLL: Duration = Duration::from_millis(200);

fn main() -> std::process::ExitCode {
    tabby_bench::exit_code("pod-start", real_main())
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let replicas = flag(&args, "--replicas", 50usize)?;
    let runs = flag(&args, "--runs", 1usize)?.max(1);
    let lab_bin = tabby_bench::release_dir(&LAB_BINS, LAB_BUILD)?.join("tabby-lab");
    println!(
        "pod-start: {replicas} echo pods over 2 nodes, {runs} run(s) per CNI, each CNI on a cluster of its own"
    );
    let mut rows = Vec::new();
    for cni in ["reference", "tabby"] {
        for run in 1..=runs {
            let (start, release) = measure(&lab_bin, cni, run, replicas)?;
            println!(
                "{cni:<9} run {run}: all {replicas} Ready after {:.1} s, all addresses released {:.1} s after the delete",
                start.as_secs_f64(),
                release.as_secs_f64()
            );
            rows.push((cni, start, release));
        }
    }
    let median = |cni: &str, release: bool| {
        let mut v: Vec<f64> = rows
            .iter()
            .filter(|r| r.0 == cni)
            .map(|r| if release { r.2 } else { r.1 }.as_secs_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n== pod-start, {replicas} pods, 2 nodes (median of {runs}) ==");
    println!(
        "{:<28} {:>10} {:>10} {:>7}",
        "", "reference", "tabby", "ratio"
    );
    for (what, release) in [
        ("create -> all Ready (s)", false),
        ("delete -> addresses free (s)", true),
    ] {
        let (base, ours) = (median("reference", release), median("tabby", release));
        println!("{what:<28} {base:>10.1} {ours:>10.1} {:>7.2}", ours / base);
    }
    println!("goal: ratio <= 0.8");
    Ok(())
}

/// One cluster with `cni`: the start and release times of `replicas` pods.
fn measure(lab_bin: &Path, cni: &str, run: usize, replicas: usize) -> Result<(Duration, Duration)> {
    let lab = Lab::new(lab_bin, format!("ps{}{run}", &cni[..1]))?;
    let up = Instant::now();
    lab.run(&["up", "--kubernetes", "--nodes", "2", "--cni", cni])
        .with_context(|| format!("up --kubernetes --cni {cni}"))?;
    eprintln!("pod-start: {cni} cluster up in {:.0?}", up.elapsed());
    let file = lab.state.path().join("pod-start.yaml");
    std::fs::write(&file, deployment(replicas))
        .with_context(|| format!("writing {}", file.display()))?;
    let file = file.display().to_string();

    let created = Instant::now();
    lab.run(&["kubectl", "create", "-f", &file])?;
    let mut ready = 0;
    wait(&format!("{replicas} pods Ready ({cni})"), || {
        ready = ready_pods(&lab)?;
        Ok(ready == replicas)
    })?;
    let start = created.elapsed();

    let deleted = Instant::now();
    lab.run(&["kubectl", "delete", "-f", &file, "--wait=false"])?;
    wait(&format!("every address released ({cni})"), || {
        Ok(addresses_in_use(&lab, cni)? == 0)
    })?;
    Ok((start, deleted.elapsed()))
}

/// Polls `done` until it holds, failing after [`DEADLINE`].
fn wait(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The bench's Deployment: echo pods, evenly spread, Ready on a TCP probe.
fn deployment(replicas: usize) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: pod-start
  namespace: default
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: pod-start}}
  template:
    metadata:
      labels: {{app: pod-start}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {{app: pod-start}}
      containers:
      - name: echo
        image: lab.tabby.dev/echo:dev
        imagePullPolicy: Never
        readinessProbe:
          tcpSocket: {{port: 8080}}
          periodSeconds: 1
"
    )
}

/// The bench's pods that are Ready.
fn ready_pods(lab: &Lab) -> Result<usize> {
    let out = lab.run(&[
        "kubectl",
        "get",
        "pods",
        "-l",
        "app=pod-start",
        "-o",
        "json",
    ])?;
    let list: Value = serde_json::from_str(&out).context("kubectl's JSON")?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    Ok(items
        .iter()
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .count())
}

/// Addresses the CNI's IPAM still holds for pods.
fn addresses_in_use(lab: &Lab, cni: &str) -> Result<usize> {
    if cni == "tabby" {
        let out = lab.run(&["tabbyctl", "ipam", "show"])?;
        let n = tabby_testkit::ipam::pool_in_use(&out)
            .with_context(|| format!("no IPS IN USE in {out}"))?;
        return Ok(n as usize);
    }
    // host-local: one file per address, named by it, per network dir.
    let mut n = 0;
    for node in ["node-1", "node-2"] {
        let dir = lab
            .state
            .path()
            .join(format!("nodes/{node}/var-lib-cni/networks"));
        let Ok(networks) = std::fs::read_dir(&dir) else {
            continue;
        };
        for network in networks.flatten() {
            let files = std::fs::read_dir(network.path()).into_iter().flatten();
            n += files
                .flatten()
                .filter(|f| {
                    f.file_name()
                        .to_string_lossy()
                        .parse::<std::net::IpAddr>()
                        .is_ok()
                })
                .count();
        }
    }
    Ok(n)
}
