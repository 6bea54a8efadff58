//! `pods/{name}/log`: the API server asks the pod's kubelet for a container's log and streams
//! the answer back, as `kubectl logs` (with `-f`, `--previous`, `--tail`, `--timestamps`,
//! `--since`, `--limit-bytes`) expects.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::Empty;
use hyper::body::Bytes;
use serde_json::Value;

use super::status::ApiError;
use super::{resources, Api, ApiResult, Query};

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

fn names(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

/// The container the request names, or the pod's only one.
fn container(pod: &Value, name: &str, q: &Query) -> ApiResult<String> {
    let apps = names(pod, "containers");
    let all: Vec<String> = names(pod, "initContainers")
        .into_iter()
        .chain(apps.clone())
        .collect();
    match q.get("container") {
        Some(c) if all.iter().any(|n| n == c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if apps.len() == 1 => Ok(apps[0].clone()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            all.join(" ")
        ))),
    }
}

/// The kubelet's address: the node's InternalIP and its daemonEndpoints port.
fn kubelet_address(node: &Value) -> Option<(String, u16)> {
    let ip = node["status"]["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == "InternalIP")?["address"]
        .as_str()?
        .to_string();
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap_or(10250) as u16;
    Some((ip, port))
}

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
        let pods = resources::find("", "v1", "pods").expect("pods are served");
        let nodes = resources::find("", "v1", "nodes").expect("nodes are served");
        let (pod, _) = self.get_object(pods, Some(ns), name).await?;
        let container = container(&pod, name, q)?;
        let node_name = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        if node_name.is_empty() {
            return Err(ApiError::bad_request(format!(
                "pod {name} does not have a host assigned"
            )));
        }
        let (node, _) = self.get_object(nodes, None, node_name).await?;
        let (ip, port) = kubelet_address(&node).ok_or_else(|| {
            ApiError::bad_request(format!("node {node_name} has no InternalIP address"))
        })?;
        let path = format!("/containerLogs/{ns}/{name}/{container}?{}", query_string(q));
        let unreachable = |e: String| {
            ApiError::new(
                502,
                "InternalError",
                format!("Get \"http://{ip}:{port}{path}\": {e}"),
            )
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((ip.as_str(), port)),
        )
        .await
        .map_err(|_| unreachable("dial timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(&path)
            .header(header::HOST, format!("{ip}:{port}"))
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
    use serde_json::json;
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
    fn picks_the_container_or_names_the_choices() {
        let pod = json!({"spec": {"initContainers": [{"name": "init"}],
                                  "containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(
            container(&pod, "p", &q(&[("container", "b")])).unwrap(),
            "b"
        );
        assert_eq!(
            container(&pod, "p", &q(&[("container", "init")])).unwrap(),
            "init"
        );
        let e = container(&pod, "p", &q(&[])).unwrap_err();
        assert!(
            format!("{e:?}").contains("choose one of: [init a b]"),
            "{e:?}"
        );
        let e = container(&pod, "p", &q(&[("container", "zz")])).unwrap_err();
        assert!(format!("{e:?}").contains("container zz is not valid for pod p"));
        let one = json!({"spec": {"containers": [{"name": "only"}]}});
        assert_eq!(container(&one, "p", &q(&[])).unwrap(), "only");
    }

    #[test]
    fn kubelet_address_from_the_node() {
        let n = json!({"status": {"addresses": [{"type": "Hostname", "address": "n"},
                                                {"type": "InternalIP", "address": "10.0.0.2"}],
                                  "daemonEndpoints": {"kubeletEndpoint": {"Port": 10251}}}});
        assert_eq!(kubelet_address(&n), Some(("10.0.0.2".into(), 10251)));
        assert_eq!(kubelet_address(&json!({})), None);
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
