//! `ipam-backends`: IPAM ADD+DEL through the allocator on the Kubernetes
//! datastore against the file datastore, in the same run.
//!
//! Scenarios (every pod ADDs at once, then every pod DELs at once):
//! - 100 pods on one node;
//! - 4 nodes x 25 pods.
//!
//! Each pod is a thread with a datastore handle of its own (as each CNI
//! plugin process has), and pods of one node take turns through a node
//! lock, as the plugin's node-wide IPAM lock makes them. The Kubernetes
//! backend talks to a real etcd + kube-apiserver started for the run
//! (`tabby_testkit::kube`); its requests are counted by the client.
//!
//! Run: `cargo run --release -p tabby-bench --bin ipam-backends`
//! (needs the upstream binaries of `scripts/upstream.sh`). `--pods N`
//! changes the pod count of both scenarios (default 100).

use std::collections::HashSet;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tabby_ipam::{
    AssignArgs, Datastore, DatastoreConfig, FileDatastore, IpPool, Ipam, KubeDatastore, KubeOptions,
};

/// A datastore handle and how to read its request count.
struct Handle {
    ds: Arc<dyn Datastore>,
    kube: Option<Arc<KubeDatastore>>,
}

impl Handle {
    fn requests(&self) -> u64 {
        self.kube.as_ref().map_or(0, |k| k.requests())
    }
}

/// Where a candidate's documents live.
enum Backend {
    File(tempfile::TempDir),
    Kube {
        kubeconfig: std::path::PathBuf,
        scope: String,
    },
}

impl Backend {
    fn label(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Kube { .. } => "kubernetes",
        }
    }

    fn open(&self) -> Result<Handle> {
        Ok(match self {
            Self::File(dir) => Handle {
                ds: Arc::new(FileDatastore::open(dir.path())?),
                kube: None,
            },
            Self::Kube { kubeconfig, scope } => {
                let kube = Arc::new(KubeDatastore::open(&KubeOptions {
                    kubeconfig: Some(kubeconfig.clone()),
                    scope: Some(scope.clone()),
                })?);
                Handle {
                    ds: kube.clone(),
                    kube: Some(kube),
                }
            }
        })
    }
}

/// One phase (ADD or DEL) of one scenario.
#[derive(Debug, Default)]
struct Phase {
    wall: Duration,
    latencies: Vec<Duration>,
    requests: u64,
}

impl Phase {
    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }

    fn line(&self, label: &str, op: &str) -> String {
        let n = self.latencies.len().max(1) as f64;
        format!(
            "  {label:<11} {op}  {:>8.1} ops/s  wall {:>7.1} ms  p50 {:>6.1} ms  p99 {:>6.1} ms  {:>5.1} requests/op",
            n / self.wall.as_secs_f64(),
            ms(self.wall),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            self.requests as f64 / n
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pool() -> IpPool {
    IpPool::new("bench", "10.200.0.0/16".parse().expect("cidr"))
}

fn args(pod: usize, node: &str) -> AssignArgs {
    AssignArgs {
        handle: format!("k8s-pod-network.{pod:064x}"),
        node: node.to_string(),
        attrs: [("pod".to_string(), format!("pod-{pod}"))].into(),
        num_v4: 1,
        num_v6: 0,
        pools: Vec::new(),
    }
}

/// Runs `op` for every pod at once (one thread each, node locks), timing each.
fn phase(
    handles: &[Handle],
    nodes: usize,
    locks: &[Arc<Mutex<()>>],
    op: impl Fn(&Ipam<Arc<dyn Datastore>>, usize, &str) -> Result<()> + Sync,
) -> Result<Phase> {
    let before: u64 = handles.iter().map(Handle::requests).sum();
    let start = Barrier::new(handles.len() + 1);
    let mut out = Phase::default();
    let (began, results): (Instant, Vec<Result<Duration>>) = std::thread::scope(|s| {
        let threads: Vec<_> = handles
            .iter()
            .enumerate()
            .map(|(pod, handle)| {
                let (start, op, lock) = (&start, &op, &locks[pod % nodes]);
                s.spawn(move || {
                    let ipam = Ipam::new(handle.ds.clone());
                    let node = format!("node-{}", pod % nodes);
                    start.wait();
                    let t = Instant::now();
                    let _turn = lock.lock().unwrap_or_else(|e| e.into_inner());
                    op(&ipam, pod, &node)?;
                    Ok(t.elapsed())
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        let results = threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a pod thread panicked")))
            })
            .collect();
        (began, results)
    });
    out.wall = began.elapsed();
    for r in results {
        out.latencies.push(r?);
    }
    out.requests = handles.iter().map(Handle::requests).sum::<u64>() - before;
    Ok(out)
}

/// One scenario on one backend: ADD every pod, check, DEL every pod.
fn scenario(backend: &Backend, pods: usize, nodes: usize) -> Result<(Phase, Phase)> {
    let handles: Vec<Handle> = (0..pods).map(|_| backend.open()).collect::<Result<_>>()?;
    Ipam::new(handles[0].ds.clone()).create_pool(&pool())?;
    let locks: Vec<_> = (0..nodes).map(|_| Arc::new(Mutex::new(()))).collect();
    let add = phase(&handles, nodes, &locks, |ipam, pod, node| {
        ipam.assign(&args(pod, node)).map(drop).context("ADD")
    })?;
    let snap = tabby_ipam::report::Snapshot::load(&handles[0].ds)?;
    let ips: HashSet<_> = snap
        .blocks
        .iter()
        .flat_map(|b| b.allocated().map(|(ip, _)| ip))
        .collect();
    anyhow::ensure!(ips.len() == pods, "{} addresses for {pods} pods", ips.len());
    let del = phase(&handles, nodes, &locks, |ipam, pod, _| {
        ipam.release_by_handle(&args(pod, "").handle)
            .map(drop)
            .context("DEL")
    })?;
    Ok((add, del))
}

/// Requests of one ADD and one DEL on a node that already has its block.
fn steady_state_requests(backend: &Backend) -> Result<(u64, u64)> {
    let handle = backend.open()?;
    let ipam = Ipam::new(handle.ds.clone());
    ipam.create_pool(&pool())?;
    ipam.assign(&args(1_000_001, "node-s"))?;
    let before = handle.requests();
    ipam.assign(&args(1_000_002, "node-s"))?;
    let add = handle.requests() - before;
    let before = handle.requests();
    ipam.release_by_handle(&args(1_000_002, "").handle)?;
    Ok((add, handle.requests() - before))
}

fn main() -> Result<()> {
    let mut pods = 100;
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--pods" => pods = argv.next().context("--pods N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let cp = tabby_testkit::kube::ControlPlane::start().context("start the control plane")?;
    println!(
        "control plane ready in {:.2} s",
        cp.ready_in().as_secs_f64()
    );
    let admin = DatastoreConfig::kubernetes(Some(cp.kubeconfig_path().to_path_buf()));
    let DatastoreConfig::Kubernetes(options) = &admin else {
        unreachable!()
    };
    KubeDatastore::open(options)?.install_crds()?;

    let mut n = 0;
    let mut fresh = |kube: bool| -> Result<Backend> {
        n += 1;
        Ok(match kube {
            false => Backend::File(tempfile::tempdir()?),
            true => Backend::Kube {
                kubeconfig: cp.kubeconfig_path().to_path_buf(),
                scope: format!("bench{n}"),
            },
        })
    };
    for (title, nodes) in [
        (format!("{pods} pods at once on one node"), 1),
        (format!("4 nodes x {} pods", pods / 4), 4),
    ] {
        println!("{title}:");
        let mut adds = Vec::new();
        for kube in [false, true] {
            let backend = fresh(kube)?;
            let (add, del) = scenario(&backend, pods - pods % nodes, nodes)?;
            println!("{}", add.line(backend.label(), "ADD"));
            println!("{}", del.line(backend.label(), "DEL"));
            adds.push(add);
        }
        println!(
            "  kubernetes / file: ADD wall x{:.1}, p50 x{:.1}",
            adds[1].wall.as_secs_f64() / adds[0].wall.as_secs_f64(),
            adds[1].quantile(0.5).as_secs_f64() / adds[0].quantile(0.5).as_secs_f64().max(1e-9)
        );
    }
    let (add, del) = steady_state_requests(&fresh(true)?)?;
    println!("API requests on a node that has its block: {add} per ADD, {del} per DEL");
    Ok(())
}
