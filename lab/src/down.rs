//! `tabby-lab down`: removes everything a lab made, from its state file
//! and, for what the state file misses (a crash half-way, a lost file),
//! from the names the lab's prefix gives its namespaces. Idempotent.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use anyhow::Context;

use crate::pods::cni_del;
use crate::process::{netns_pids, proc_ref, stop_all, ProcRef, TERM_GRACE};
use crate::sh::{del_netns, list_netns};
use crate::state::LabState;
use crate::Lab;

/// Tears the lab down; reports what it did and fails only if something
/// it found could not be removed.
pub fn down(lab: &Lab) -> anyhow::Result<()> {
    let state_dir_exists = lab.dir.root().is_dir();
    let _lock = if state_dir_exists {
        Some(lab.dir.lock()?)
    } else {
        None
    };
    let state = match LabState::load(&lab.dir) {
        Ok(state) => state,
        Err(e) => {
            eprintln!("warning: {e:#}; cleaning up by namespace names instead");
            None
        }
    };
    let mut errors = Vec::new();

    // 1. CNI DEL every pod, while its node is still there.
    if let Some(state) = &state {
        for pod in &state.pods {
            if let Err(e) = cni_del(lab, state, pod) {
                errors.push(format!("{e:#}"));
            }
        }
    }

    // 1b. A Kubernetes lab: its processes, cgroups (containers) and mounts.
    let kube = crate::kube::down::teardown(lab, state.as_ref(), &mut errors);

    // 2. Every namespace: the recorded ones and any the prefix names.
    let namespaces = namespaces(lab, state.as_ref());
    // 3. Stop the processes: recorded ones and whatever runs in those namespaces.
    let procs = processes(state.as_ref(), &namespaces);
    let killed = stop_all(&procs, TERM_GRACE);
    // 4. Delete the namespaces, the underlay last (its veths die with their peers).
    let deleted = delete_namespaces(lab, &namespaces, &mut errors);
    // 5. The files.
    let removed_dir = state_dir_exists
        && remove_files(lab.dir.root()).unwrap_or_else(|e| {
            errors.push(format!("{e:#}"));
            false
        });

    let kube_did = kube.processes + kube.killed + kube.cgroups + kube.mounts > 0;
    if procs.is_empty() && deleted == 0 && !state_dir_exists && !kube_did {
        println!(
            "tabby-lab down: nothing to clean up (prefix {:?})",
            lab.names.prefix()
        );
    } else {
        println!(
            "tabby-lab down: stopped {} processes ({killed} needed SIGKILL), deleted {deleted} namespaces, {} {}",
            procs.len(),
            if removed_dir { "removed" } else { "cleaned" },
            lab.dir.root().display()
        );
    }
    if kube_did {
        println!(
            "tabby-lab down: Kubernetes: stopped {} components, killed {} processes in the lab's cgroups, removed {} cgroups, unmounted {}",
            kube.processes, kube.killed, kube.cgroups, kube.mounts
        );
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(anyhow::anyhow!(
            "some things could not be removed:\n  {}",
            errors.join("\n  ")
        )),
    }
}

/// The lab's namespaces: those the prefix names and those the state recorded.
fn namespaces(lab: &Lab, state: Option<&LabState>) -> BTreeSet<String> {
    let mut namespaces: BTreeSet<String> = list_netns()
        .into_iter()
        .filter(|ns| lab.names.owns_ns(ns))
        .collect();
    if let Some(state) = state {
        namespaces.extend(state.namespaces.iter().cloned());
        namespaces.extend(state.pods.iter().map(|p| p.netns.clone()));
        namespaces.extend(state.nodes.iter().map(|n| n.netns.clone()));
    }
    namespaces
}

/// The live processes of the lab: recorded agents and echo servers, and
/// whatever runs in its namespaces (never this process).
fn processes(state: Option<&LabState>, namespaces: &BTreeSet<String>) -> Vec<ProcRef> {
    let mut procs: Vec<ProcRef> = Vec::new();
    if let Some(state) = state {
        procs.extend(state.nodes.iter().filter_map(|n| n.agent.clone()));
        procs.extend(state.pods.iter().filter_map(|p| p.echo.clone()));
    }
    for ns in namespaces {
        procs.extend(netns_pids(ns).into_iter().filter_map(proc_ref));
    }
    procs.retain(|p| p.alive() && p.pid != std::process::id() as i32);
    procs.sort_by_key(|p| p.pid);
    procs.dedup();
    procs
}

/// Deletes the namespaces, the underlay last; returns how many existed.
fn delete_namespaces(lab: &Lab, namespaces: &BTreeSet<String>, errors: &mut Vec<String>) -> usize {
    let underlay = lab.names.underlay_ns();
    let (last, first): (Vec<&String>, Vec<&String>) =
        namespaces.iter().partition(|ns| **ns == underlay);
    let mut deleted = 0;
    for ns in first.into_iter().chain(last) {
        let existed = crate::sh::netns_exists(ns);
        match del_netns(ns) {
            Ok(()) => deleted += usize::from(existed),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    deleted
}

/// Removes the files the lab writes in its state directory, then the
/// directory if nothing else is left in it. Returns whether it went.
fn remove_files(root: &Path) -> anyhow::Result<bool> {
    for dir in ["datastore", "resources", "control-plane", "nodes", "ns"] {
        let path = root.join(dir);
        match fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_lab_file(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(fs::remove_dir(root).is_ok())
}

/// Whether a file name is one the lab writes in its state directory.
fn is_lab_file(name: &str) -> bool {
    let node_file = name.starts_with("node-")
        && [".toml", ".log", ".sock", ".mtu"]
            .iter()
            .any(|ext| name.ends_with(ext));
    let log = (name.starts_with("cni-") || name.starts_with("echo-")) && name.ends_with(".log");
    let temp = name.starts_with('.') && name.ends_with(".tmp");
    let kube = name == "kubeconfig";
    node_file || log || temp || kube || name == "lab.json" || name == "lab.lock"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_labs_own_files_are_removed() {
        for name in [
            "lab.json",
            "lab.lock",
            "node-1.toml",
            "node-12.sock",
            "node-2.mtu",
            "cni-node-1.log",
            "echo-node-1-pod1.log",
            ".lab.json.42.tmp",
            "kubeconfig",
        ] {
            assert!(is_lab_file(name), "{name}");
        }
        for name in ["notes.txt", "node-1.yaml", "lab.json.bak"] {
            assert!(!is_lab_file(name), "{name}");
        }
    }

    #[test]
    fn the_state_dir_goes_only_when_nothing_foreign_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("lab");
        fs::create_dir_all(root.join("datastore/blocks")).unwrap();
        fs::write(root.join("lab.json"), "{}").unwrap();
        fs::write(root.join("mine.txt"), "keep").unwrap();
        assert!(!remove_files(&root).unwrap());
        assert!(root.join("mine.txt").exists() && !root.join("lab.json").exists());
        fs::remove_file(root.join("mine.txt")).unwrap();
        assert!(remove_files(&root).unwrap());
        assert!(!root.exists());
    }
}
