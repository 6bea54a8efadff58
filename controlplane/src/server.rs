//! HTTPS (rustls) with optional client certificates: each connection's verified certificate
//! becomes the user of its requests; requests without one must carry a bearer token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::api::{auth::user_from_cert, handle, Api, Peer};
use crate::pki::Pki;

fn tls_config(pki: &Pki) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = rustls_pemfile::certs(&mut pki.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("serving certificate")?;
    let key = rustls_pemfile::private_key(&mut pki.key_pem.as_bytes())
        .context("serving key")?
        .context("no private key in the serving key file")?;
    let mut roots = RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut pki.ca_pem.as_bytes()) {
        roots.add(ca.context("CA certificate")?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

pub async fn serve(api: Arc<Api>, listener: TcpListener, pki: &Pki) -> Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(pki)?));
    info!(addr = %listener.local_addr()?, "API server listening (HTTPS)");
    loop {
        // A failed accept (a client that reset before it was accepted, out of file
        // descriptors) must not end the server: log it, breathe, go on.
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let api = api.clone();
        tokio::spawn(async move { connection(api, acceptor, tcp, remote).await });
    }
}

async fn connection(
    api: Arc<Api>,
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
) {
    let tls = match acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(e) => {
            debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
    };
    let user = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| user_from_cert(c.as_ref()));
    let peer = Peer(user);
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let api = api.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(handle(api, peer, req.map(Body::new)).await) }
    });
    if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), svc)
        .await
    {
        debug!(%remote, error = %e, "connection ended");
    }
}
