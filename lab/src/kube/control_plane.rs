//! The control plane: the PKI and kubeconfigs, then etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler in the control-plane
//! namespace (flags shared with the test harness:
//! `tabby_testkit::kube::args`), each detached and recorded.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tabby_testkit::kube::certs::{CertRequest, Pki};
use tabby_testkit::kube::{args, write_cert_kubeconfig, FIRST_SERVICE_IP, SERVICE_CIDR};

use super::{cgroup, upstream, Component, KubeState};
use crate::names::{self, CONTROL_PLANE_HOST};
use crate::process::{launch, Launch, ProcRef};
use crate::state::StateDir;

/// The apiserver's port in the control-plane namespace.
pub const APISERVER_PORT: u16 = 6443;
const ETCD_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// The control plane's address on the underlay.
pub fn address() -> Ipv4Addr {
    names::host(CONTROL_PLANE_HOST)
}

/// The apiserver's URL inside the cluster (nodes, controllers).
pub fn cluster_url() -> String {
    format!("https://{}:{APISERVER_PORT}", address())
}

/// The PKI in `<control-plane>/pki`: made once, with the serving
/// certificate valid for the underlay address, the forwarder's 127.0.0.1
/// and the `kubernetes` Service's IP.
pub fn pki(dir: &StateDir) -> anyhow::Result<Pki> {
    let ips = [
        IpAddr::V4(address()),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(FIRST_SERVICE_IP),
    ];
    Pki::load_or_create(&dir.control_plane_dir().join("pki"), &ips)
        .context("making the control plane's certificates")
}

/// A client certificate for user `cn` in groups `orgs`, and a kubeconfig
/// for it at `path` pointing at `url`.
pub fn client_kubeconfig(
    pki: &Pki,
    path: &Path,
    url: &str,
    cn: &str,
    orgs: &[&str],
) -> anyhow::Result<()> {
    let cert = pki
        .issue(&CertRequest {
            common_name: cn,
            organizations: orgs,
            client: true,
            ..CertRequest::default()
        })
        .with_context(|| format!("issuing a client certificate for {cn}"))?;
    write_cert_kubeconfig(path, url, &pki.ca_pem, &cert.cert_pem, &cert.key_pem)
        .with_context(|| format!("writing {}", path.display()))
}

/// The admin kubeconfig for the host, through the forwarder on 127.0.0.1:`port`.
pub fn write_admin_kubeconfig(pki: &Pki, dir: &StateDir, port: u16) -> anyhow::Result<()> {
    let url = format!("https://127.0.0.1:{port}");
    write_cert_kubeconfig(
        &dir.kubeconfig(),
        &url,
        &pki.ca_pem,
        &pki.admin_cert_pem,
        &pki.admin_key_pem,
    )
    .with_context(|| format!("writing {}", dir.kubeconfig().display()))
}

/// Where the control plane's components run.
#[derive(Debug)]
pub struct Plane<'a> {
    /// The state directory.
    pub dir: &'a StateDir,
    /// The control-plane namespace.
    pub netns: &'a str,
    /// Its cgroup (relative).
    pub cgroup: &'a str,
    /// The PKI.
    pub pki: &'a Pki,
}

impl Plane<'_> {
    /// Starts `name` (an upstream binary) with `args`, logging to
    /// `<control-plane>/<name>.log`, and records it.
    fn start(&self, kube: &mut KubeState, name: &str, args: &[String]) -> anyhow::Result<ProcRef> {
        self.start_program(kube, name, &upstream(name)?, Some(self.netns), args)
    }

    /// Starts `program` as component `name` in `netns` (None: the host's)
    /// and the control plane's cgroup, logging to `<control-plane>/<name>.log`.
    pub fn start_program(
        &self,
        kube: &mut KubeState,
        name: &str,
        program: &Path,
        netns: Option<&str>,
        args: &[String],
    ) -> anyhow::Result<ProcRef> {
        let log = self.dir.control_plane_dir().join(format!("{name}.log"));
        let mut l = Launch::new(program, args, &log);
        l.netns = netns;
        l.cgroup_procs = cgroup::procs_files(&format!("{}/{}", self.cgroup, cgroup::RUNTIME));
        let process = launch(&l).with_context(|| format!("starting {name}"))?;
        kube.control_plane.push(Component {
            name: name.to_string(),
            process: process.clone(),
        });
        Ok(process)
    }

    /// Starts etcd and kube-apiserver (not waiting for them).
    pub fn start_storage_and_apiserver(&self, kube: &mut KubeState) -> anyhow::Result<()> {
        let cp = self.dir.control_plane_dir();
        let ip = address();
        let etcd_url = format!("http://{ip}:{ETCD_PORT}");
        let peer_url = format!("http://{ip}:{ETCD_PEER_PORT}");
        self.start(
            kube,
            "etcd",
            &args::etcd(&cp.join("etcd"), &etcd_url, &peer_url),
        )?;
        let mut flags = args::apiserver(&args::Apiserver {
            etcd_url: &etcd_url,
            bind: IpAddr::V4(ip),
            port: APISERVER_PORT,
            cert_dir: &cp.join("apiserver"),
            pki: self.pki,
            service_cidr: SERVICE_CIDR,
        });
        let client = self.kubelet_client_cert()?;
        flags.push(format!(
            "--kubelet-client-certificate={}",
            client.0.display()
        ));
        flags.push(format!("--kubelet-client-key={}", client.1.display()));
        flags.push("--kubelet-preferred-address-types=InternalIP".to_string());
        self.start(kube, "kube-apiserver", &flags)?;
        Ok(())
    }

    /// The apiserver's client certificate towards the kubelets (logs,
    /// exec): a superuser, so the kubelets' Webhook authorization allows it.
    fn kubelet_client_cert(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let dir = self.pki.dir.clone();
        self.pki
            .issue_files(
                &CertRequest {
                    common_name: "kube-apiserver-kubelet-client",
                    organizations: &["system:masters"],
                    client: true,
                    ..CertRequest::default()
                },
                &dir,
                "apiserver-kubelet-client",
            )
            .context("issuing the apiserver's kubelet client certificate")?;
        Ok((
            dir.join("apiserver-kubelet-client.crt"),
            dir.join("apiserver-kubelet-client.key"),
        ))
    }

    /// Starts kube-controller-manager and kube-scheduler with kubeconfigs
    /// of their own users (bound by the default RBAC roles).
    pub fn start_controllers(&self, kube: &mut KubeState) -> anyhow::Result<()> {
        let cp = self.dir.control_plane_dir();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let kcm = cp.join("controller-manager.kubeconfig");
        client_kubeconfig(
            self.pki,
            &kcm,
            &cluster_url(),
            "system:kube-controller-manager",
            &[],
        )?;
        let flags = args::controller_manager(&kcm, self.pki, SERVICE_CIDR, localhost);
        self.start(kube, "kube-controller-manager", &flags)?;
        let scheduler = cp.join("scheduler.kubeconfig");
        client_kubeconfig(
            self.pki,
            &scheduler,
            &cluster_url(),
            "system:kube-scheduler",
            &[],
        )?;
        self.start(
            kube,
            "kube-scheduler",
            &args::scheduler(&scheduler, localhost),
        )?;
        Ok(())
    }
}

/// Whether every recorded control-plane process still runs; else an error
/// naming the first that exited, with the end of its log.
pub fn check_alive(dir: &StateDir, kube: &KubeState) -> anyhow::Result<()> {
    for c in &kube.control_plane {
        if !c.process.alive() {
            let log = dir.control_plane_dir().join(format!("{}.log", c.name));
            anyhow::bail!(
                "{} (pid {}) exited; {} ends with:\n{}",
                c.name,
                c.process.pid,
                log.display(),
                tabby_testkit::kube::process::log_tail(&log, 20)
            );
        }
    }
    Ok(())
}

/// How long the apiserver gets to answer `/readyz` (two shared cores: it
/// takes about 10 s here).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
