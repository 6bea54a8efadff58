//! `pods/exec`, `pods/attach` and `pods/portforward`, toward the pod's kubelet (which proxies
//! to the runtime's streaming server). WebSocket exec and attach in `v5.channel.k8s.io` or
//! `v4.channel.k8s.io` (kubectl 1.30+, the Python client) and port-forward's
//! `SPDY/3.1+portforward.k8s.io` tunnel (kubectl 1.31+) are served here and carried to the
//! kubelet over SPDY/3.1 ([`websocket`]), as kube-apiserver does; anything else (SPDY from
//! older clients, base64 WebSocket, the Python client's WebSocket port-forward) is proxied byte
//! for byte and answered by the runtime. RBAC asks for `create` on the subresource whatever the
//! method, as Kubernetes does since it checks WebSocket GETs too.

mod spdy;
mod websocket;

use std::time::Duration;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use ferry_common::upgrade::{self, Answer, Opened};

use super::kubelet_client::container;
use super::status::ApiError;
use super::{Api, ApiResult, Query};

/// The subresources that stream.
pub const STREAMING: [&str; 3] = ["exec", "attach", "portforward"];

/// An idle stream is closed after this (kube-apiserver and kubelet default to 4 h).
const IDLE: Duration = Duration::from_secs(4 * 3600);

/// How a streaming request is carried to the kubelet.
#[derive(Debug, PartialEq, Eq)]
enum Carry {
    /// Byte for byte: the runtime answers the client's protocol.
    Proxy,
    /// WebSocket channels served here, SPDY remote command v4 to the kubelet.
    Channels { protocol: &'static str },
    /// WebSocket-tunnelled SPDY unwrapped into the kubelet's SPDY port-forward.
    Tunnel,
}

fn carry(sub: &str, headers: &HeaderMap) -> Carry {
    if !websocket::is_websocket(headers) {
        return Carry::Proxy;
    }
    let offered = websocket::offered(headers);
    if sub == "portforward" {
        return match offered.iter().any(|p| p == websocket::PORT_FORWARD_TUNNEL) {
            true => Carry::Tunnel,
            false => Carry::Proxy,
        };
    }
    offered
        .iter()
        .find_map(|p| [websocket::V5, websocket::V4].into_iter().find(|s| s == p))
        .map_or(Carry::Proxy, |protocol| Carry::Channels { protocol })
}

/// The kubelet's port-forward query: the API's `ports` (repeated or comma-separated, as
/// Kubernetes decodes them) become the kubelet's `port` parameters, each checked.
fn port_query(raw: &str) -> ApiResult<String> {
    let values = raw
        .split('&')
        .filter_map(|pair| Query::parse(Some(pair)).get("ports").map(str::to_string));
    let mut out = Vec::new();
    for v in values {
        for p in v.split(',').map(str::trim) {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => out.push(format!("port={n}")),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "ports: invalid port {p:?}: a port must be a number between 1 and 65535"
                    )))
                }
            }
        }
    }
    Ok(out.join("&"))
}

/// A refusal of the kubelet or runtime, as a Status the client can print.
fn refused(answer: Answer) -> ApiError {
    let msg = String::from_utf8_lossy(&answer.body).trim().to_string();
    let reason = match answer.status.as_u16() {
        404 => "NotFound",
        403 => "Forbidden",
        400 => "BadRequest",
        _ => "InternalError",
    };
    ApiError::new(answer.status.as_u16(), reason, msg)
}

impl Api {
    /// Proxies a streaming request for pod `ns/name`'s subresource `sub` to its kubelet.
    pub async fn stream(
        &self,
        ns: &str,
        name: &str,
        sub: &str,
        parts: &mut Parts,
    ) -> ApiResult<Response> {
        if !upgrade::is_upgrade(&parts.headers) {
            return Err(ApiError::bad_request(format!(
                "pods/{sub} streams: the request must ask for an upgrade to WebSocket or SPDY/3.1"
            )));
        }
        let raw_query = parts.uri.query().unwrap_or_default().to_string();
        let q = Query::parse(Some(&raw_query));
        let how = carry(sub, &parts.headers);
        let (_, authority, path, stream) = self
            .kubelet_of(ns, name, |pod| {
                Ok(match sub {
                    "portforward" => {
                        format!("/portForward/{ns}/{name}?{}", port_query(&raw_query)?)
                    }
                    "exec" => {
                        let c = container(pod, name, &q)?;
                        format!("/exec/{ns}/{name}/{c}?{raw_query}")
                    }
                    _ => {
                        let c = container(pod, name, &q)?;
                        format!("/attach/{ns}/{name}/{c}?{raw_query}")
                    }
                })
            })
            .await?;
        let Some(client) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(ApiError::bad_request(
                "this connection cannot be upgraded (HTTP/2): use HTTP/1.1",
            ));
        };
        let bad_gateway =
            |e: anyhow::Error| ApiError::new(502, "InternalError", format!("{path}: {e:#}"));
        if how == Carry::Proxy {
            let answer = upgrade::proxy(
                stream,
                &authority,
                parts.method.clone(),
                &path,
                &parts.headers,
                client,
                IDLE,
            )
            .await
            .map_err(bad_gateway)?;
            if answer.status != StatusCode::SWITCHING_PROTOCOLS && !answer.status.is_success() {
                return Err(refused(answer));
            }
            let mut resp = Response::new(Body::from(answer.body));
            *resp.status_mut() = answer.status;
            *resp.headers_mut() = answer.headers;
            return Ok(resp);
        }
        // Served here: the client's handshake is checked before the kubelet is asked, and
        // the kubelet's refusal (no such container, ...) is the client's HTTP answer.
        let (protocol, version) = match how {
            Carry::Channels { protocol } => (protocol, "v4.channel.k8s.io"),
            _ => (websocket::PORT_FORWARD_TUNNEL, "portforward.k8s.io"),
        };
        let accepted =
            websocket::accept(&parts.headers, protocol).map_err(ApiError::bad_request)?;
        let mut spdy = HeaderMap::new();
        spdy.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        spdy.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        spdy.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static(version),
        );
        let upstream =
            match upgrade::open(stream, &authority, axum::http::Method::POST, &path, &spdy)
                .await
                .map_err(bad_gateway)?
            {
                Opened::Switched { io, .. } => io,
                Opened::Refused(answer) => return Err(refused(answer)),
            };
        let streams = websocket::Streams::from_query(&q);
        let what = format!("pods/{sub} {ns}/{name}");
        tokio::spawn(async move {
            let client = match client.await {
                Ok(c) => c,
                Err(e) => {
                    return tracing::debug!(error = %e, "{what}: the client's upgrade did not complete")
                }
            };
            let done = match how {
                Carry::Channels { protocol } => {
                    websocket::channels(client, upstream, protocol == websocket::V5, streams, IDLE)
                        .await
                }
                _ => websocket::tunnel(client, upstream, IDLE).await,
            };
            if let Err(e) = done {
                tracing::debug!(error = %format!("{e:#}"), "{what}: stream ended");
            }
        });
        Ok(accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn websocket_channels_and_tunnels_are_served_the_rest_proxied() {
        let ws = |p| headers(&[("upgrade", "websocket"), ("sec-websocket-protocol", p)]);
        assert_eq!(
            carry("exec", &ws("v5.channel.k8s.io")),
            Carry::Channels {
                protocol: websocket::V5
            }
        );
        assert_eq!(
            carry("attach", &ws("v4.channel.k8s.io, v5.channel.k8s.io")),
            Carry::Channels {
                protocol: websocket::V4
            },
            "the client's order"
        );
        assert_eq!(carry("exec", &ws("base64.channel.k8s.io")), Carry::Proxy);
        assert_eq!(
            carry("portforward", &ws("SPDY/3.1+portforward.k8s.io")),
            Carry::Tunnel
        );
        assert_eq!(carry("portforward", &ws("v4.channel.k8s.io")), Carry::Proxy);
        assert_eq!(
            carry("exec", &headers(&[("upgrade", "SPDY/3.1")])),
            Carry::Proxy
        );
    }

    #[test]
    fn port_forward_ports_become_the_kubelets_port_parameters() {
        assert_eq!(port_query("ports=80,8080").unwrap(), "port=80&port=8080");
        assert_eq!(port_query("ports=80&ports=81").unwrap(), "port=80&port=81");
        assert_eq!(port_query("").unwrap(), "");
        for bad in ["ports=0", "ports=70000", "ports=http"] {
            let e = port_query(bad).unwrap_err();
            assert!(
                format!("{e:?}").contains("between 1 and 65535"),
                "{bad}: {e:?}"
            );
        }
    }
}
