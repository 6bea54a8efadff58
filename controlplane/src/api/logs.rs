//! `pods/{name}/log`: the API server asks the pod's kubelet for a container's log and streams
//! the answer back, as `kubectl logs` (with `-f`, `--previous`, `--tail`, `--timestamps`,
//! `--since`, `--limit-bytes`) expects.

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::Empty;
use hyper::body::Bytes;

use super::kubelet_client::container;
use super::status::ApiError;
use super::{Api, ApiResult, Query};

/// The query parameters passed on to the kubelet.
const PASSED: &[&str] = &[
    "follow",
    "previous",
    "tailLines",
    "timestamps",
    "sinceSeconds",
    "sinceTime",
    "limitBytes",
];

fn query_string(q: &Query) -> String {
    PASSED
        .iter()
        .filter_map(|k| {
            q.get(k)
                .map(|v| format!("{k}={}", v.replace(['&', '#', ' '], "")))
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Api {
    pub async fn pod_log(&self, ns: &str, name: &str, q: &Query) -> ApiResult<Response> {
        let (_, authority, path, stream) = self
            .kubelet_of(ns, name, |pod| {
                let container = container(pod, name, q)?;
                Ok(format!(
                    "/containerLogs/{ns}/{name}/{container}?{}",
                    query_string(q)
                ))
            })
            .await?;
        let unreachable = |e: String| {
            ApiError::new(
                502,
                "InternalError",
                format!("Get \"https://{authority}{path}\": {e}"),
            )
        };
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(&path)
            .header(header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
                .unwrap_or_default();
            let reason = if status == StatusCode::NOT_FOUND {
                "NotFound"
            } else {
                "BadRequest"
            };
            return Err(ApiError::new(status.as_u16(), reason, body));
        }
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            Body::new(resp.into_body()),
        )
            .into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn q(pairs: &[(&str, &str)]) -> Query {
        Query(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        )
    }

    #[test]
    fn passes_only_the_log_options() {
        let s = query_string(&q(&[
            ("follow", "true"),
            ("tailLines", "5"),
            ("pretty", "1"),
        ]));
        assert!(s.contains("follow=true") && s.contains("tailLines=5"));
        assert!(!s.contains("pretty"));
    }
}
