//! podman 4.3 (Debian's) with `network_backend = "cni"` runs containers on a
//! tabby network from a conflist directory of the test: two containers reach
//! each other and the host, `podman stop` releases the address, and a
//! container killed with SIGKILL behind podman's back leaves no allocation
//! once podman has cleaned it up (conmon's `podman container cleanup`) and
//! removed it.
//!
//! podman runs in the test's "host" namespace with its own containers.conf
//! (`CONTAINERS_CONF`), vfs storage root, runroot and tmp dir under a temp
//! dir; containers are a busybox-static rootfs imported as an image. Its
//! libcni cache is the machine's `/var/lib/cni` (entries named by random
//! container IDs, removed with the container).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tabby_conformance::containerd::busybox_rootfs;
use tabby_conformance::{
    assert_containers_reach_each_other_and_the_host, assert_released, conflist, plugins_dir, ready,
    release_dir, runtime_host, tabby_plugin, unique_octet,
};
use tabby_testkit::{eventually, run_ok, unique, Netns};

const IDLE: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

/// A podman whose state lives under one temp dir; removes its containers on
/// drop.
struct Podman {
    dir: PathBuf,
    host: PathBuf,
}

impl Podman {
    fn new(dir: &Path, host: &Netns, network: &str, list: &serde_json::Value) -> Podman {
        for d in ["net.d", "cni-bin", "root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for bin_dir in [release_dir(), plugins_dir()] {
            for e in std::fs::read_dir(&bin_dir).unwrap().flatten() {
                let target = dir.join("cni-bin").join(e.file_name());
                if !target.exists() {
                    std::os::unix::fs::symlink(e.path(), target).unwrap();
                }
            }
        }
        let mut list = list.clone();
        list["name"] = network.into();
        let path = dir.join("net.d").join(format!("{network}.conflist"));
        std::fs::write(path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:4096\", \"nproc=4096:4096\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             events_logfile_path = \"{d}/events.log\"\ntmp_dir = \"{d}/tmp\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{d}/cni-bin\"]\n\
             network_config_dir = \"{d}/net.d\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("containers.conf"), conf).unwrap();
        let p = Podman {
            dir: dir.to_path_buf(),
            host: host.path(),
        };
        let rootfs = busybox_rootfs(&dir.join("rootfs"));
        let tar = dir.join("rootfs.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        p.run_ok(&[
            "import",
            &tar.display().to_string(),
            "localhost/tabby-busybox",
        ]);
        p
    }

    fn run(&self, args: &[&str]) -> Output {
        let d = &self.dir;
        Command::new("nsenter")
            .arg(format!("--net={}", self.host.display()))
            .arg("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .output()
            .unwrap_or_else(|e| panic!("run podman {args:?}: {e}"))
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn inspect(&self, name: &str, format: &str) -> String {
        self.run_ok(&["inspect", name, "--format", format])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--all", "--time", "0"]);
    }
}

#[test]
fn podman_cni_containers_reach_each_other_and_the_host_and_release_on_stop_and_kill() {
    let test = "podman_cni_containers_reach_each_other_and_the_host_and_release_on_stop_and_kill";
    if !ready(test) || !tabby_testkit::require_programs(test, &["podman", "conmon", "runc"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let octet = unique_octet();
    let (host, host_ip) = runtime_host("tcf-pd-host", octet);
    // podman 4.3 vendors libcni 1.1.2: CNI up to 1.0.0.
    let cidr = format!("10.{octet}.0.0/16");
    let list = conflist("1.0.0", vec![tabby_plugin(dir.path(), &cidr)]);
    let network = unique("tpd");
    let podman = Podman::new(dir.path(), &host, &network, &list);
    let store = dir.path().join("datastore");

    let (a, b) = (unique("pda"), unique("pdb"));
    let mut ids = Vec::new();
    for name in [&a, &b] {
        let id = podman.run_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &network,
            "localhost/tabby-busybox",
            "/bin/sh",
            "-c",
            IDLE,
        ]);
        ids.push(id);
    }
    let ip_of = |name: &str| -> Ipv4Addr {
        let ip = podman.inspect(
            name,
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        );
        ip.parse()
            .unwrap_or_else(|e| panic!("container {name}'s address {ip:?}: {e}"))
    };
    let (ip_a, ip_b) = (ip_of(&a), ip_of(&b));
    assert_containers_reach_each_other_and_the_host(
        &host,
        host_ip,
        (&a, ip_a),
        (&b, ip_b),
        |from, to| {
            let to = to.to_string();
            podman
                .run(&["exec", from, "/bin/ping", "-c1", "-W2", &to])
                .status
                .success()
        },
    );

    podman.run_ok(&["stop", "--time", "5", &a]);
    podman.run_ok(&["rm", &a]);
    assert_released(&host, &store, &ids[0], ip_a, "podman stop + rm");

    let pid: i32 = podman.inspect(&b, "{{.State.Pid}}").parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exited = eventually(Duration::from_secs(20), || {
        podman.inspect(&b, "{{.State.Status}}") == "exited"
    });
    assert!(exited, "container {b} did not exit after SIGKILL");
    podman.run_ok(&["rm", &b]);
    assert_released(
        &host,
        &store,
        &ids[1],
        ip_b,
        "SIGKILL + podman's cleanup + rm",
    );
}
