//! containerd v2.3 `ctr run --cni` with `tabby` from a conflist directory
//! (the fixed `/etc/cni/net.d` and `/opt/cni/bin`, bind-mounted from the
//! test's temp dir for each `ctr` call) and Debian's runc:
//! - two containers reach each other and the host;
//! - stopping one (`ctr tasks kill`, which DELs its network first) releases
//!   its address;
//! - one killed with SIGKILL behind the runtime's back and removed by it
//!   (`ctr tasks delete`, `ctr containers delete`: no CNI call) leaks its
//!   allocation until a CNI GC through libcni, on ctr's own cache, with
//!   no valid attachment left, releases it.
//!
//! containerd runs in the test's "host" namespace with its own root, state
//! and sockets under a temp dir; containers are busybox-static rootfs dirs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use tabby_conformance::containerd::{busybox_rootfs, Containerd, CONTAINERD_PROGRAMS};
use tabby_conformance::{
    assert_containers_reach_each_other_and_the_host, assert_released, conflist, files_mentioning,
    plugins_dir, ready, release_dir, require_upstream, runtime_host, tabby_plugin, unique_octet,
    Driver,
};
use tabby_testkit::{eventually, run_ok, unique};

/// A container that exits on SIGTERM (busybox as PID 1 has no default
/// handler for it).
const IDLE: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

/// Runs container `id` detached with CNI; returns its eth0 address and pid.
fn run_container(ctrd: &Containerd, dir: &Path, id: &str) -> (Ipv4Addr, u32) {
    let rootfs = busybox_rootfs(&dir.join(format!("rootfs-{id}")));
    let rootfs = rootfs.display().to_string();
    ctrd.ctr_ok(&[
        "run", "--rootfs", "--cni", "-d", &rootfs, id, "/bin/sh", "-c", IDLE,
    ]);
    let pid = ctrd.task_pid(id);
    let out = run_ok(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let ip = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("container {id} has no IPv4 on eth0: {text}"));
    (ip, pid)
}

/// `ping -c1 -W2 TO` inside container `id` (`ctr tasks exec`).
fn container_pings(ctrd: &Containerd, id: &str, to: &str) -> bool {
    let exec_id = unique("ping");
    let out = ctrd.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        &exec_id,
        id,
        "/bin/ping",
        "-c1",
        "-W2",
        to,
    ]);
    out.status.success()
}

/// Waits until task `id` is stopped, then removes it and its container.
fn remove_when_stopped(ctrd: &Containerd, id: &str) {
    let stopped = eventually(Duration::from_secs(20), || {
        ctrd.task_status(id).as_deref() == Some("STOPPED")
    });
    assert!(
        stopped,
        "task {id} did not stop: {:?}",
        ctrd.task_status(id)
    );
    ctrd.ctr_ok(&["tasks", "delete", id]);
    ctrd.ctr_ok(&["containers", "delete", id]);
}

#[test]
fn ctr_run_cni_containers_reach_each_other_and_the_host_and_release_on_stop_and_gc() {
    let test = "ctr_run_cni_containers_reach_each_other_and_the_host_and_release_on_stop_and_gc";
    if !ready(test) || !require_upstream(test, &CONTAINERD_PROGRAMS) {
        return;
    }
    if !tabby_testkit::require_programs(test, &["runc", "/bin/busybox"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let octet = unique_octet();
    let (host, host_ip) = runtime_host("tcf-ctr-host", octet);
    let list = conflist(
        "1.1.0",
        vec![tabby_plugin(dir.path(), &format!("10.{octet}.0.0/16"))],
    );
    let ctrd = Containerd::start(&host, dir.path(), &list, &[&release_dir(), &plugins_dir()]);
    let store = dir.path().join("datastore");

    let (a, b) = (unique("ctra"), unique("ctrb"));
    let (ip_a, _) = run_container(&ctrd, dir.path(), &a);
    let (ip_b, pid_b) = run_container(&ctrd, dir.path(), &b);
    assert_containers_reach_each_other_and_the_host(
        &host,
        host_ip,
        (&a, ip_a),
        (&b, ip_b),
        |id, to| container_pings(&ctrd, id, &to.to_string()),
    );

    // Stop a: ctr DELs its network (with an empty netns path), then signals.
    ctrd.ctr_ok(&["tasks", "kill", &a]);
    remove_when_stopped(&ctrd, &a);
    assert_released(&host, &store, &a, ip_a, "ctr tasks kill");

    // SIGKILL b behind containerd's back; the runtime removes it without CNI.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_b as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    remove_when_stopped(&ctrd, &b);
    assert!(
        !files_mentioning(&store, &b).is_empty(),
        "the runtime's cleanup made no CNI call, yet {b}'s allocation is gone: what released it?"
    );
    // CNI GC on ctr's libcni cache: no attachment is valid any more.
    let gc_dir = dir.path().join("gc");
    std::fs::create_dir_all(&gc_dir).unwrap();
    let gc = Driver::new(&host, &gc_dir, &list, &[&release_dir(), &plugins_dir()])
        .with_cache_dir(&ctrd.cni_cache());
    gc.gc(&[]);
    assert_released(&host, &store, &b, ip_b, "CNI GC after SIGKILL");
}
