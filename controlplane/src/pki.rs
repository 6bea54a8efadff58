//! The cluster's certificates: a CA made on first start, the API server's serving certificate,
//! client certificates for each component, and kubeconfigs that carry them.
//!
//! Layout under the state directory: `pki/ca.{crt,key}`, `pki/apiserver.{crt,key}`, and
//! `<identity>.kubeconfig` for `admin` (system:masters), `kube-proxy`, `controller-manager`,
//! `scheduler` and `node-<name>` (system:nodes).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tracing::info;

pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    pub cert_pem: String,
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

impl Ca {
    /// Loads the CA of `dir`, making one on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca> {
        let pki = dir.join("pki");
        crate::files::private_dir(&pki)?;
        let (crt, key) = (pki.join("ca.crt"), pki.join("ca.key"));
        if crt.exists() && key.exists() {
            let cert_pem = std::fs::read_to_string(&crt)?;
            let key = KeyPair::from_pem(&std::fs::read_to_string(&key)?)
                .with_context(|| format!("{} is not a private key", key.display()))?;
            let params = CertificateParams::from_ca_cert_pem(&cert_pem)
                .with_context(|| format!("{} is not a CA certificate", crt.display()))?;
            let cert = params.self_signed(&key)?;
            return Ok(Ca {
                cert,
                key,
                cert_pem,
            });
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ferry-ca");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        std::fs::write(&crt, &cert_pem)?;
        write_private(&pki.join("ca.key"), &key.serialize_pem())?;
        info!(path = %crt.display(), "cluster CA created");
        Ok(Ca {
            cert,
            key,
            cert_pem,
        })
    }

    /// A serving certificate for the API server, for `names` (DNS names and IPs).
    pub fn serving_cert(&self, names: &[String]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry-apiserver");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate: user `cn`, groups `orgs` (Kubernetes reads O as groups).
    pub fn client_cert(&self, cn: &str, orgs: &[&str]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A kubeconfig for `server` authenticating with a client certificate.
pub fn kubeconfig(ca_pem: &str, server: &str, user: &str, cert_pem: &str, key_pem: &str) -> String {
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ferry
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {user}@ferry
  context:
    cluster: ferry
    user: {user}
    namespace: default
current-context: {user}@ferry
",
        ca = b(ca_pem),
        cert = b(cert_pem),
        key = b(key_pem),
    )
}

/// The component identities with a kubeconfig each: (file stem, user, groups).
pub const IDENTITIES: &[(&str, &str, &[&str])] = &[
    ("admin", "kubernetes-admin", &["system:masters"]),
    ("kube-proxy", "system:kube-proxy", &[]),
    ("controller-manager", "system:kube-controller-manager", &[]),
    ("scheduler", "system:kube-scheduler", &[]),
];

/// Everything the server needs to start: (serving cert, serving key, CA pem), writing the
/// kubeconfigs that are missing.
pub fn ensure(dir: &Path, server: &str, names: &[String], nodes: &[String]) -> Result<Pki> {
    let ca = Ca::load_or_create(dir)?;
    let pki = dir.join("pki");
    let (crt, key) = (pki.join("apiserver.crt"), pki.join("apiserver.key"));
    // The serving certificate is remade each start: the names may have changed.
    let (cert_pem, key_pem) = ca.serving_cert(names)?;
    std::fs::write(&crt, &cert_pem)?;
    write_private(&key, &key_pem)?;
    let mut written = Vec::new();
    let mut ids: Vec<(String, String, Vec<&str>)> = IDENTITIES
        .iter()
        .map(|(f, u, g)| (f.to_string(), u.to_string(), g.to_vec()))
        .collect();
    for n in nodes {
        ids.push((
            format!("node-{n}"),
            format!("system:node:{n}"),
            vec!["system:nodes"],
        ));
    }
    for (file, user, groups) in ids {
        let path = dir.join(format!("{file}.kubeconfig"));
        if !path.exists() {
            let (c, k) = ca.client_cert(&user, &groups)?;
            write_private(&path, &kubeconfig(&ca.cert_pem, server, &user, &c, &k))?;
            written.push(path.clone());
        }
    }
    let (sa_key_pem, sa_public_pem) = service_account_key(&pki)?;
    // The identity kubelets let in (as kubeadm's apiserver-kubelet-client), remade each start.
    let (kubelet_client_cert_pem, kubelet_client_key_pem) =
        ca.client_cert("kube-apiserver-kubelet-client", &["system:masters"])?;
    Ok(Pki {
        kubelet_client_cert_pem,
        kubelet_client_key_pem,
        cert_pem,
        key_pem,
        ca_pem: ca.cert_pem.clone(),
        sa_key_pem,
        sa_public_pem,
        written,
    })
}

/// The key service account tokens are signed with (`pki/sa.key`, P-256, made on first start
/// and kept: tokens issued before a restart stay valid): private and public PEM.
fn service_account_key(pki: &Path) -> Result<(String, String)> {
    let path = pki.join("sa.key");
    let key = if path.exists() {
        KeyPair::from_pem(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not a private key", path.display()))?
    } else {
        let key = KeyPair::generate()?;
        write_private(&path, &key.serialize_pem())?;
        info!(path = %path.display(), "service account signing key created");
        key
    };
    Ok((key.serialize_pem(), key.public_key_pem()))
}

pub struct Pki {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// The service account token signing key (PKCS#8) and its public key, PEM.
    pub sa_key_pem: String,
    pub sa_public_pem: String,
    /// The API server's client certificate toward kubelets, PEM.
    pub kubelet_client_cert_pem: String,
    pub kubelet_client_key_pem: String,
    pub written: Vec<PathBuf>,
}
