//! `metrics.k8s.io/v1beta1`, the resource metrics API `kubectl top` reads (metrics-server's, in
//! Kubernetes): NodeMetrics and PodMetrics, get and list, answered from each node's kubelet
//! `/stats/summary` at the time of the request (CPU as the rate over the kubelet's last
//! sampling interval, memory as the working set). Nodes whose kubelet does not answer within
//! the timeout are left out, as metrics-server leaves out what it could not scrape. Label and
//! field selectors select the nodes or pods themselves (`kubectl top pods -l app=web`). RBAC as
//! for any resource: `get`/`list` on `nodes` or `pods` in group `metrics.k8s.io`.

use std::collections::HashSet;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};

use super::auth::Attributes;
use super::kubelet_client::kubelet_get;
use super::resources;
use super::status::{ApiError, ApiResult};
use super::{json_response, Api, Query};

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
/// The kubelet's sampling interval, reported as each figure's window.
const WINDOW: &str = "10s";
const KUBELET_TIMEOUT: Duration = Duration::from_secs(5);

/// A request for resource metrics.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// `nodes` or `pods`.
    pub resource: &'static str,
    pub ns: Option<String>,
    pub name: Option<String>,
}

/// `/apis/metrics.k8s.io/v1beta1/...` as a target; `None` for other paths.
pub fn parse(path: &str) -> Option<Target> {
    let rest = path
        .strip_prefix(&format!("/apis/{GROUP}/{VERSION}/"))?
        .trim_end_matches('/');
    let segs: Vec<&str> = rest.split('/').collect();
    let t = |resource, ns: Option<&str>, name: Option<&str>| Target {
        resource,
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
    };
    Some(match segs.as_slice() {
        ["nodes"] => t("nodes", None, None),
        ["nodes", name] => t("nodes", None, Some(name)),
        ["pods"] => t("pods", None, None),
        ["namespaces", ns, "pods"] => t("pods", Some(ns), None),
        ["namespaces", ns, "pods", name] => t("pods", Some(ns), Some(name)),
        _ => return None,
    })
}

impl Target {
    pub fn attributes(&self, verb: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: GROUP.into(),
            resource: self.resource.into(),
            namespace: self.ns.clone().unwrap_or_default(),
            name: self.name.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// The discovery document of the group version.
pub fn resource_list() -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"),
           "resources": [
               {"name": "nodes", "singularName": "", "namespaced": false, "kind": "NodeMetrics", "verbs": ["get", "list"]},
               {"name": "pods", "singularName": "", "namespaced": true, "kind": "PodMetrics", "verbs": ["get", "list"]}]})
}

fn cpu(v: &Value) -> Option<String> {
    v["cpu"]["usageNanoCores"].as_u64().map(|n| format!("{n}n"))
}

fn memory(v: &Value) -> Option<String> {
    v["memory"]["workingSetBytes"]
        .as_u64()
        .map(|b| format!("{}Ki", b / 1024))
}

fn meta(name: &str, ns: Option<&str>, labels: &Value) -> Value {
    let now = jiff::Timestamp::now().to_string();
    let mut m = json!({"name": name, "creationTimestamp": now});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    if labels.is_object() {
        m["labels"] = labels.clone();
    }
    m
}

impl Api {
    /// `GET` on `t`: a NodeMetrics or PodMetrics, or their list.
    pub(super) async fn resource_metrics(&self, t: &Target, q: &Query) -> ApiResult<Response> {
        // Label and field selectors select the nodes, or the pods, themselves.
        let selects = q.get("labelSelector").is_some() || q.get("fieldSelector").is_some();
        let nodes_info = resources::find("", "v1", "nodes").expect("nodes are served");
        let nodes: Vec<Value> = match (t.resource, &t.name) {
            ("nodes", Some(n)) => vec![self.get_object(nodes_info, None, n).await?.0],
            ("nodes", None) => self.list_objects(nodes_info, None, q).await?.0,
            _ => {
                self.list_objects(nodes_info, None, &Query::parse(None))
                    .await?
                    .0
            }
        };
        let chosen_pods: Option<HashSet<(String, String)>> = if t.resource == "pods" && selects {
            let pods_info = resources::find("", "v1", "pods").expect("pods are served");
            let listed = self.list_objects(pods_info, t.ns.as_deref(), q).await?.0;
            let key =
                |p: &Value, f: &str| p["metadata"][f].as_str().unwrap_or_default().to_string();
            Some(
                listed
                    .iter()
                    .map(|p| (key(p, "namespace"), key(p, "name")))
                    .collect(),
            )
        } else {
            None
        };
        let mut items = Vec::new();
        for node in &nodes {
            let name = node["metadata"]["name"].as_str().unwrap_or_default();
            let summary = match self.kubelet_summary(node).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(node = name, error = %e.message, "no resource metrics from the kubelet");
                    continue;
                }
            };
            let time = summary["node"]["cpu"]["time"].clone();
            if t.resource == "nodes" {
                if let (Some(c), Some(m)) = (cpu(&summary["node"]), memory(&summary["node"])) {
                    items.push(
                        json!({"metadata": meta(name, None, &node["metadata"]["labels"]),
                        "timestamp": time, "window": WINDOW, "usage": {"cpu": c, "memory": m}}),
                    );
                }
                continue;
            }
            for p in summary["pods"].as_array().into_iter().flatten() {
                let (pns, pname) = (
                    p["podRef"]["namespace"].as_str().unwrap_or_default(),
                    p["podRef"]["name"].as_str().unwrap_or_default(),
                );
                if t.ns.as_deref().is_some_and(|ns| ns != pns)
                    || t.name.as_deref().is_some_and(|n| n != pname)
                    || chosen_pods
                        .as_ref()
                        .is_some_and(|c| !c.contains(&(pns.to_string(), pname.to_string())))
                {
                    continue;
                }
                let containers: Vec<Value> = p["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| {
                        Some(json!({"name": c["name"], "usage": {"cpu": cpu(c)?, "memory": memory(c)?}}))
                    })
                    .collect();
                items.push(json!({"metadata": meta(pname, Some(pns), &Value::Null),
                    "timestamp": p["cpu"]["time"], "window": WINDOW, "containers": containers}));
            }
        }
        let (kind, list_kind) = match t.resource {
            "nodes" => ("NodeMetrics", "NodeMetricsList"),
            _ => ("PodMetrics", "PodMetricsList"),
        };
        let api_version = format!("{GROUP}/{VERSION}");
        if let Some(name) = &t.name {
            let mut item = items.into_iter().next().ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", t.resource),
                )
            })?;
            item["kind"] = json!(kind);
            item["apiVersion"] = json!(api_version);
            return Ok(json_response(StatusCode::OK, &item));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"kind": list_kind, "apiVersion": api_version, "metadata": {}, "items": items}),
        ))
    }

    /// The node's kubelet's `/stats/summary`.
    async fn kubelet_summary(&self, node: &Value) -> ApiResult<Value> {
        let path = "/stats/summary";
        let fetch = async {
            let (authority, stream) = self.kubelet_conn(node, path).await?;
            let resp = kubelet_get(&authority, stream, path).await?;
            let failed = |e: String| ApiError::new(502, "InternalError", format!("{path}: {e}"));
            let body = http_body_util::Limited::new(resp.into_body(), 8 << 20)
                .collect()
                .await
                .map_err(|e| failed(e.to_string()))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))
        };
        tokio::time::timeout(KUBELET_TIMEOUT, fetch)
            .await
            .map_err(|_| {
                ApiError::new(
                    504,
                    "Timeout",
                    format!("{path}: the kubelet did not answer"),
                )
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_nodes_and_pods() {
        let p = |s| parse(s);
        assert_eq!(
            p("/apis/metrics.k8s.io/v1beta1/nodes").unwrap().resource,
            "nodes"
        );
        let one = p("/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/web").unwrap();
        assert_eq!(
            (one.resource, one.ns.as_deref(), one.name.as_deref()),
            ("pods", Some("default"), Some("web"))
        );
        assert!(p("/apis/metrics.k8s.io/v1beta1/namespaces/default/services").is_none());
        assert!(p("/apis/apps/v1/deployments").is_none());
        assert_eq!(
            cpu(&json!({"cpu": {"usageNanoCores": 1500}})).unwrap(),
            "1500n"
        );
        assert_eq!(
            memory(&json!({"memory": {"workingSetBytes": 4096}})).unwrap(),
            "4Ki"
        );
    }
}
