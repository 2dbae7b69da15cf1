//! A Kubernetes node: the lab's node network namespace plus a mount and UTS
//! namespace of its own ([`mounts`]), a cgroup ([`cgroup`]), one containerd
//! and one kubelet, both detached and recorded.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tabby_testkit::kube::certs::{CertRequest, Pki};

use super::control_plane::{client_kubeconfig, cluster_url};
use super::{cgroup, cluster_path, mounts, upstream, Component, KubeNode, KubeState};
use crate::process::{launch, poll_until, Launch, ProcRef};
use crate::sh;
use crate::state::{write_atomic, LabState, StateDir};

/// containerd's socket inside a node.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The pause image every pod sandbox runs (containerd's pinned sandbox image).
pub const PAUSE_IMAGE: &str = "lab.tabby.dev/pause:dev";
/// How long a fresh containerd gets to answer.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(30);

/// One node of the cluster, as the lab sees it.
#[derive(Debug, Clone)]
pub struct Node<'a> {
    /// e.g. `node-1`.
    pub name: &'a str,
    /// Its network namespace.
    pub netns: &'a str,
    /// Its underlay address (`--node-ip`).
    pub address: Ipv4Addr,
    /// Its cgroup (relative), the kubelet's cgroupRoot without the slash.
    pub cgroup: &'a str,
    /// The state directory.
    pub dir: &'a StateDir,
}

impl Node<'_> {
    /// The node's directory.
    pub fn root(&self) -> PathBuf {
        self.dir.node_dir(self.name)
    }

    /// The node's mount namespace file.
    pub fn mnt(&self) -> PathBuf {
        self.dir.mount_ns(self.name)
    }

    /// The node's UTS namespace file.
    pub fn uts(&self) -> PathBuf {
        self.dir.uts_ns(self.name)
    }

    /// `nsenter` into the node's network, mount and UTS namespaces, then `program`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--net={}",
            crate::names::netns_path(self.netns).display()
        ))
        .arg(format!("--mount={}", self.mnt().display()))
        .arg(format!("--uts={}", self.uts().display()))
        .arg("--")
        .arg(program)
        .env("PATH", cluster_path());
        cmd
    }

    /// Makes the node's namespaces, file system view and cgroup, and records
    /// the node in `kube` first (so `down` knows what to look for).
    pub fn prepare(&self, state: &mut LabState) -> anyhow::Result<()> {
        state.kube_mut().nodes.push(KubeNode {
            name: self.name.to_string(),
            cgroup_root: format!("/{}", self.cgroup),
            components: Vec::new(),
            pod_cidr: None,
        });
        state.save(self.dir)?;
        cgroup::create(&format!("{}/{}", self.cgroup, cgroup::RUNTIME))?;
        let root = self.root();
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        mounts::private_mount_point(&self.dir.ns_dir())?;
        mounts::new_namespaces(&self.mnt(), &self.uts())?;
        mounts::setup(&mounts::NodeFs {
            name: self.name,
            dir: &root,
            state_root: self.dir.root(),
            mnt: &self.mnt(),
            uts: &self.uts(),
            ns_dir: &self.dir.ns_dir(),
        })
        .with_context(|| format!("mounting {}'s file system view", self.name))
    }

    /// Starts `program` in the node's namespaces and runtime cgroup, logging
    /// to `<node>/<name>.log`, and records it.
    fn start(
        &self,
        kube: &mut KubeState,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<ProcRef> {
        let log = self.root().join(format!("{name}.log"));
        let (mnt, uts) = (self.mnt(), self.uts());
        let mut l = Launch::new(program, args, &log);
        l.netns = Some(self.netns);
        l.mount_ns = Some(&mnt);
        l.uts_ns = Some(&uts);
        l.cgroup_procs = cgroup::procs_files(&format!("{}/{}", self.cgroup, cgroup::RUNTIME));
        l.env = vec![("PATH", cluster_path())];
        let process = launch(&l).with_context(|| format!("starting {name} on {}", self.name))?;
        if let Some(n) = kube.node_mut(self.name) {
            n.components.push(Component {
                name: name.to_string(),
                process: process.clone(),
            });
        }
        Ok(process)
    }

    /// Writes containerd's config and starts it (not waiting).
    pub fn start_containerd(&self, kube: &mut KubeState) -> anyhow::Result<ProcRef> {
        let config = self.root().join("containerd.toml");
        write_atomic(
            &config,
            containerd_config(&self.root().join("containerd")).as_bytes(),
        )?;
        let args = vec!["--config".to_string(), config.display().to_string()];
        self.start(kube, "containerd", &upstream("containerd")?, &args)
    }

    /// Waits until containerd answers on its socket; fails early if it exits.
    pub fn wait_containerd(&self, process: &ProcRef) -> anyhow::Result<()> {
        let mut answered = false;
        poll_until(CONTAINERD_TIMEOUT, Duration::from_millis(100), || {
            answered = self.ctr(&["version"]).is_ok();
            answered || !process.alive()
        });
        anyhow::ensure!(
            answered,
            "{}'s containerd did not answer within {CONTAINERD_TIMEOUT:?}; {} ends with:\n{}",
            self.name,
            self.root().join("containerd.log").display(),
            tabby_testkit::kube::process::log_tail(&self.root().join("containerd.log"), 15)
        );
        Ok(())
    }

    /// `ctr --address SOCKET -n k8s.io ARGS...` inside the node.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = mounts::in_node(&self.mnt(), None, &upstream("ctr")?.display().to_string());
        cmd.args(["--address", CONTAINERD_SOCKET, "--namespace", "k8s.io"])
            .args(args);
        sh::run(cmd)
    }

    /// Writes the kubelet's certificates, kubeconfig and config, and starts it.
    pub fn start_kubelet(&self, kube: &mut KubeState, pki: &Pki) -> anyhow::Result<ProcRef> {
        let root = self.root();
        let user = format!("system:node:{}", self.name);
        let kubeconfig = root.join("kubelet.kubeconfig");
        client_kubeconfig(pki, &kubeconfig, &cluster_url(), &user, &["system:nodes"])?;
        let pki_dir = root.join("pki");
        pki.issue_files(
            &CertRequest {
                common_name: self.name,
                dns_names: &[self.name.to_string()],
                ips: &[self.address.into()],
                server: true,
                ..CertRequest::default()
            },
            &pki_dir,
            "kubelet",
        )
        .context("issuing the kubelet's serving certificate")?;
        let config = root.join("kubelet.yaml");
        let text = kubelet_config(&KubeletFiles {
            cgroup_root: &format!("/{}", self.cgroup),
            address: self.address,
            ca: &pki.path(tabby_testkit::kube::certs::CA_CERT),
            serving: &pki_dir,
        });
        write_atomic(&config, text.as_bytes())?;
        let args: Vec<String> = [
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.address),
            "--root-dir=/var/lib/kubelet".to_string(),
            format!("--cert-dir={}", pki_dir.display()),
        ]
        .into();
        self.start(kube, "kubelet", &upstream("kubelet")?, &args)
    }

    /// Starts a process on the node (kube-proxy) the same way.
    pub fn start_component(
        &self,
        kube: &mut KubeState,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<ProcRef> {
        self.start(kube, name, program, args)
    }
}

/// containerd 2.x (config version 3) for one node: its own root, state in
/// the node's private /run, CRI with the node's CNI dirs, Debian's runc, the
/// lab's pause image, and `restrict_oom_score_adj` (root here lacks
/// CAP_SYS_RESOURCE, so runc cannot lower a sandbox's oom_score_adj).
pub fn containerd_config(root: &Path) -> String {
    format!(
        r#"# containerd config written by tabby-lab
version = 3
root = "{root}"
state = "/run/containerd"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/opt/cni/bin"]
  conf_dir = "/etc/cni/net.d"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = "/usr/sbin/runc"
"#,
        root = root.display()
    )
}

/// The files a kubelet config names.
#[derive(Debug)]
pub struct KubeletFiles<'a> {
    /// The node's cgroup, e.g. `/tabby-node-1`.
    pub cgroup_root: &'a str,
    /// The node's address (the kubelet listens there).
    pub address: Ipv4Addr,
    /// The cluster CA (client certificates of the apiserver).
    pub ca: &'a Path,
    /// The directory of `kubelet.crt` and `kubelet.key` (serving).
    pub serving: &'a Path,
}

/// The KubeletConfiguration: cgroup v1 allowed, cgroupfs under the node's
/// own cgroupRoot (two kubelets sharing one would evict each other's pods),
/// Webhook authentication and authorization against the apiserver, a
/// serving certificate from the cluster CA, tiny eviction thresholds (a
/// shared development disk).
pub fn kubelet_config(f: &KubeletFiles<'_>) -> String {
    format!(
        r#"# kubelet config written by tabby-lab
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
containerRuntimeEndpoint: unix://{CONTAINERD_SOCKET}
address: {address}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: Webhook
tlsCertFile: {serving}/kubelet.crt
tlsPrivateKeyFile: {serving}/kubelet.key
failSwapOn: false
resolvConf: /etc/resolv.conf
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
serializeImagePulls: false
"#,
        cgroup_root = f.cgroup_root,
        address = f.address,
        ca = f.ca.display(),
        serving = f.serving.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelet_config_keeps_each_node_in_its_own_cgroup_and_allows_cgroup_v1() {
        let text = kubelet_config(&KubeletFiles {
            cgroup_root: "/tl1-node-2",
            address: "10.98.0.2".parse().unwrap(),
            ca: Path::new("/s/ca.crt"),
            serving: Path::new("/s/nodes/node-2/pki"),
        });
        for line in [
            "failCgroupV1: false",
            "cgroupDriver: cgroupfs",
            "cgroupRoot: /tl1-node-2",
            "address: 10.98.0.2",
            "  mode: Webhook",
            "tlsCertFile: /s/nodes/node-2/pki/kubelet.crt",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[test]
    fn containerd_keeps_its_state_private_and_restricts_oom_score_adj() {
        let text = containerd_config(Path::new("/s/nodes/node-1/containerd"));
        assert!(text.contains("root = \"/s/nodes/node-1/containerd\""));
        assert!(text.contains("restrict_oom_score_adj = true"));
        assert!(text.contains(&format!("sandbox = \"{PAUSE_IMAGE}\"")));
        toml::from_str::<toml::Value>(&text).expect("valid TOML");
    }
}
