//! The command-line flags of the control plane's components, in one place
//! for the two users: the test harness ([`super::Builder`], children tied to
//! the test process) and `tabby-lab up --kubernetes` (detached processes
//! that outlive it, in the lab's control-plane namespace).

use std::net::IpAddr;
use std::path::Path;

use super::certs::{self, Pki};
use super::SERVICE_ACCOUNT_ISSUER;

/// `host` for a URL: an IPv6 address in brackets.
pub fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// etcd, one member called `tabby`, no fsync (test data).
///
/// A reused data dir already holds the cluster: `new` is then ignored.
pub fn etcd(data_dir: &Path, client_url: &str, peer_url: &str) -> Vec<String> {
    vec![
        "--name=tabby".to_string(),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=tabby={peer_url}"),
        "--initial-cluster-state=new".to_string(),
        "--unsafe-no-fsync".to_string(),
        "--log-level=warn".to_string(),
    ]
}

/// Where and how kube-apiserver serves.
#[derive(Debug, Clone)]
pub struct Apiserver<'a> {
    /// etcd's client URL.
    pub etcd_url: &'a str,
    /// The address it listens on and advertises.
    pub bind: IpAddr,
    /// Its secure port.
    pub port: u16,
    /// Its `--cert-dir` (unused certificates it may generate).
    pub cert_dir: &'a Path,
    /// The certificates and keys.
    pub pki: &'a Pki,
    /// The service CIDR.
    pub service_cidr: &'a str,
}

/// kube-apiserver with RBAC and the Node authorizer, service-account tokens
/// signed with the PKI's RSA key.
pub fn apiserver(a: &Apiserver<'_>) -> Vec<String> {
    let file = |name: &str| a.pki.path(name).display().to_string();
    vec![
        format!("--etcd-servers={}", a.etcd_url),
        format!("--bind-address={}", a.bind),
        format!("--advertise-address={}", a.bind),
        format!("--secure-port={}", a.port),
        format!("--cert-dir={}", a.cert_dir.display()),
        format!("--tls-cert-file={}", file(certs::SERVING_CERT)),
        format!("--tls-private-key-file={}", file(certs::SERVING_KEY)),
        format!("--client-ca-file={}", file(certs::CA_CERT)),
        format!("--kubelet-certificate-authority={}", file(certs::CA_CERT)),
        format!("--service-account-key-file={}", file(certs::SA_PUB)),
        format!("--service-account-signing-key-file={}", file(certs::SA_KEY)),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-cluster-ip-range={}", a.service_cidr),
        "--authorization-mode=Node,RBAC".to_string(),
        "--allow-privileged=true".to_string(),
        "--profiling=false".to_string(),
        "--v=1".to_string(),
    ]
}

/// kube-controller-manager without node IPAM (Tabby, or the lab, hands out
/// pod addresses), signing CSRs with the CA, one ServiceAccount per
/// controller, no leader election (one instance). It serves its own
/// health endpoint on `bind` only.
pub fn controller_manager(
    kubeconfig: &Path,
    pki: &Pki,
    service_cidr: &str,
    bind: IpAddr,
) -> Vec<String> {
    let file = |name: &str| pki.path(name).display().to_string();
    let kubeconfig = kubeconfig.display();
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--controllers=*,-nodeipam".to_string(),
        "--allocate-node-cidrs=false".to_string(),
        "--leader-elect=false".to_string(),
        "--use-service-account-credentials=true".to_string(),
        format!("--root-ca-file={}", file(certs::CA_CERT)),
        format!("--service-account-private-key-file={}", file(certs::SA_KEY)),
        format!("--cluster-signing-cert-file={}", file(certs::CA_CERT)),
        format!("--cluster-signing-key-file={}", file(certs::CA_KEY)),
        format!("--service-cluster-ip-range={service_cidr}"),
        format!("--bind-address={bind}"),
        "--profiling=false".to_string(),
        "--v=1".to_string(),
    ]
}

/// kube-scheduler, one instance, its health endpoint on `bind` only.
pub fn scheduler(kubeconfig: &Path, bind: IpAddr) -> Vec<String> {
    let kubeconfig = kubeconfig.display();
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--leader-elect=false".to_string(),
        format!("--bind-address={bind}"),
        "--profiling=false".to_string(),
        "--v=1".to_string(),
    ]
}
