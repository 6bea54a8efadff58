//! `pods/exec`, `pods/attach` and `pods/portforward`: the client's upgrade (WebSocket, or
//! SPDY/3.1) is proxied to the pod's kubelet, which proxies it to the runtime's streaming
//! server; the protocol and version are what the client and the runtime agree on (kubectl 1.32
//! offers WebSocket `v5.channel.k8s.io` first and falls back to SPDY when it is refused; the
//! Python client speaks WebSocket `v4.channel.k8s.io`). RBAC asks for `create` on the
//! subresource whatever the method, as Kubernetes does since it checks WebSocket GETs too.

use std::time::Duration;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use ferry_common::upgrade;

use super::kubelet_client::container;
use super::status::ApiError;
use super::{Api, ApiResult, Query};

/// The subresources that stream.
pub const STREAMING: [&str; 3] = ["exec", "attach", "portforward"];

/// An idle stream is closed after this (kube-apiserver and kubelet default to 4 h).
const IDLE: Duration = Duration::from_secs(4 * 3600);

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
        let (_, authority, path, stream) = self
            .kubelet_of(ns, name, |pod| {
                Ok(match sub {
                    "portforward" => format!("/portForward/{ns}/{name}?{raw_query}"),
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
        .map_err(|e| ApiError::new(502, "InternalError", format!("{path}: {e:#}")))?;
        if answer.status != StatusCode::SWITCHING_PROTOCOLS && !answer.status.is_success() {
            // The kubelet's or runtime's refusal, as a Status the client can print.
            let msg = String::from_utf8_lossy(&answer.body).trim().to_string();
            let reason = match answer.status.as_u16() {
                404 => "NotFound",
                403 => "Forbidden",
                400 => "BadRequest",
                _ => "InternalError",
            };
            return Err(ApiError::new(answer.status.as_u16(), reason, msg));
        }
        let mut resp = Response::new(Body::from(answer.body));
        *resp.status_mut() = answer.status;
        *resp.headers_mut() = answer.headers;
        Ok(resp)
    }
}
