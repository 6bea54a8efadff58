//! Proxying a connection upgrade (`kubectl exec`, `attach`, `port-forward`: WebSocket or
//! SPDY/3.1): the request is sent on to the next hop with the headers that negotiate the
//! protocol, and when that hop switches protocols (101) both connections are spliced, byte for
//! byte, until either side closes or nothing moves for the idle timeout. The API server uses it
//! toward the kubelet, the kubelet toward the runtime's streaming server, so whichever protocol
//! and version the client and the runtime agree on passes through unchanged (as the kubelet's
//! own streaming proxy does).

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// The request headers that negotiate the upgrade and its subprotocol, passed on.
const NEGOTIATION: &[&str] = &[
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// The next hop's answer: its status, the headers to give the client, and (when it did not
/// switch protocols) its body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Whether a request asks to switch protocols.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .split(',')
                .any(|t| t.trim() == "upgrade")
        })
        && headers.contains_key(header::UPGRADE)
}

/// What the next hop did with an upgrade request.
pub enum Opened {
    /// It switched protocols: the connection, now the new protocol's, and the 101's headers.
    Switched {
        io: hyper::upgrade::Upgraded,
        headers: HeaderMap,
    },
    /// It did not: its answer.
    Refused(Answer),
}

/// Sends `method path_and_query` with `headers` (those that negotiate the upgrade) over `io`,
/// a connection to `authority`, and returns the switched connection or the refusal.
pub async fn open<IO>(
    io: IO,
    authority: &str,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<Opened>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake with the next hop")?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection of an upgrade ended");
        }
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(header::HOST, authority);
    for (k, v) in headers {
        req = req.header(k, v.clone());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .context("building the upstream request")?;
    let mut resp: Response<hyper::body::Incoming> = send
        .send_request(req)
        .await
        .context("sending the upgrade request")?;
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if k == header::CONTENT_LENGTH || k == header::TRANSFER_ENCODING {
            continue;
        }
        headers.append(k.clone(), v.clone());
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // Bounded: an error answer, not a stream.
        let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body = body.slice(..body.len().min(64 << 10));
        return Ok(Opened::Refused(Answer {
            status,
            headers,
            body,
        }));
    }
    let io = hyper::upgrade::on(&mut resp)
        .await
        .context("the next hop's switched connection")?;
    Ok(Opened::Switched { io, headers })
}

/// Sends `method path_and_query` with the client's negotiation headers over `io` (a connection
/// to `authority`); on 101 splices `client` (the incoming request's pending upgrade) with the
/// upstream connection in a task of its own, which ends when either side closes or after
/// `idle` without a byte either way.
pub async fn proxy<IO>(
    io: IO,
    authority: &str,
    method: Method,
    path_and_query: &str,
    client_headers: &HeaderMap,
    client: OnUpgrade,
    idle: Duration,
) -> Result<Answer>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut negotiation = HeaderMap::new();
    for name in NEGOTIATION {
        for v in client_headers.get_all(*name) {
            negotiation.append(*name, v.clone());
        }
    }
    match open(io, authority, method, path_and_query, &negotiation).await? {
        Opened::Refused(answer) => Ok(answer),
        Opened::Switched { io: up, headers } => {
            tokio::spawn(async move {
                match client.await {
                    Ok(down) => splice(TokioIo::new(up), TokioIo::new(down), idle).await,
                    Err(e) => tracing::debug!(error = %e, "an upgraded stream did not start"),
                }
            });
            Ok(Answer {
                status: StatusCode::SWITCHING_PROTOCOLS,
                headers,
                body: Bytes::new(),
            })
        }
    }
}

/// Copies both ways until both directions are done, either fails, or `idle` passes with no
/// byte moved.
async fn splice<A, B>(a: A, b: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut abuf, mut bbuf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut abuf), if a_open => match r {
                Ok(0) | Err(_) => { a_open = false; let _ = bw.shutdown().await; }
                Ok(n) => if bw.write_all(&abuf[..n]).await.is_err() { return },
            },
            r = br.read(&mut bbuf), if b_open => match r {
                Ok(0) | Err(_) => { b_open = false; let _ = aw.shutdown().await; }
                Ok(n) => if aw.write_all(&bbuf[..n]).await.is_err() { return },
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(?idle, "upgraded stream idle; closed");
                return;
            }
        }
    }
}

/// An upgrade request's answer as `(status, headers, body)` when the next hop cannot be
/// reached, for the caller to turn into its own error type.
pub fn unreachable_answer(what: &str, e: &anyhow::Error) -> Answer {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Answer {
        status: StatusCode::BAD_GATEWAY,
        headers,
        body: Bytes::from(format!("{what}: {e:#}")),
    }
}

/// Checks a stream URL the runtime returned is plain HTTP and splits it into (authority,
/// path and query).
pub fn split_http_url(url: &str) -> Result<(String, String)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("the runtime's streaming URL {url:?} is not http://");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((authority.to_string(), path.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_and_runtime_urls() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(!is_upgrade(&h), "no Upgrade header");
        h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(is_upgrade(&h));
        assert_eq!(
            split_http_url("http://127.0.0.1:4321/exec/abc").unwrap(),
            ("127.0.0.1:4321".to_string(), "/exec/abc".to_string())
        );
        assert!(split_http_url("https://x/exec").is_err());
    }
}
