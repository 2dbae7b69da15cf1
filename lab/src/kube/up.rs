//! `tabby-lab up --kubernetes`: the steps, each printed with the time since
//! the start, each recorded in the state file before it is taken.

use std::time::Duration;

use anyhow::Context;
use tabby_testkit::kube::certs::Pki;

use super::control_plane::{self, Plane};
use super::images::{self, Built, Source, ECHO_IMAGE, PAUSE_IMAGE, TABBY_IMAGE};
use super::kubectl::{self, Kubectl};
use super::node::Node;
use super::{cgroup, forward, reference, tabby, upstream, CniMode, KubeState, Progress};
use crate::names::{self, MAX_NODES};
use crate::process::poll_until;
use crate::state::LabState;
use crate::{topology, Lab};

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker nodes.
    pub nodes: usize,
    /// The pod network.
    pub cni: CniMode,
}

/// The upstream binaries a cluster runs.
const UPSTREAM: [&str; 10] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
];
/// The `kubernetes` Service's ClusterIP (the first of the service range).
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// How long nodes get to register, and then to become Ready.
const NODES_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds the cluster; on failure says how to clean up.
pub fn up(lab: &Lab, opts: &Options) -> anyhow::Result<()> {
    preflight(opts)?;
    if opts.cni == CniMode::Tabby {
        require_tabby(lab)?;
    }
    let _lock = lab.dir.lock()?;
    crate::up::refuse_existing(lab)?;
    let leftovers = cgroup::find_roots(|n| lab.names.owns_cgroup(n));
    anyhow::ensure!(
        leftovers.is_empty(),
        "cgroups of a lab with prefix {:?} exist ({}): run `tabby-lab --prefix {} down` first",
        lab.names.prefix(),
        leftovers.into_iter().collect::<Vec<_>>().join(", "),
        lab.names.prefix()
    );
    build(lab, opts).map_err(|e| {
        e.context(format!(
            "tabby-lab up --kubernetes stopped half-way; `{} down` removes what it made",
            crate::up::invocation(lab)
        ))
    })
}

/// Fails before anything is made when a part is missing.
fn preflight(opts: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_NODES).contains(&opts.nodes),
        "--nodes must be between 1 and {MAX_NODES}"
    );
    for bin in UPSTREAM {
        upstream(bin)?;
    }
    anyhow::ensure!(
        std::path::Path::new("/usr/sbin/runc").is_file(),
        "/usr/sbin/runc is missing: bash scripts/setup.sh installs Debian's runc"
    );
    cgroup::require_v1()?;
    Ok(())
}

/// `--cni tabby` runs the workspace's plugin and agent: they must be built.
fn require_tabby(lab: &Lab) -> anyhow::Result<()> {
    for bin in ["tabby", "tabby-ipam", "tabby-node", "tabbyctl"] {
        let path = lab.bin_dir.join(bin);
        anyhow::ensure!(
            path.is_file(),
            "{} is not built: cargo build --release --workspace (or pass --bin-dir)",
            path.display()
        );
    }
    Ok(())
}

/// A node's names and address.
struct NodeNames {
    name: String,
    netns: String,
    address: std::net::Ipv4Addr,
    cgroup: String,
}

impl NodeNames {
    fn node<'a>(&'a self, dir: &'a crate::state::StateDir) -> Node<'a> {
        Node {
            name: &self.name,
            netns: &self.netns,
            address: self.address,
            cgroup: &self.cgroup,
            dir,
        }
    }
}

/// Everything a running `up` holds.
struct Build<'a> {
    lab: &'a Lab,
    opts: &'a Options,
    state: LabState,
    pki: Pki,
    progress: Progress,
}

fn build(lab: &Lab, opts: &Options) -> anyhow::Result<()> {
    let state = LabState {
        prefix: lab.names.prefix().to_string(),
        bin_dir: lab.bin_dir.clone(),
        kubernetes: Some(KubeState::new(opts.cni)),
        ..LabState::default()
    };
    state.save(&lab.dir)?;
    let progress = Progress::start();
    println!(
        "tabby-lab: building a Kubernetes cluster of {} nodes ({:?} CNI) in {}",
        opts.nodes,
        opts.cni,
        lab.dir.root().display()
    );
    std::fs::create_dir_all(lab.dir.control_plane_dir())
        .with_context(|| format!("creating {}", lab.dir.control_plane_dir().display()))?;
    let pki = control_plane::pki(&lab.dir)?;
    let mut b = Build {
        lab,
        opts,
        state,
        pki,
        progress,
    };
    b.network()?;
    b.control_plane()?;
    let built = b.images()?;
    b.nodes(&built)?;
    b.wait_apiserver()?;
    b.start_controllers()?;
    b.kubelets()?;
    b.pod_network()?;
    b.finish()
}

impl Build<'_> {
    fn save(&self) -> anyhow::Result<()> {
        self.state.save(&self.lab.dir)
    }

    /// Node `index`'s names, from the lab's prefix.
    fn names(&self, index: usize) -> NodeNames {
        let name = names::node_name(index);
        NodeNames {
            netns: self.lab.names.node_ns(&name),
            cgroup: self.lab.names.node_cgroup(&name),
            address: names::node_address(index),
            name,
        }
    }

    /// Underlay, external client, control-plane namespace.
    fn network(&mut self) -> anyhow::Result<()> {
        let (names, dir) = (&self.lab.names, &self.lab.dir);
        topology::add_underlay(names, &mut self.state, dir, 1)?;
        topology::add_external(names, &mut self.state, dir)?;
        topology::add_control_plane(names, &mut self.state, dir)?;
        self.progress.step(format!(
            "underlay {} ({}/24), control plane {} {}, external client {}",
            names.underlay_ns(),
            names::host(names::GATEWAY_HOST),
            names.control_plane_ns(),
            control_plane::address(),
            names::host(names::EXTERNAL_HOST)
        ));
        Ok(())
    }

    /// etcd and kube-apiserver (not waited for yet), and the host's forwarder.
    fn control_plane(&mut self) -> anyhow::Result<()> {
        let (netns, group) = (
            self.lab.names.control_plane_ns(),
            self.lab.names.control_plane_cgroup(),
        );
        cgroup::create(&format!("{group}/{}", cgroup::RUNTIME))?;
        let lab = self.lab;
        let plane = Plane {
            dir: &lab.dir,
            netns: &netns,
            cgroup: &group,
            pki: &self.pki,
        };
        let started = plane.start_storage_and_apiserver(self.state.kube_mut());
        self.save()?;
        started?;
        let port = forward::free_port()?;
        self.state.kube_mut().host_port = Some(port);
        control_plane::write_admin_kubeconfig(&self.pki, &lab.dir, port)?;
        let to = format!(
            "{}:{}",
            control_plane::address(),
            control_plane::APISERVER_PORT
        );
        let args = vec![
            "forward".to_string(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--netns={}", names::netns_path(&netns).display()),
            format!("--to={to}"),
        ];
        let started =
            plane.start_program(self.state.kube_mut(), "forward", &lab.self_exe, None, &args);
        self.save()?;
        started?;
        self.progress.step(format!(
            "control plane: etcd and kube-apiserver starting on {to}, forwarded to https://127.0.0.1:{port}"
        ));
        Ok(())
    }

    /// The images the cluster needs, from the cache or built.
    fn images(&mut self) -> anyhow::Result<Vec<Built>> {
        let mut wanted = vec![PAUSE_IMAGE, ECHO_IMAGE];
        if self.opts.cni == CniMode::Tabby {
            wanted.push(TABBY_IMAGE);
        }
        let bins = Source::detect(&self.lab.bin_dir).binaries_for(&wanted)?;
        self.progress
            .step(format!("static binaries in {}", bins.display()));
        let cache = images::cache_dir();
        let mut built = Vec::new();
        for name in wanted {
            let image = images::build(name, &bins, &cache)?;
            let size = std::fs::metadata(&image.file).map(|m| m.len()).unwrap_or(0);
            self.progress.step(format!(
                "image {name}: {} ({:.1} MB, {})",
                if image.cached { "cached" } else { "built" },
                size as f64 / 1e6,
                image.file.display()
            ));
            built.push(image);
        }
        Ok(built)
    }

    /// Per node: namespaces, file system view, cgroup, containerd; then
    /// every node imports the images (in parallel).
    fn nodes(&mut self, built: &[Built]) -> anyhow::Result<()> {
        let lab = self.lab;
        let mut containerds = Vec::new();
        for index in 1..=self.opts.nodes {
            let n = self.names(index);
            topology::add_node(&lab.names, &mut self.state, &lab.dir, index)?;
            let node = n.node(&lab.dir);
            node.prepare(&mut self.state)?;
            let started = node.start_containerd(self.state.kube_mut());
            self.save()?;
            containerds.push(started?);
            self.progress.step(format!(
                "{}: namespace {} {}, mount + UTS namespaces, cgroup /{}, containerd started",
                n.name, n.netns, n.address, n.cgroup
            ));
        }
        let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..=self.opts.nodes)
                .zip(&containerds)
                .map(|(index, process)| {
                    let this = &*self;
                    s.spawn(move || this.import(index, process, built))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("import thread panicked")))
                })
                .collect()
        });
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        self.progress.step(format!(
            "images imported into every node's containerd ({} each)",
            built.len()
        ));
        Ok(())
    }

    fn import(
        &self,
        index: usize,
        containerd: &crate::process::ProcRef,
        built: &[Built],
    ) -> anyhow::Result<()> {
        let n = self.names(index);
        let node = n.node(&self.lab.dir);
        node.wait_containerd(containerd)?;
        for image in built {
            let file = image.file.display().to_string();
            node.ctr(&["images", "import", &file])
                .with_context(|| format!("importing {} into {}", image.name, n.name))?;
        }
        Ok(())
    }

    fn wait_apiserver(&mut self) -> anyhow::Result<()> {
        let kubectl = Kubectl::new(&self.lab.dir)?;
        let mut result = Ok(());
        let ready = poll_until(
            control_plane::READY_TIMEOUT,
            Duration::from_millis(200),
            || {
                result = control_plane::check_alive(
                    &self.lab.dir,
                    self.state.kubernetes.as_ref().expect("kube"),
                );
                result.is_err() || kubectl.ready()
            },
        );
        result?;
        anyhow::ensure!(
            ready,
            "kube-apiserver not ready after {:?}; see {}",
            control_plane::READY_TIMEOUT,
            self.lab
                .dir
                .control_plane_dir()
                .join("kube-apiserver.log")
                .display()
        );
        self.progress
            .step("control plane: kube-apiserver ready (/readyz ok)");
        Ok(())
    }

    fn start_controllers(&mut self) -> anyhow::Result<()> {
        let (netns, group) = (
            self.lab.names.control_plane_ns(),
            self.lab.names.control_plane_cgroup(),
        );
        let lab = self.lab;
        let plane = Plane {
            dir: &lab.dir,
            netns: &netns,
            cgroup: &group,
            pki: &self.pki,
        };
        let started = plane.start_controllers(self.state.kube_mut());
        self.save()?;
        started?;
        self.progress
            .step("control plane: kube-controller-manager and kube-scheduler started");
        Ok(())
    }

    /// Starts every kubelet and waits until every node has registered
    /// (NotReady until a CNI config exists, as on a real cluster).
    fn kubelets(&mut self) -> anyhow::Result<()> {
        let lab = self.lab;
        for index in 1..=self.opts.nodes {
            let n = self.names(index);
            let node = n.node(&lab.dir);
            let started = node.start_kubelet(self.state.kube_mut(), &self.pki);
            self.save()?;
            started?;
        }
        self.progress
            .step(format!("kubelets started on {} nodes", self.opts.nodes));
        let kubectl = Kubectl::new(&self.lab.dir)?;
        let want: Vec<String> = (1..=self.opts.nodes).map(names::node_name).collect();
        let mut seen = Vec::new();
        let registered = poll_until(NODES_TIMEOUT, Duration::from_millis(250), || {
            seen = kubectl.nodes().unwrap_or_default();
            want.iter().all(|w| seen.iter().any(|(n, _)| n == w))
        });
        anyhow::ensure!(
            registered,
            "nodes did not register within {NODES_TIMEOUT:?} (seen: {seen:?}); see the kubelet logs in {}",
            self.lab.dir.root().join("nodes").display()
        );
        let list = kubectl.get_json(&["nodes"])?;
        let why = kubectl::ready_message(&list, &want[0]).unwrap_or_default();
        self.progress.step(format!(
            "nodes registered: {} (NotReady: {why})",
            want.join(", ")
        ));
        Ok(())
    }

    /// The CNI, then Ready nodes, then (reference) kube-proxy.
    fn pod_network(&mut self) -> anyhow::Result<()> {
        match self.opts.cni {
            CniMode::Reference => self.reference_cni()?,
            CniMode::Tabby => self.tabby_cni()?,
        }
        self.wait_ready()?;
        match self.opts.cni {
            CniMode::Reference => self.kube_proxies()?,
            CniMode::Tabby => self.tabby_converged()?,
        }
        Ok(())
    }

    /// Per node its OS's `loopback`; then `kubectl apply -f
    /// deploy/tabby.yaml` and the lab's pool in the Kubernetes datastore.
    fn tabby_cni(&mut self) -> anyhow::Result<()> {
        let lab = self.lab;
        for index in 1..=self.opts.nodes {
            tabby::install_loopback(&self.names(index).node(&lab.dir))?;
        }
        let kubectl = Kubectl::new(&lab.dir)?;
        tabby::apply(&kubectl)?;
        self.progress.step(format!(
            "Tabby: kubectl apply -f {} (DaemonSet {}/{}, CRDs Established; tabby-api-endpoint {}:{})",
            tabby::manifest().display(),
            tabby::NAMESPACE,
            tabby::DAEMONSET,
            control_plane::address(),
            control_plane::APISERVER_PORT
        ));
        crate::up::create_pool(
            tabby::tabbyctl(&lab.bin_dir, &lab.dir.kubeconfig()),
            crate::up::PoolOptions {
                encap: crate::encap::Encap::None,
                nat_outgoing: true,
            },
        )?;
        self.progress
            .step("Tabby: IPPool created in the Kubernetes datastore");
        Ok(())
    }

    /// The DaemonSet ready on every node, every BGP session Established,
    /// and every node's proxy serving the `kubernetes` Service.
    fn tabby_converged(&mut self) -> anyhow::Result<()> {
        let kubectl = Kubectl::new(&self.lab.dir)?;
        tabby::wait_rollout(&kubectl)?;
        self.progress.step(format!(
            "Tabby: DaemonSet {} ready on every node (install-cni wrote each node's plugin and conflist)",
            tabby::DAEMONSET
        ));
        crate::up::wait_for_sessions(self.lab, &self.state);
        let kubernetes = [(Some(format!("-d {}/32", KUBERNETES_SERVICE_IP)), 443)];
        anyhow::ensure!(
            crate::programmed::wait_rules(&self.state, &kubernetes, true),
            "the agents' proxies did not program the kubernetes Service; see `{} kubectl -n {} logs ds/{}`",
            crate::up::invocation(self.lab),
            tabby::NAMESPACE,
            tabby::DAEMONSET
        );
        self.progress
            .step("Tabby: BGP full mesh Established, every proxy serves the kubernetes Service");
        Ok(())
    }

    fn reference_cni(&mut self) -> anyhow::Result<()> {
        let lab = self.lab;
        let all: Vec<(String, std::net::Ipv4Addr)> = (1..=self.opts.nodes)
            .map(|i| (reference::pod_cidr(i), names::node_address(i)))
            .collect();
        for index in 1..=self.opts.nodes {
            let n = self.names(index);
            let node = n.node(&lab.dir);
            let cidr = reference::pod_cidr(index);
            let others: Vec<_> = all.iter().filter(|(c, _)| *c != cidr).cloned().collect();
            reference::add_routes(&n.netns, &others)?;
            reference::install_cni(&node, &cidr)?;
            if let Some(k) = self.state.kube_mut().node_mut(&n.name) {
                k.pod_cidr = Some(cidr.clone());
            }
            self.save()?;
        }
        self.progress.step(format!(
            "reference CNI: ptp + host-local ({}) in every node's /opt/cni/bin, conflist {}, routes between the nodes' pod subnets",
            (1..=self.opts.nodes).map(reference::pod_cidr).collect::<Vec<_>>().join(", "),
            reference::CONFLIST
        ));
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let kubectl = Kubectl::new(&self.lab.dir)?;
        let mut seen = Vec::new();
        let ready = poll_until(NODES_TIMEOUT, Duration::from_millis(250), || {
            seen = kubectl.nodes().unwrap_or_default();
            seen.len() >= self.opts.nodes && seen.iter().all(|(_, r)| *r)
        });
        anyhow::ensure!(ready, "nodes not Ready within {NODES_TIMEOUT:?}: {seen:?}");
        self.progress
            .step(format!("every node Ready ({})", seen.len()));
        Ok(())
    }

    fn kube_proxies(&mut self) -> anyhow::Result<()> {
        let lab = self.lab;
        for index in 1..=self.opts.nodes {
            let n = self.names(index);
            let node = n.node(&lab.dir);
            let started = reference::start_kube_proxy(&node, self.state.kube_mut(), &self.pki);
            self.save()?;
            started?;
        }
        for index in 1..=self.opts.nodes {
            let n = self.names(index);
            let node = n.node(&lab.dir);
            let synced = poll_until(NODES_TIMEOUT, Duration::from_millis(200), || {
                reference::kube_proxy_synced(&node)
            });
            anyhow::ensure!(
                synced,
                "kube-proxy on {} did not program its nat table; see {}",
                n.name,
                node.root().join("kube-proxy.log").display()
            );
        }
        self.progress
            .step("kube-proxy (iptables mode) running and synced on every node");
        Ok(())
    }

    /// Waits for what pods need (the default ServiceAccount and the
    /// kube-root-ca.crt ConfigMap), then prints the summary.
    fn finish(mut self) -> anyhow::Result<()> {
        let kubectl = Kubectl::new(&self.lab.dir)?;
        let ready = poll_until(Duration::from_secs(60), Duration::from_millis(250), || {
            kubectl
                .run(&[
                    "-n",
                    "default",
                    "get",
                    "serviceaccount/default",
                    "configmap/kube-root-ca.crt",
                ])
                .is_ok()
        });
        anyhow::ensure!(ready, "the default ServiceAccount or kube-root-ca.crt never appeared: is kube-controller-manager running?");
        self.state.complete = true;
        self.save()?;
        self.progress
            .step("cluster ready: default ServiceAccount and kube-root-ca.crt in place");
        println!();
        print!("{}", kubectl.run(&["get", "nodes", "-o", "wide"])?);
        let me = crate::up::invocation(self.lab);
        println!("\nkubeconfig: {}", self.lab.dir.kubeconfig().display());
        println!(
            "next: {me} kubectl apply -f lab/examples/k8s/ | {me} status | {me} exec node-1 -- ctr -n k8s.io containers ls | {me} down"
        );
        Ok(())
    }
}
