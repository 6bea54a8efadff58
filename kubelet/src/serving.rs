//! The kubelet's port (:10250) over TLS, open only to the API server: a client must present a
//! certificate of the cluster CA (`--client-ca-file`, by default the CA of the kubeconfig) whose
//! user is `kube-apiserver-kubelet-client` or in group `system:masters`; anyone else gets 403
//! for every request (kubelet's x509 authentication; its authorization is simplified to that
//! one identity, which is what reaches it through the API server's `pods/log`, `exec`, `attach`
//! and `portforward`). The serving certificate is `--tls-cert-file`/`--tls-private-key-file`,
//! or one the kubelet makes for itself under `<data-dir>/pki` (as the kubelet does without
//! them; the API server does not verify it, as kube-apiserver without
//! `--kubelet-certificate-authority`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;

/// The users that may use the kubelet's port.
pub const API_SERVER_USER: &str = "kube-apiserver-kubelet-client";
const MASTERS: &str = "system:masters";

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The serving certificate and key (PEM): the given files, or a self-signed pair made once
/// under `pki_dir` for the node's name and address.
pub fn serving_pair(
    files: Option<(&Path, &Path)>,
    pki_dir: &Path,
    names: &[String],
) -> Result<(String, String)> {
    if let Some((crt, key)) = files {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        return Ok((read(crt)?, read(key)?));
    }
    let (crt, key) = (pki_dir.join("kubelet.crt"), pki_dir.join("kubelet.key"));
    if let (Ok(c), Ok(k)) = (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
        return Ok((c, k));
    }
    std::fs::create_dir_all(pki_dir).with_context(|| format!("creating {}", pki_dir.display()))?;
    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .context("making the kubelet's serving certificate")?;
    let (c, k) = (made.cert.pem(), made.key_pair.serialize_pem());
    std::fs::write(&crt, &c).with_context(|| format!("writing {}", crt.display()))?;
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| format!("writing {}", key.display()))?;
        f.write_all(k.as_bytes())?;
    }
    tracing::info!(path = %crt.display(), "kubelet serving certificate created (self-signed)");
    Ok((c, k))
}

/// The TLS configuration: the serving pair, client certificates required from `client_cas`.
pub fn tls_config(
    cert_pem: &str,
    key_pem: &str,
    client_cas: &[Vec<u8>],
) -> Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("the serving certificate")?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("the serving key")?
        .context("no private key in the serving key file")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in client_cas {
        roots
            .add(CertificateDer::from(ca.clone()))
            .context("a client CA certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "no client CA: give --client-ca-file");
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .context("the client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("the serving certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The user (CN) and groups (O) of a client certificate.
fn subject(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let s = cert.subject();
    let cn = s.iter_common_name().next()?.as_str().ok()?.to_string();
    let orgs = s
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    Some((cn, orgs))
}

/// Whether the verified client may use the kubelet's port.
fn allowed(user: &str, groups: &[String]) -> bool {
    user == API_SERVER_USER || groups.iter().any(|g| g == MASTERS)
}

/// Serves `app` on `listener` over TLS until the listener fails; each connection may carry
/// upgrades (exec, attach, port-forward streams).
pub async fn serve(listener: TcpListener, app: Router, tls: rustls::ServerConfig) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accepting on the kubelet's port: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => return,
            };
            let who = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| subject(c));
            let app = match &who {
                Some((user, groups)) if allowed(user, groups) => app,
                _ => {
                    let user = who.map(|w| w.0).unwrap_or_default();
                    tracing::warn!(%remote, user, "refused a client of the kubelet's port");
                    let msg = format!("Forbidden (user={user}): only the API server ({API_SERVER_USER}) may use the kubelet's port");
                    Router::new().fallback(move || {
                        let msg = msg.clone();
                        async move { (axum::http::StatusCode::FORBIDDEN, msg) }
                    })
                }
            };
            let svc = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%remote, "kubelet connection ended: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_api_server_identity_or_masters_may_connect() {
        assert!(allowed(API_SERVER_USER, &[]));
        assert!(allowed("admin", &[MASTERS.into()]));
        assert!(!allowed("system:node:n1", &["system:nodes".into()]));
        assert!(!allowed("system:serviceaccount:default:default", &[]));
    }
}
