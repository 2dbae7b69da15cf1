//! The kill storm: four workers ADD and DEL pods on one node, about one
//! operation in ten is SIGKILLed at a random point, and a sampler reads the
//! addresses every pod namespace holds all along. Then the runtime cleans
//! up, by retrying DEL for everything it knows, or by one GC with an empty
//! valid list. At no moment may two namespaces hold one address, and at the
//! end nothing may be left: no allocation, handle, veth or route, and
//! `tabbyctl ipam check` finds nothing.
//!
//! `TABBY_STORM_OPS` changes the number of operations (default 2,000 per
//! storm), `TABBY_STORM_SEED` replays a run.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{kill, Ending, Invocation, Rng};
use tabby_dataplane::Netlink;
use tabby_tests::{all_json, Call, Netns, Node};

const WORKERS: usize = 4;
const PODS_PER_WORKER: usize = 4;
const KILL_PERCENT: u64 = 10;

/// How the runtime cleans up after the storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finale {
    /// DEL every attachment it started, until each succeeds.
    RetriedDels,
    /// Forget everything and call GC with `cni.dev/valid-attachments: []`.
    Gc,
}

/// A pod sandbox: its namespace and container ID.
struct Sandbox {
    ns: Netns,
    id: String,
}

/// The namespaces the sampler reads, by name.
#[derive(Default)]
struct Registry {
    namespaces: Mutex<BTreeMap<String, PathBuf>>,
    stop: AtomicBool,
}

impl Registry {
    fn add(&self, ns: &Netns) {
        let mut map = self.namespaces.lock().unwrap();
        map.insert(ns.name().to_string(), ns.path());
    }

    fn remove(&self, ns: &Netns) {
        self.namespaces.lock().unwrap().remove(ns.name());
    }
}

/// What the sampler saw.
#[derive(Debug, Default)]
struct Sampled {
    sweeps: usize,
    most_namespaces: usize,
    duplicates: Vec<String>,
}

/// Reads every registered namespace's addresses until stopped; an address
/// seen in two namespaces is read again in both at once (A, B, A within a
/// few milliseconds, far less than an ADD takes) to tell a real duplicate
/// from a DEL and an ADD that happened between two reads of one sweep.
fn sample(registry: &Registry) -> Sampled {
    let mut seen = Sampled::default();
    // One socket per namespace, kept while it is registered.
    let mut sockets: HashMap<String, Netlink> = HashMap::new();
    while !registry.stop.load(Ordering::Relaxed) {
        let namespaces = registry.namespaces.lock().unwrap().clone();
        seen.most_namespaces = seen.most_namespaces.max(namespaces.len());
        sockets.retain(|name, _| namespaces.contains_key(name));
        let mut holders: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for (name, path) in &namespaces {
            if !sockets.contains_key(name) {
                let Some(nl) = support::netlink(path) else {
                    continue;
                };
                sockets.insert(name.clone(), nl);
            }
            for ip in support::addresses(&sockets[name]) {
                holders.entry(ip).or_default().push(name.clone());
            }
        }
        for (ip, names) in holders.iter().filter(|(_, n)| n.len() > 1) {
            let (a, b) = (&sockets[&names[0]], &sockets[&names[1]]);
            let start = Instant::now();
            let held = support::addresses(a).contains(ip)
                && support::addresses(b).contains(ip)
                && support::addresses(a).contains(ip);
            if held && start.elapsed() < Duration::from_millis(3) {
                seen.duplicates
                    .push(format!("{ip} in {} and {}", names[0], names[1]));
            }
        }
        seen.sweeps += 1;
        // Leave the workers the CPU between sweeps.
        std::thread::sleep(Duration::from_millis(2));
    }
    seen
}

/// Counts of what the workers did.
#[derive(Default)]
struct Tally {
    ops: AtomicUsize,
    kills: AtomicUsize,
    killed_adds: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

/// One worker's share of the storm; returns the sandboxes the runtime still
/// has to clean up (all of them abandoned in the GC finale).
struct Worker {
    node: Arc<Node>,
    conf: Arc<Vec<u8>>,
    registry: Arc<Registry>,
    tally: Arc<Tally>,
    finale: Finale,
    kill_window_us: u64,
}

impl Worker {
    fn run(&self, ops: usize, mut rng: Rng) -> Vec<Sandbox> {
        let mut live: Vec<Sandbox> = Vec::new();
        let mut abandoned = Vec::new();
        for _ in 0..ops {
            let add = live.len() < PODS_PER_WORKER && (live.is_empty() || rng.chance(50));
            let index = if add {
                let ns = Netns::new("tbs");
                self.registry.add(&ns);
                live.push(Sandbox {
                    id: ns.name().to_string(),
                    ns,
                });
                live.len() - 1
            } else {
                rng.below(live.len() as u64) as usize
            };
            let sandbox = &live[index];
            let command = if add { "ADD" } else { "DEL" };
            let ending = self.op(command, sandbox, &mut rng);
            self.tally.ops.fetch_add(1, Ordering::Relaxed);
            match ending {
                Ending::Killed => {
                    self.tally.kills.fetch_add(1, Ordering::Relaxed);
                    if add {
                        self.tally.killed_adds.fetch_add(1, Ordering::Relaxed);
                    }
                    // The GC runtime loses track of it; the other one retries DEL later.
                    if self.finale == Finale::Gc {
                        abandoned.push(live.swap_remove(index));
                    }
                }
                Ending::Exited(true) if !add => {
                    let done = live.swap_remove(index);
                    self.registry.remove(&done.ns);
                }
                Ending::Exited(true) => {}
                Ending::Exited(false) => self
                    .tally
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("{command} {} failed", sandbox.id)),
            }
        }
        abandoned.extend(live);
        abandoned
    }

    /// Runs one operation, SIGKILLed at a random point one time in ten.
    fn op(&self, command: &str, sandbox: &Sandbox, rng: &mut Rng) -> Ending {
        let netns = sandbox.ns.path().display().to_string();
        let inv = Invocation::new(command, &sandbox.id, &netns);
        let doomed = rng.chance(KILL_PERCENT);
        let delay = Duration::from_micros(rng.below(self.kill_window_us));
        let child = inv.spawn(&self.node.ns, &self.conf);
        if doomed {
            // A random point of the operation: not a wait for anything.
            std::thread::sleep(delay);
            kill(child)
        } else {
            Ending::Exited(support::finish(child).0)
        }
    }
}

/// How long one ADD + DEL takes here, to spread the kills over whole operations.
fn kill_window(node: &Node, conf: &[u8]) -> u64 {
    let mut took = Vec::new();
    for _ in 0..3 {
        let ns = Netns::new("tbs");
        let netns = ns.path().display().to_string();
        for command in ["ADD", "DEL"] {
            let start = Instant::now();
            let (ok, out) =
                support::finish(Invocation::new(command, ns.name(), &netns).spawn(&node.ns, conf));
            assert!(ok, "{command} failed: {out}");
            took.push(start.elapsed().as_micros() as u64);
        }
    }
    took.sort_unstable();
    took[took.len() / 2]
}

fn storm(finale: Finale) {
    let started = Instant::now();
    let ops: usize = std::env::var("TABBY_STORM_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let node = Arc::new(Node::new());
    let conf = node.conf("1.1.0", "10.240.0.0/22", 26);
    let bytes = Arc::new(conf.to_string().into_bytes());
    let window = kill_window(&node, &bytes);
    let registry = Arc::new(Registry::default());
    let tally = Arc::new(Tally::default());
    let sampler = {
        let registry = Arc::clone(&registry);
        std::thread::spawn(move || sample(&registry))
    };
    let mut seeds = Rng::from_env(&format!("kill storm ({finale:?})"));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let worker = Worker {
                node: Arc::clone(&node),
                conf: Arc::clone(&bytes),
                registry: Arc::clone(&registry),
                tally: Arc::clone(&tally),
                finale,
                kill_window_us: window,
            };
            let rng = Rng::new(seeds.next());
            std::thread::spawn(move || worker.run(ops / WORKERS, rng))
        })
        .collect();
    let left: Vec<Sandbox> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker panicked"))
        .collect();

    match finale {
        Finale::RetriedDels => {
            for sandbox in &left {
                let netns = sandbox.ns.path().display().to_string();
                let del = Call::tabby("DEL", &sandbox.id, &netns).run(&node.ns, &bytes);
                assert!(
                    del.ok,
                    "retried DEL of {} failed: {}",
                    sandbox.id, del.stdout
                );
            }
        }
        Finale::Gc => {
            let mut gc = conf.clone();
            gc["cni.dev/valid-attachments"] = serde_json::json!([]);
            let run = Call::tabby("GC", "", "").run(&node.ns, gc.to_string().as_bytes());
            assert!(run.ok, "GC failed: {}", run.stdout);
        }
    }
    registry.stop.store(true, Ordering::Relaxed);
    let seen = sampler.join().expect("sampler panicked");

    let (done, kills) = (
        tally.ops.load(Ordering::Relaxed),
        tally.kills.load(Ordering::Relaxed),
    );
    eprintln!(
        "{finale:?}: {done} operations, {kills} SIGKILLed ({} ADDs), kill window {window} us, \
         {} sandboxes left to the cleanup, {} sweeps of up to {} namespaces, {:.1} s",
        tally.killed_adds.load(Ordering::Relaxed),
        left.len(),
        seen.sweeps,
        seen.most_namespaces,
        started.elapsed().as_secs_f64()
    );
    assert!(
        seen.duplicates.is_empty(),
        "two namespaces held one address: {:?}",
        seen.duplicates
    );
    assert!(
        seen.sweeps > 10,
        "the sampler hardly ran: {} sweeps",
        seen.sweeps
    );
    let failures = tally.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "operations that were not killed failed: {failures:?}"
    );
    assert!(
        kills * 100 >= done * 5,
        "only {kills} of {done} operations were killed"
    );
    assert_clean(&node, &left);
}

/// Nothing of any pod is left, on the node, in the pods or in the datastore.
fn assert_clean(node: &Node, left: &[Sandbox]) {
    let allocations = node.allocations();
    assert!(allocations.is_empty(), "allocations left: {allocations:?}");
    let handles = support::handles(&node.datastore());
    assert!(handles.is_empty(), "handles left: {handles:?}");
    node.assert_no_leftovers();
    for sandbox in left {
        assert_eq!(
            sandbox.ns.links(),
            vec!["lo".to_string()],
            "an interface was left in {}",
            sandbox.id
        );
    }
    let (problems, report) = support::ipam_check(node);
    assert_eq!(problems, 0, "{report}");
    all_json(&node.datastore()).expect("every datastore document is valid JSON");
}

#[test]
fn a_kill_storm_then_the_runtimes_retried_dels_leave_no_duplicate_and_nothing_behind() {
    storm(Finale::RetriedDels);
}

#[test]
fn a_kill_storm_then_one_gc_leaves_no_duplicate_and_nothing_behind() {
    storm(Finale::Gc);
}
