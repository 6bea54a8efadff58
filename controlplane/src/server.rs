//! HTTPS (rustls) with optional client certificates: each connection's verified certificate
//! becomes the user of its requests; requests without one must carry a bearer token.
//!
//! Connections are bounded as a hostile client would test them: a TLS handshake and the first
//! request must come within seconds, an idle connection is closed, and one client address (and
//! all clients together) may hold only so many connections.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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

/// What one client may make the server hold at the connection level.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A new connection must send its first request within this (as a header-read timeout).
    pub first_request_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections from one client address.
    pub max_per_client: usize,
    /// Open connections in all (also kept below the process's file descriptor limit).
    pub max_total: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_per_client: 2000,
            max_total: 10000,
        }
    }
}

/// Raises the soft file descriptor limit to the hard one (as Go programs such as
/// kube-apiserver do) and returns it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Open connections, per client address and in all.
#[derive(Default)]
struct Conns {
    per_client: HashMap<IpAddr, usize>,
    total: usize,
}

/// One accepted connection's place in [`Conns`], given back when the connection ends.
struct ConnSlot {
    conns: Arc<Mutex<Conns>>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.conns.lock().unwrap();
        c.total -= 1;
        if let Some(n) = c.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.ip);
            }
        }
    }
}

fn take_slot(conns: &Arc<Mutex<Conns>>, ip: IpAddr, limits: &ConnLimits) -> Option<ConnSlot> {
    let mut c = conns.lock().unwrap();
    let mine = c.per_client.get(&ip).copied().unwrap_or(0);
    if mine >= limits.max_per_client || c.total >= limits.max_total {
        return None;
    }
    c.total += 1;
    *c.per_client.entry(ip).or_default() += 1;
    Some(ConnSlot {
        conns: conns.clone(),
        ip,
    })
}

pub async fn serve(
    api: Arc<Api>,
    listener: TcpListener,
    pki: &Pki,
    mut limits: ConnLimits,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(pki)?));
    // Keep descriptors for the store, its log and outgoing connections (kubelet logs).
    let nofile = raise_nofile();
    limits.max_total = limits
        .max_total
        .min(nofile.saturating_sub(256).max(16) as usize);
    info!(addr = %listener.local_addr()?, max_connections = limits.max_total,
          max_per_client = limits.max_per_client, "API server listening (HTTPS)");
    let conns = Arc::new(Mutex::new(Conns::default()));
    let limits = Arc::new(limits);
    let mut backoff = Duration::from_millis(5);
    loop {
        // A failed accept (a client that reset before it was accepted, out of file
        // descriptors) must not end the server: log it, back off, go on.
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => {
                backoff = Duration::from_millis(5);
                c
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(slot) = take_slot(&conns, remote.ip(), &limits) else {
            debug!(%remote, "connection refused: too many open connections");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let api = api.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            connection(api, acceptor, tcp, remote, &limits).await;
            drop(slot);
        });
    }
}

/// Requests in flight on one connection (a response counts until its body is done) and when
/// the last one started: what the idle timeout looks at.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last_request: Mutex<Option<Instant>>,
}

/// A response body that counts as in flight until it is finished or dropped.
struct Tracked {
    inner: Body,
    activity: Arc<Activity>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        *self.activity.last_request.lock().unwrap() = Some(Instant::now());
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn connection(
    api: Arc<Api>,
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    limits: &ConnLimits,
) {
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%remote, "TLS handshake timed out");
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
    let activity = Arc::new(Activity::default());
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let api = api.clone();
        let peer = peer.clone();
        let activity = act.clone();
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        *activity.last_request.lock().unwrap() = Some(Instant::now());
        async move {
            let resp = handle(api, peer, req.map(Body::new)).await;
            Ok::<_, Infallible>(resp.map(|inner| Body::new(Tracked { inner, activity })))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.first_request_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(250)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let opened = Instant::now();
    let check = (limits.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%remote, error = %e, "connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(check), if !closing => {
                if activity.in_flight.load(Ordering::Relaxed) > 0 {
                    continue;
                }
                let (since, limit) = match *activity.last_request.lock().unwrap() {
                    None => (opened.elapsed(), limits.first_request_timeout),
                    Some(t) => (t.elapsed(), limits.idle_timeout),
                };
                if since >= limit {
                    debug!(%remote, idle_ms = since.as_millis() as u64, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
