//! The nodes' cgroups on a cgroup v1 host: one directory per node (the
//! kubelet's `cgroupRoot`) at the root of every hierarchy, made before the
//! kubelet starts, and emptied (SIGKILL to every process in it, containers
//! included: they outlive containerd) and removed by `down`.
//!
//! Each node's containerd, kubelet and kube-proxy run in `<root>/runtime`,
//! so that `down` finds them, their shims and the containers in one tree.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The sub-cgroup of a node's (or the control plane's) own processes.
pub const RUNTIME: &str = "runtime";

/// The mount points of the cgroup v1 hierarchies (`cpu`, `memory`,
/// `name=systemd`...), from /proc/self/mountinfo.
pub fn hierarchies() -> Vec<PathBuf> {
    mounted(&["cgroup"])
}

/// The v1 hierarchies and, on a hybrid host, the cgroup2 one (runc makes
/// every container's cgroup there too): where `down` looks.
pub fn all_hierarchies() -> Vec<PathBuf> {
    mounted(&["cgroup", "cgroup2"])
}

fn mounted(types: &[&str]) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            types.contains(&fstype).then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Fails unless the host has cgroup v1 hierarchies (what the kubelet's
/// cgroupfs driver uses here; cgroup v2 support is not written yet).
pub fn require_v1() -> anyhow::Result<Vec<PathBuf>> {
    let found = hierarchies();
    anyhow::ensure!(
        !found.is_empty(),
        "no cgroup v1 hierarchy is mounted: the Kubernetes lab needs cgroup v1 for now"
    );
    Ok(found)
}

/// Creates `rel` (e.g. `tabby-node-1/runtime`) in every hierarchy; in
/// `cpuset` each new level gets its parent's CPUs and memory nodes (an
/// empty cpuset takes no process).
pub fn create(rel: &str) -> anyhow::Result<()> {
    for hierarchy in require_v1()? {
        let mut dir = hierarchy.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            let parent = dir.clone();
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = fs::read_to_string(parent.join(file)) {
                    fs::write(dir.join(file), value.trim())
                        .with_context(|| format!("writing {}/{file}", dir.display()))?;
                }
            }
        }
    }
    Ok(())
}

/// The `cgroup.procs` files of `rel` in every hierarchy (what a process
/// writes its pid into to join it).
pub fn procs_files(rel: &str) -> Vec<PathBuf> {
    hierarchies()
        .into_iter()
        .map(|h| h.join(rel).join("cgroup.procs"))
        .collect()
}

/// Every pid in `rel` or below, in any hierarchy.
pub fn pids_under(rel: &str) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for hierarchy in all_hierarchies() {
        collect_pids(&hierarchy.join(rel), &mut pids);
    }
    pids
}

fn collect_pids(dir: &Path, pids: &mut BTreeSet<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), pids);
        }
    }
}

/// SIGKILLs every process in `rel` and below until none is left (a dying
/// shim's children land in the same tree) or `timeout` passes. Returns how
/// many processes were killed; fails if some survived.
pub fn kill_all(rel: &str, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    let me = std::process::id() as i32;
    let mut killed = BTreeSet::new();
    loop {
        let pids: Vec<i32> = pids_under(rel).into_iter().filter(|p| *p != me).collect();
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("processes {pids:?} in cgroup {rel} survived SIGKILL");
        }
        for pid in pids {
            // ESRCH: gone already.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes `rel` and every cgroup below it, deepest first, in every
/// hierarchy; a missing one is already removed. Call after [`kill_all`].
pub fn remove(rel: &str) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for hierarchy in all_hierarchies() {
        let top = hierarchy.join(rel);
        if top.is_dir() {
            remove_tree(&top, &mut errors);
        }
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(anyhow::anyhow!(errors.join("; "))),
    }
}

fn remove_tree(dir: &Path, errors: &mut Vec<String>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), errors);
            }
        }
    }
    // A cgroup that just lost its last task can be busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                errors.push(format!("removing cgroup {}: {e}", dir.display()));
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The cgroups at the hierarchies' roots whose names `owns` accepts (a
/// lab's nodes and control plane, found again without a state file).
pub fn find_roots(owns: impl Fn(&str) -> bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for hierarchy in all_hierarchies() {
        let Ok(entries) = fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().is_ok_and(|t| t.is_dir()) && owns(&name) {
                found.insert(name);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_is_made_in_every_hierarchy_emptied_and_removed() {
        if !tabby_testkit::require_root("cgroup") {
            return;
        }
        if hierarchies().is_empty() {
            tabby_testkit::skip_or_fail("cgroup", "no cgroup v1 hierarchy");
            return;
        }
        let rel = format!("{}/{RUNTIME}", tabby_testkit::unique("tlcg"));
        create(&rel).unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("for f in $CGROUP_PROCS; do echo $$ > $f; done; sleep 30 & wait")
            .env(
                "CGROUP_PROCS",
                procs_files(&rel)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .spawn()
            .unwrap();
        let top = rel.split('/').next().unwrap().to_string();
        tabby_testkit::wait_until("sh and sleep in the cgroup", Duration::from_secs(5), || {
            pids_under(&top).len() == 2
        });
        assert_eq!(kill_all(&top, Duration::from_secs(5)).unwrap(), 2);
        let _ = child.wait();
        remove(&top).unwrap();
        assert!(hierarchies().iter().all(|h| !h.join(&top).exists()));
        assert!(find_roots(|n| n == top).is_empty());
    }
}
