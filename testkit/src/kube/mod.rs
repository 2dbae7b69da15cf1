//! A real Kubernetes control plane for tests: etcd and kube-apiserver (the
//! upstream binaries that `scripts/upstream.sh` builds), with offline
//! certificates, RBAC on, and an admin kubeconfig.
//!
//! ```text
//! ControlPlane::builder()            Builder: dir, bind address, ports, service CIDR
//!   .start()?                        PKI (certs::Pki) -> etcd -> kube-apiserver -> /readyz
//! cp.kubeconfig_path() / cp.client() admin (system:masters)
//! cp.client_as(token)                a ServiceAccount token (RBAC tests)
//! cp.kubectl(&["get", "nodes"])      the upstream kubectl with the admin kubeconfig
//! cp.restart_apiserver()             same flags and port; etcd keeps the state
//! shared()                           one control plane per test binary
//! ```
//!
//! Every child is tied to the test process ([`process`]): it is killed when
//! the test binary exits, also for the [`shared`] instance, which lives in a
//! `static` and is never dropped. An owned [`ControlPlane`] stops its
//! children and removes its temporary directory on drop. With
//! [`Builder::dir`] the directory (PKI, etcd data) persists and is reused by
//! the next start: the lab's state dir.
//!
//! The components' flags live in [`args`], shared with `tabby-lab up
//! --kubernetes`, which runs the same etcd and kube-apiserver plus
//! kube-controller-manager and kube-scheduler as detached processes, with
//! the same [`certs::Pki`] (and [`certs::Pki::issue`] for its kubelets).

pub mod args;
pub mod certs;
pub mod process;

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;

pub use args::url_host;

use crate::bins::upstream_bin;
use certs::Pki;
use process::{Spec, Tied};

/// Errors of the control-plane harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}")]
    Io {
        /// The path.
        path: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key could not be made.
    #[error("making the control plane's PKI: {0}")]
    Pki(String),
    /// A child process could not be started.
    #[error("starting {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A component exited while starting.
    #[error("{component} exited with {status} while starting; its log ends with:\n{log}")]
    Exited {
        /// etcd or kube-apiserver.
        component: &'static str,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// `/readyz` did not answer `ok` in time.
    #[error("kube-apiserver not ready after {waited:?} (last answer: {last}); its log ends with:\n{log}")]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// The last answer or error of `/readyz`.
        last: String,
        /// The end of the apiserver's log.
        log: String,
    },
    /// The Kubernetes client could not be built.
    #[error("building a Kubernetes client")]
    Client(#[source] kube::Error),
    /// kubectl failed.
    #[error("kubectl {args} failed: {stderr}")]
    Kubectl {
        /// Its arguments.
        args: String,
        /// Its stderr.
        stderr: String,
    },
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Result alias of the harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The issuer of ServiceAccount tokens (and their audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";
/// The default service CIDR.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The first address of [`SERVICE_CIDR`]: the `kubernetes` Service.
pub const FIRST_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const TEMP_PREFIX: &str = "tabby-cp-";

/// How to start a control plane. `ControlPlane::builder().start()` gives
/// temporary state on 127.0.0.1 and free ports.
#[derive(Debug, Clone)]
pub struct Builder {
    dir: Option<PathBuf>,
    bind: IpAddr,
    etcd_port: Option<u16>,
    etcd_peer_port: Option<u16>,
    apiserver_port: Option<u16>,
    service_cidr: String,
    first_service_ip: IpAddr,
    ready_timeout: Duration,
    extra_apiserver_args: Vec<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            dir: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            etcd_port: None,
            etcd_peer_port: None,
            apiserver_port: None,
            service_cidr: SERVICE_CIDR.to_string(),
            first_service_ip: IpAddr::V4(FIRST_SERVICE_IP),
            ready_timeout: Duration::from_secs(90),
            extra_apiserver_args: Vec::new(),
        }
    }
}

impl Builder {
    /// Keeps the state (PKI, etcd data, logs, kubeconfig) in `dir`, reused by
    /// the next start and not removed on drop.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// The address etcd and the apiserver listen on (and the apiserver
    /// advertises); 127.0.0.1 by default.
    pub fn bind_address(mut self, ip: IpAddr) -> Self {
        self.bind = ip;
        self
    }

    /// etcd's client and peer ports (free ports by default).
    pub fn etcd_ports(mut self, client: u16, peer: u16) -> Self {
        self.etcd_port = Some(client);
        self.etcd_peer_port = Some(peer);
        self
    }

    /// The apiserver's secure port (a free port by default).
    pub fn apiserver_port(mut self, port: u16) -> Self {
        self.apiserver_port = Some(port);
        self
    }

    /// The service CIDR and its first address (the `kubernetes` Service).
    pub fn service_cidr(mut self, cidr: &str, first_ip: IpAddr) -> Self {
        self.service_cidr = cidr.to_string();
        self.first_service_ip = first_ip;
        self
    }

    /// How long to wait for `/readyz` (90 s by default: two shared cores).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// More kube-apiserver flags (`--feature-gates=...`).
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_apiserver_args.push(arg.into());
        self
    }

    /// Starts etcd and kube-apiserver and waits until `/readyz` says `ok`.
    pub fn start(self) -> Result<ControlPlane> {
        let fixed_ports = self.apiserver_port.is_some() || self.etcd_port.is_some();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.start_once() {
                // Another process took a port between our probe and the bind.
                Err(e)
                    if !fixed_ports
                        && attempt < 3
                        && e.to_string().contains("address already in use") =>
                {
                    eprintln!("control plane: a port was taken, retrying ({e})");
                }
                other => return other,
            }
        }
    }

    fn start_once(&self) -> Result<ControlPlane> {
        let started = Instant::now();
        let (dir, temporary) = match &self.dir {
            Some(dir) => (dir.clone(), false),
            None => {
                sweep_stale_temp_dirs();
                (fresh_temp_dir()?, true)
            }
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let pki = Pki::load_or_create(&dir.join("pki"), &[self.bind, self.first_service_ip])?;
        let etcd_port = self.etcd_port.map_or_else(|| free_port(self.bind), Ok)?;
        let peer_port = self
            .etcd_peer_port
            .map_or_else(|| free_port(self.bind), Ok)?;
        let port = self
            .apiserver_port
            .map_or_else(|| free_port(self.bind), Ok)?;
        let host = url_host(self.bind);
        let etcd_url = format!("http://{host}:{etcd_port}");

        let etcd = Tied::spawn(self.etcd_spec(&dir, &etcd_url, peer_port))?;
        let apiserver_spec = self.apiserver_spec(&dir, &pki, &etcd_url, port);
        let apiserver = Tied::spawn(apiserver_spec)?;
        let cp = ControlPlane {
            url: format!("https://{host}:{port}"),
            etcd_url,
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            temporary,
            pki,
            etcd: Mutex::new(etcd),
            apiserver: Mutex::new(apiserver),
            ready_timeout: self.ready_timeout,
            ready_in: Duration::ZERO,
        };
        cp.write_kubeconfig()?;
        let mut cp = cp;
        cp.wait_ready(started)?;
        cp.ready_in = started.elapsed();
        Ok(cp)
    }

    fn etcd_spec(&self, dir: &Path, client_url: &str, peer_port: u16) -> Spec {
        let peer_url = format!("http://{}:{peer_port}", url_host(self.bind));
        let args = args::etcd(&dir.join("etcd"), client_url, &peer_url);
        Spec {
            program: upstream_bin("etcd"),
            args: args.into_iter().map(OsString::from).collect(),
            log: dir.join("etcd.log"),
            death_signal: "KILL",
        }
    }

    fn apiserver_spec(&self, dir: &Path, pki: &Pki, etcd_url: &str, port: u16) -> Spec {
        let mut args = args::apiserver(&args::Apiserver {
            etcd_url,
            bind: self.bind,
            port,
            cert_dir: &dir.join("apiserver"),
            pki,
            service_cidr: &self.service_cidr,
        });
        args.extend(self.extra_apiserver_args.iter().cloned());
        Spec {
            program: upstream_bin("kube-apiserver"),
            args: args.into_iter().map(OsString::from).collect(),
            log: dir.join("apiserver.log"),
            death_signal: "KILL",
        }
    }
}

/// A running etcd + kube-apiserver.
#[derive(Debug)]
pub struct ControlPlane {
    url: String,
    etcd_url: String,
    kubeconfig: PathBuf,
    dir: PathBuf,
    temporary: bool,
    pki: Pki,
    etcd: Mutex<Tied>,
    apiserver: Mutex<Tied>,
    ready_timeout: Duration,
    ready_in: Duration,
}

impl ControlPlane {
    /// How to start one.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Starts one with temporary state on 127.0.0.1 and free ports.
    pub fn start() -> Result<Self> {
        Builder::default().start()
    }

    /// The apiserver's URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// etcd's client URL.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The state directory (PKI, etcd data, logs, kubeconfig).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificates and keys.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The admin kubeconfig (certificates embedded, so it can be copied).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// From the start to the first `ok` of `/readyz`.
    pub fn ready_in(&self) -> Duration {
        self.ready_in
    }

    /// A client config with the admin certificate (`system:masters`).
    pub fn admin_config(&self) -> kube::Config {
        let mut config = self.base_config();
        config.auth_info.client_certificate_data = Some(b64(&self.pki.admin_cert_pem));
        config.auth_info.client_key_data = Some(b64(&self.pki.admin_key_pem).into());
        config
    }

    /// A client config that authenticates with a bearer token (a
    /// ServiceAccount's, from the TokenRequest API).
    pub fn token_config(&self, token: &str) -> kube::Config {
        let mut config = self.base_config();
        config.auth_info.token = Some(token.to_string().into());
        config
    }

    fn base_config(&self) -> kube::Config {
        let url = self.url.parse().expect("the apiserver URL is valid");
        let mut config = kube::Config::new(url);
        config.root_cert = Some(vec![pem_to_der(&self.pki.ca_pem)]);
        config.connect_timeout = Some(Duration::from_secs(5));
        config
    }

    /// An admin client. Call it inside a tokio runtime: the client's
    /// background task lives on the runtime it was made on.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.admin_config()).expect("build the admin client")
    }

    /// A client that authenticates with `token`. Call it inside a tokio runtime.
    pub fn client_as(&self, token: &str) -> kube::Client {
        kube::Client::try_from(self.token_config(token)).expect("build a token client")
    }

    /// Writes a kubeconfig for `token` (what install-cni gives the plugin).
    pub fn write_token_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let user = format!("    token: {token}\n");
        write_kubeconfig(path, &self.url, &self.pki.ca_pem, &user)
    }

    fn write_kubeconfig(&self) -> Result<()> {
        write_cert_kubeconfig(
            &self.kubeconfig,
            &self.url,
            &self.pki.ca_pem,
            &self.pki.admin_cert_pem,
            &self.pki.admin_key_pem,
        )
    }

    /// Runs the upstream kubectl with the admin kubeconfig; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(upstream_bin("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .map_err(|e| Error::Spawn {
                program: "kubectl".into(),
                source: e,
            })?;
        if !out.status.success() {
            return Err(Error::Kubectl {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the apiserver and starts it again with the same flags and port
    /// (etcd keeps running); returns the time until it is ready again.
    /// Watches break and must resume. On [`shared`] this disturbs every
    /// other test of the binary: use an own control plane for it.
    pub fn restart_apiserver(&self) -> Result<Duration> {
        let started = Instant::now();
        {
            let mut apiserver = self.apiserver.lock().unwrap_or_else(|e| e.into_inner());
            apiserver.stop(Duration::from_secs(10));
            let spec = apiserver.spec().clone();
            *apiserver = Tied::spawn(spec)?;
        }
        self.wait_ready(started)?;
        Ok(started.elapsed())
    }

    /// Polls `/readyz` until it says `ok`, failing early when a component exits.
    fn wait_ready(&self, started: Instant) -> Result<()> {
        let config = self.admin_config();
        let deadline = started + self.ready_timeout;
        // A private runtime on its own thread: works whether or not the
        // caller is inside a tokio runtime.
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io(Path::new("tokio runtime"), e))?;
                rt.block_on(self.poll_readyz(config, started, deadline))
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Pki("the readiness thread panicked".into())))
        })
    }

    async fn poll_readyz(
        &self,
        config: kube::Config,
        started: Instant,
        deadline: Instant,
    ) -> Result<()> {
        let client = kube::Client::try_from(config).map_err(Error::Client)?;
        loop {
            self.check_alive()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a valid request");
            let last =
                match tokio::time::timeout(Duration::from_secs(5), client.request_text(request))
                    .await
                {
                    Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
                    Ok(Ok(body)) => body,
                    Ok(Err(e)) => crate::error_chain(&e),
                    Err(_) => "timed out".into(),
                };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    waited: started.elapsed(),
                    last,
                    log: self.lock_apiserver().log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn lock_apiserver(&self) -> std::sync::MutexGuard<'_, Tied> {
        self.apiserver.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_alive(&self) -> Result<()> {
        for (component, proc) in [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)] {
            let mut proc = proc.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(status) = proc.exited() {
                return Err(Error::Exited {
                    component,
                    status: status.to_string(),
                    log: proc.log_tail(30),
                });
            }
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.lock_apiserver().stop(Duration::from_secs(5));
        self.etcd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop(Duration::from_secs(5));
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The control plane shared by every test of this test binary, started on
/// first use. Tests isolate themselves by namespace or unique names; none
/// may restart or stop it. It dies with the test process.
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<std::result::Result<ControlPlane, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        let cp = ControlPlane::start().map_err(|e| crate::error_chain(&e))?;
        process::remove_at_exit(cp.dir()).map_err(|e| crate::error_chain(&e))?;
        eprintln!(
            "shared control plane at {} ready in {:?} (state in {})",
            cp.url(),
            cp.ready_in(),
            cp.dir().display()
        );
        Ok(cp)
    });
    match started {
        Ok(cp) => cp,
        Err(e) => panic!("the shared Kubernetes control plane did not start: {e}"),
    }
}

/// Writes a kubeconfig for `url` that trusts `ca_pem` and authenticates
/// with a client certificate (everything embedded, file mode 0600).
pub fn write_cert_kubeconfig(
    path: &Path,
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<()> {
    let user = format!(
        "    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(cert_pem),
        b64(key_pem)
    );
    write_kubeconfig(path, url, ca_pem, &user)
}

fn write_kubeconfig(path: &Path, url: &str, ca_pem: &str, user: &str) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: tabby\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: tabby\n  user:\n{user}contexts:\n- name: tabby\n  context:\n    cluster: tabby\n    user: tabby\ncurrent-context: tabby\n",
        ca = b64(ca_pem),
    );
    certs::write_private(path, text.as_bytes())
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The DER bytes of the first PEM block in `pem`.
fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("the CA file is PEM")
}

/// A port nobody listens on right now.
fn free_port(ip: IpAddr) -> Result<u16> {
    let listener =
        TcpListener::bind((ip, 0)).map_err(|e| Error::io(Path::new("bind a free port"), e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io(Path::new("bind a free port"), e))
}

fn fresh_temp_dir() -> Result<PathBuf> {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{TEMP_PREFIX}{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Removes temporary control-plane dirs whose process is gone (left by a
/// test binary that was killed before its cleanup ran).
fn sweep_stale_temp_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
