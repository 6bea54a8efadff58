//! `pods/{name}/log`: the API server asks the pod's kubelet for a container's log and streams
//! the answer back, as `kubectl logs` (with `-f`, `--previous`, `--tail`, `--timestamps`,
//! `--since`, `--limit-bytes`) expects.

use super::kubelet_client::{container, kubelet_get};
use super::{Api, ApiResult, Query};
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

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
        let resp = kubelet_get(&authority, stream, &path).await?;
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
