//! What the API server serves over WebSocket itself, toward a kubelet (and runtime) that speaks
//! SPDY/3.1, as kube-apiserver does since kubectl moved to WebSocket:
//! - exec and attach in the channel protocols `v5.channel.k8s.io` (kubectl 1.30+) and
//!   `v4.channel.k8s.io` (the Python client): each binary message's first byte names the
//!   channel (0 stdin, 1 stdout, 2 stderr, 3 the error/status, 4 terminal resize), v5 adds
//!   message 255 <channel> closing the client's side of a channel (stdin's EOF, which `kubectl
//!   cp` into a pod needs). Each channel becomes a SPDY stream of the remote command protocol
//!   v4 (`streamtype` error, stdin, stdout, stderr, resize), whose bytes (the final Status JSON
//!   on the error stream included) pass unchanged;
//! - port-forward's tunnel `SPDY/3.1+portforward.k8s.io` (kubectl 1.31+): the client speaks
//!   SPDY inside binary messages; the messages are unwrapped into the kubelet's SPDY upgrade
//!   and its bytes wrapped back.

use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::BytesMut;
use futures::{SinkExt as _, StreamExt as _};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::spdy::{self, Frame};

pub const V5: &str = "v5.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";
pub const PORT_FORWARD_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: "the client closed its side of the channel in the next byte".
const CLOSE: u8 = 255;

/// The largest message a client may send (kubectl writes stdin 32 KiB at a time).
const MAX_MESSAGE: usize = 1 << 20;

/// Whether the request asks for a WebSocket.
pub fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The subprotocols the client offers, in its order of preference.
pub fn offered(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The 101 that accepts the client's WebSocket with `protocol`, or why it cannot be.
pub fn accept(headers: &HeaderMap, protocol: &str) -> Result<Response, String> {
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("the WebSocket request has no Sec-WebSocket-Key")?;
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("the WebSocket request must be version 13 (Sec-WebSocket-Version)".into());
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(|e| e.to_string())?,
    );
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_str(protocol).map_err(|e| e.to_string())?,
    );
    Ok(resp)
}

async fn server(io: Upgraded) -> WebSocketStream<TokioIo<Upgraded>> {
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(cfg)).await
}

/// The streams an exec or attach asked for in its query (`stdin`, `stdout`, `stderr`, `tty`;
/// `true` or `1`). With a terminal stderr is merged into stdout, so not opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Streams {
    pub fn from_query(q: &super::Query) -> Self {
        let on = |k: &str| q.flag(k);
        let tty = on("tty");
        Streams {
            stdin: on("stdin"),
            stdout: on("stdout"),
            stderr: on("stderr") && !tty,
            tty,
        }
    }

    /// (channel, SPDY `streamtype`) of each stream, the error stream first as Kubernetes'
    /// clients open them.
    fn channels(self) -> Vec<(u8, &'static str)> {
        let mut c = vec![(ERROR, "error")];
        let wanted = [
            (self.stdin, STDIN, "stdin"),
            (self.stdout, STDOUT, "stdout"),
            (self.stderr, STDERR, "stderr"),
            (self.tty, RESIZE, "resize"),
        ];
        c.extend(wanted.iter().filter(|w| w.0).map(|w| (w.1, w.2)));
        c
    }
}

/// A Status on the error channel, for a failure of the translation itself.
fn failure(msg: &str) -> Message {
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": msg, "reason": "InternalError", "code": 500,
    });
    let mut m = vec![ERROR];
    m.extend_from_slice(status.to_string().as_bytes());
    Message::Binary(m.into())
}

async fn close(ws: &mut WebSocketStream<TokioIo<Upgraded>>) {
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await;
}

/// Serves exec or attach to the client's WebSocket (`client`) in the channel protocol (`v5`:
/// with channel close) over the kubelet's SPDY connection (`upstream`, already switched to
/// remote command v4), until the kubelet closes (the command ended: its Status was on the
/// error channel), the client goes, or `idle` passes with nothing moving.
pub async fn channels(
    client: Upgraded,
    upstream: Upgraded,
    v5: bool,
    want: Streams,
    idle: Duration,
) -> Result<()> {
    let mut ws = server(client).await;
    let (r, mut w) = tokio::io::split(TokioIo::new(upstream));
    let mut reader = spdy::Reader::new(r);
    let mut enc = spdy::Encoder::default();
    let kinds = want.channels();
    let headers: Vec<Vec<(&str, &str)>> = kinds
        .iter()
        .map(|(_, k)| vec![("streamtype", *k)])
        .collect();
    let opened = tokio::time::timeout(
        Duration::from_secs(30),
        spdy::open_streams(&mut reader, &mut w, &mut enc, &headers),
    )
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "the kubelet did not answer the streams in 30 s"
        ))
    });
    let ids = match opened {
        Ok(ids) => ids,
        Err(e) => {
            let _ = ws.send(failure(&format!("{e:#}"))).await;
            close(&mut ws).await;
            return Err(e);
        }
    };
    let channel_of = |stream: u32| ids.iter().position(|s| *s == stream).map(|i| kinds[i].0);
    let stream_of = |ch: u8| kinds.iter().position(|k| k.0 == ch).map(|i| ids[i]);
    let mut out = BytesMut::new();
    let mut stdin_open = want.stdin;
    loop {
        tokio::select! {
            frame = reader.next() => match frame? {
                Some(Frame::Data { stream, data, .. }) => {
                    if let (Some(ch), false) = (channel_of(stream), data.is_empty()) {
                        let mut m = Vec::with_capacity(1 + data.len());
                        m.push(ch);
                        m.extend_from_slice(&data);
                        ws.send(Message::Binary(m.into())).await.context("writing to the client")?;
                    }
                }
                Some(Frame::Ping(id)) => {
                    spdy::ping(&mut out, id);
                    spdy::flush(&mut w, &mut out).await?;
                }
                Some(Frame::SynStream { stream }) => {
                    spdy::reset(&mut out, stream, spdy::CANCEL);
                    spdy::flush(&mut w, &mut out).await?;
                }
                Some(_) => {}
                None => break,
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let (ch, payload) = (b[0], &b[1..]);
                    match ch {
                        CLOSE if v5 && payload.first() == Some(&STDIN) && stdin_open => {
                            stdin_open = false;
                            if let Some(s) = stream_of(STDIN) {
                                spdy::data(&mut out, s, true, &[]);
                            }
                        }
                        STDIN if !stdin_open => {}
                        STDIN | RESIZE => {
                            if let Some(s) = stream_of(ch) {
                                spdy::data(&mut out, s, false, payload);
                            }
                        }
                        _ => {}
                    }
                    if !out.is_empty() {
                        spdy::flush(&mut w, &mut out).await?;
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    // The client went: end the command's streams.
                    spdy::go_away(&mut out);
                    let _ = spdy::flush(&mut w, &mut out).await;
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading from the client"),
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(?idle, "exec stream idle; closed");
                break;
            }
        }
    }
    close(&mut ws).await;
    Ok(())
}

/// Carries port-forward's WebSocket-tunnelled SPDY: each binary message from the client is
/// written to the kubelet's SPDY connection as is, each read from it sent back as a binary
/// message, until either side closes or `idle` passes.
pub async fn tunnel(client: Upgraded, upstream: Upgraded, idle: Duration) -> Result<()> {
    let mut ws = server(client).await;
    let (mut r, mut w) = tokio::io::split(TokioIo::new(upstream));
    let mut buf = BytesMut::with_capacity(32 << 10);
    loop {
        tokio::select! {
            n = r.read_buf(&mut buf) => {
                if n.context("reading from the kubelet")? == 0 {
                    break;
                }
                let chunk = buf.split().freeze();
                ws.send(Message::Binary(chunk)).await.context("writing to the client")?;
                buf.reserve(32 << 10);
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    w.write_all(&b).await.context("writing to the kubelet")?;
                }
                Some(Ok(Message::Close(_))) | None => {
                    let _ = w.shutdown().await;
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading from the client"),
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(?idle, "port-forward tunnel idle; closed");
                break;
            }
        }
    }
    close(&mut ws).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn q(pairs: &[(&str, &str)]) -> super::super::Query {
        super::super::Query(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        )
    }

    #[test]
    fn streams_follow_the_query_and_a_terminal_merges_stderr() {
        let s = Streams::from_query(&q(&[
            ("stdin", "true"),
            ("stdout", "1"),
            ("stderr", "true"),
        ]));
        assert_eq!(
            s.channels(),
            vec![
                (ERROR, "error"),
                (STDIN, "stdin"),
                (STDOUT, "stdout"),
                (STDERR, "stderr")
            ]
        );
        let s = Streams::from_query(&q(&[
            ("stdout", "true"),
            ("stderr", "true"),
            ("tty", "true"),
        ]));
        assert_eq!(
            s.channels(),
            vec![(ERROR, "error"), (STDOUT, "stdout"), (RESIZE, "resize")]
        );
        assert_eq!(
            Streams::from_query(&q(&[("stdin", "false")])).channels(),
            vec![(ERROR, "error")]
        );
    }

    #[test]
    fn handshake_answers_the_key_and_protocol() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v5.channel.k8s.io, v4.channel.k8s.io"),
        );
        assert!(is_websocket(&h));
        assert_eq!(offered(&h), vec![V5.to_string(), V4.to_string()]);
        assert!(accept(&h, V5).unwrap_err().contains("Sec-WebSocket-Key"));
        // RFC 6455's example key and answer.
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(accept(&h, V5).unwrap_err().contains("version 13"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        let r = accept(&h, V5).unwrap();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            r.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(r.headers()[header::SEC_WEBSOCKET_PROTOCOL], V5);
    }
}
