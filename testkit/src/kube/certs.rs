//! The control plane's PKI, made offline: one CA, the apiserver's serving
//! certificate, an admin client certificate (`system:masters`) and the
//! service-account signing key pair.
//!
//! Everything is written as PEM files into the control plane's directory
//! and read back from there on a restart with the same directory, so a
//! kubeconfig written once stays valid.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

use super::{Error, Result};

/// The PEM files of one control plane.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The directory holding them.
    pub dir: PathBuf,
    /// The CA certificate (PEM), trusted for serving and client certificates.
    pub ca_pem: String,
    /// The admin client certificate (PEM), CN `tabby-admin`, O `system:masters`.
    pub admin_cert_pem: String,
    /// The admin client key (PKCS#8 PEM).
    pub admin_key_pem: String,
}

/// File names inside the PKI directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA's key (kube-controller-manager signs CSRs with it).
pub const CA_KEY: &str = "ca.key";
/// The apiserver's serving certificate.
pub const SERVING_CERT: &str = "apiserver.crt";
/// The apiserver's serving key.
pub const SERVING_KEY: &str = "apiserver.key";
const ADMIN_CERT: &str = "admin.crt";
const ADMIN_KEY: &str = "admin.key";
/// The service-account signing key (RSA, PKCS#8).
pub const SA_KEY: &str = "sa.key";
/// The service-account verification key (RSA public key, SPKI).
pub const SA_PUB: &str = "sa.pub";

const ALL: [&str; 8] = [
    CA_CERT,
    CA_KEY,
    SERVING_CERT,
    SERVING_KEY,
    ADMIN_CERT,
    ADMIN_KEY,
    SA_KEY,
    SA_PUB,
];

impl Pki {
    /// Loads the PKI in `dir`, or makes a fresh one there when any file is
    /// missing. `ips` are the serving certificate's IP SANs (the bind
    /// address and the first service IP).
    pub fn load_or_create(dir: &Path, ips: &[IpAddr]) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if !ALL.iter().all(|f| dir.join(f).exists()) {
            create(dir, ips)?;
        }
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|e| Error::io(&path, e))
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            ca_pem: read(CA_CERT)?,
            admin_cert_pem: read(ADMIN_CERT)?,
            admin_key_pem: read(ADMIN_KEY)?,
        })
    }

    /// The path of one PKI file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Issues a certificate signed by this PKI's CA (a kubelet's, a
    /// controller's), with a fresh key.
    pub fn issue(&self, request: &CertRequest<'_>) -> Result<IssuedCert> {
        let ca_key_path = self.path(CA_KEY);
        let ca_key_pem =
            fs::read_to_string(&ca_key_path).map_err(|e| Error::io(&ca_key_path, e))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| pki_error("CA key", e))?;
        let issuer = Issuer::new(ca_params()?, &ca_key);
        let mut params = CertificateParams::new(request.dns_names.to_vec())
            .map_err(|e| pki_error(request.common_name, e))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, request.common_name);
        for org in request.organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        params
            .subject_alt_names
            .extend(request.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = Vec::new();
        if request.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if request.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(|e| pki_error("key", e))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| pki_error(request.common_name, e))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// [`Pki::issue`], written as `<dir>/<name>.crt` and `<dir>/<name>.key`
    /// (readable by the owner only) unless both exist already.
    pub fn issue_files(
        &self,
        request: &CertRequest<'_>,
        dir: &Path,
        name: &str,
    ) -> Result<IssuedCert> {
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        if let (Ok(cert_pem), Ok(key_pem)) = (
            fs::read_to_string(&cert_path),
            fs::read_to_string(&key_path),
        ) {
            return Ok(IssuedCert { cert_pem, key_pem });
        }
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let issued = self.issue(request)?;
        write_private(&cert_path, issued.cert_pem.as_bytes())?;
        write_private(&key_path, issued.key_pem.as_bytes())?;
        Ok(issued)
    }
}

/// What [`Pki::issue`] puts into a certificate.
#[derive(Debug, Clone, Default)]
pub struct CertRequest<'a> {
    /// The subject's CN: the Kubernetes user name of a client certificate.
    pub common_name: &'a str,
    /// The subject's O entries: the user's groups.
    pub organizations: &'a [&'a str],
    /// DNS SANs (serving certificates).
    pub dns_names: &'a [String],
    /// IP SANs (serving certificates).
    pub ips: &'a [IpAddr],
    /// For TLS client authentication.
    pub client: bool,
    /// For TLS server authentication.
    pub server: bool,
}

/// A certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

fn pki_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Pki(format!("{what}: {e}"))
}

/// The CA's parameters: the same every time, so that an issuer rebuilt
/// from them and the CA key signs certificates the CA certificate verifies.
fn ca_params() -> Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_error("CA", e))?;
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "tabby-test-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// Makes every key and certificate and writes them into `dir`.
fn create(dir: &Path, ips: &[IpAddr]) -> Result<()> {
    let ca_key = KeyPair::generate().map_err(|e| pki_error("CA key", e))?;
    let ca = ca_params()?;
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| pki_error("CA", e))?;
    let issuer = Issuer::new(ca, &ca_key);

    let mut names: Vec<String> = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .map(String::from)
    .to_vec();
    names.sort();
    let mut serving = CertificateParams::new(names).map_err(|e| pki_error("serving", e))?;
    serving.distinguished_name = rcgen::DistinguishedName::new();
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let serving_key = KeyPair::generate().map_err(|e| pki_error("serving key", e))?;
    let serving_cert = serving
        .signed_by(&serving_key, &issuer)
        .map_err(|e| pki_error("serving", e))?;

    let mut admin =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_error("admin", e))?;
    admin.distinguished_name = rcgen::DistinguishedName::new();
    admin
        .distinguished_name
        .push(DnType::CommonName, "tabby-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let admin_key = KeyPair::generate().map_err(|e| pki_error("admin key", e))?;
    let admin_cert = admin
        .signed_by(&admin_key, &issuer)
        .map_err(|e| pki_error("admin", e))?;

    let sa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)
        .map_err(|e| pki_error("service-account key", e))?;
    let sa_key = sa
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| pki_error("service-account key", e))?;
    let sa_pub = sa
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| pki_error("service-account public key", e))?;

    let files = [
        (CA_CERT, ca_cert.pem()),
        (CA_KEY, ca_key.serialize_pem()),
        (SERVING_CERT, serving_cert.pem()),
        (SERVING_KEY, serving_key.serialize_pem()),
        (ADMIN_CERT, admin_cert.pem()),
        (ADMIN_KEY, admin_key.serialize_pem()),
        (SA_KEY, sa_key.to_string()),
        (SA_PUB, sa_pub),
    ];
    for (name, pem) in files {
        write_private(&dir.join(name), pem.as_bytes())?;
    }
    Ok(())
}

/// Writes a file readable by its owner only.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.write_all(data).map_err(|e| Error::io(path, e))
}
