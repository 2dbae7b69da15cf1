//! The Kubernetes half of `tabby-lab down`, before the namespaces go:
//! stop the recorded processes, empty and remove the lab's cgroups (every
//! container process with them: they outlive containerd), and unmount
//! whatever is mounted under the state dir (the nodes' namespace files).
//! What a crash left unrecorded is found by the prefix's cgroup names and
//! by the mount table.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{cgroup, mounts};
use crate::process::{stop_all, TERM_GRACE};
use crate::state::LabState;
use crate::Lab;

/// What the Kubernetes teardown removed.
#[derive(Debug, Default)]
pub struct Removed {
    /// Recorded processes stopped.
    pub processes: usize,
    /// Processes killed in the cgroups (containers, shims, strays).
    pub killed: usize,
    /// Cgroups removed (per name, in every hierarchy).
    pub cgroups: usize,
    /// Mount points unmounted.
    pub mounts: usize,
}

/// Tears down the Kubernetes parts; errors go to `errors`, the rest goes on.
pub fn teardown(lab: &Lab, state: Option<&LabState>, errors: &mut Vec<String>) -> Removed {
    let mut removed = Removed::default();
    let kube = state.and_then(|s| s.kubernetes.as_ref());
    if let Some(kube) = kube {
        let procs: Vec<_> = kube.processes().into_iter().filter(|p| p.alive()).collect();
        removed.processes = procs.len();
        stop_all(&procs, TERM_GRACE);
    }

    let mut groups: BTreeSet<String> = cgroup::find_roots(|n| lab.names.owns_cgroup(n));
    if let Some(kube) = kube {
        groups.extend(
            kube.nodes
                .iter()
                .map(|n| n.cgroup_root.trim_start_matches('/').to_string()),
        );
    }
    for group in &groups {
        match cgroup::kill_all(group, Duration::from_secs(10)) {
            Ok(n) => removed.killed += n,
            Err(e) => errors.push(format!("{e:#}")),
        }
        match cgroup::remove(group) {
            Ok(()) => removed.cgroups += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }

    match mounts::unmount_all(lab.dir.root()) {
        Ok(n) => removed.mounts = n,
        Err(e) => errors.push(format!(
            "unmounting under {}: {e:#}",
            lab.dir.root().display()
        )),
    }
    removed
}
