//! What a node's kubelet may do, beyond what RBAC's `system:node` role says: Kubernetes' Node
//! authorizer and NodeRestriction admission, for users `system:node:<name>` in group
//! `system:nodes`.
//!
//! - Secrets, ConfigMaps and PersistentVolumeClaims: only those a pod bound to the node uses
//!   (volumes, env, envFrom, image pull secrets), and only by name (get, or list/watch of one
//!   `metadata.name`).
//! - Leases: only its own, `kube-node-lease/<node>`.
//! - Nodes: it changes only its own Node object (and not its `node-restriction.kubernetes.io/`
//!   labels).
//! - Pods: it creates only mirror pods bound to itself, changes only the status of pods bound
//!   to it, deletes only pods bound to it, and never rewrites a pod's spec.

use serde_json::Value;

use super::auth::{Attributes, User};
use super::resources;
use super::status::{ApiError, ApiResult};
use super::{decode, Api};
use crate::store::ListOptions;

pub const NODES_GROUP: &str = "system:nodes";
const MIRROR: &str = "kubernetes.io/config.mirror";
const RESTRICTED_LABELS: &str = "node-restriction.kubernetes.io/";

/// The node a user is the kubelet of.
pub fn node_of(user: &User) -> Option<&str> {
    let name = user.name.strip_prefix("system:node:")?;
    (!name.is_empty() && user.groups.iter().any(|g| g == NODES_GROUP)).then_some(name)
}

pub enum Decision {
    Allow,
    Deny(String),
    /// RBAC decides.
    NoOpinion,
}

/// The name a list or watch is limited to by `fieldSelector=metadata.name=<x>`.
pub fn single_name(field_selector: Option<&str>) -> Option<String> {
    let fs = field_selector?;
    let mut found = None;
    for part in fs.split(',') {
        let (k, v) = part.split_once('=')?;
        if k.trim() == "metadata.name" {
            found = Some(v.trim_start_matches('=').trim().to_string());
        } else {
            return None;
        }
    }
    found
}

/// The Node authorizer. `name` is the object's name, or the single name of a list/watch.
pub async fn authorize(api: &Api, node: &str, a: &Attributes, name: Option<&str>) -> Decision {
    if a.path.is_some() {
        return Decision::NoOpinion;
    }
    match (a.group.as_str(), a.resource.as_str()) {
        ("", "secrets" | "configmaps" | "persistentvolumeclaims") => {
            let Some(name) = name.filter(|n| !n.is_empty()) else {
                return Decision::Deny(format!(
                    "node \"{node}\" may read {} only by name, for pods bound to it",
                    a.resource
                ));
            };
            if !matches!(a.verb.as_str(), "get" | "list" | "watch") || !a.subresource.is_empty() {
                return Decision::Deny(format!("node \"{node}\" may only read {}", a.resource));
            }
            match uses(api, node, &a.namespace, &a.resource, name).await {
                Ok(true) => Decision::Allow,
                Ok(false) => Decision::Deny(format!(
                    "no relationship found between node '{node}' and this object"
                )),
                Err(e) => Decision::Deny(format!("cannot check the node's pods: {}", e.message)),
            }
        }
        ("", "serviceaccounts") if a.subresource == "token" && a.verb == "create" => {
            // Tokens only of an account a pod bound to the node runs as (NodeRestriction then
            // checks the token is bound to such a pod).
            match bound_pods(api, node, &a.namespace).await {
                Ok(pods) if pods.iter().any(|p| pod_account(p) == a.name) => Decision::Allow,
                Ok(_) => Decision::Deny(format!(
                    "no relationship found between node '{node}' and this object"
                )),
                Err(e) => Decision::Deny(format!("cannot check the node's pods: {}", e.message)),
            }
        }
        ("coordination.k8s.io", "leases") => {
            let own_ns = a.namespace == "kube-node-lease";
            let own = own_ns && (a.name == node || (a.verb == "create" && a.name.is_empty()));
            if own
                && matches!(
                    a.verb.as_str(),
                    "get" | "create" | "update" | "patch" | "delete"
                )
            {
                Decision::Allow
            } else {
                Decision::Deny(format!(
                    "node \"{node}\" may only use its own Lease kube-node-lease/{node}"
                ))
            }
        }
        _ => Decision::NoOpinion,
    }
}

/// Whether a pod bound to `node` in `ns` uses the `resource` called `name`.
async fn uses(api: &Api, node: &str, ns: &str, resource: &str, name: &str) -> ApiResult<bool> {
    for pod in bound_pods(api, node, ns).await? {
        if references(&pod["spec"], resource).iter().any(|r| r == name) {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn bound_pods(api: &Api, node: &str, ns: &str) -> ApiResult<Vec<Value>> {
    let info = resources::find("", "v1", "pods").expect("pods are served");
    let l = api
        .store
        .list(ListOptions {
            prefix: &info.list_prefix(Some(ns)),
            ..Default::default()
        })
        .await?;
    Ok(l.kvs
        .iter()
        .map(decode)
        .filter(|p| p["spec"]["nodeName"].as_str() == Some(node))
        .collect())
}

/// The service account a pod runs as.
fn pod_account(pod: &Value) -> &str {
    pod["spec"]["serviceAccountName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// The names of the Secrets, ConfigMaps or PersistentVolumeClaims a pod spec refers to.
pub fn references(spec: &Value, resource: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |v: &Value| {
        if let Some(s) = v.as_str() {
            out.push(s.to_string());
        }
    };
    let arr = |v: &Value| v.as_array().cloned().unwrap_or_default();
    for vol in arr(&spec["volumes"]) {
        match resource {
            "secrets" => add(&vol["secret"]["secretName"]),
            "configmaps" => add(&vol["configMap"]["name"]),
            _ => add(&vol["persistentVolumeClaim"]["claimName"]),
        }
        for src in arr(&vol["projected"]["sources"]) {
            match resource {
                "secrets" => add(&src["secret"]["name"]),
                "configmaps" => add(&src["configMap"]["name"]),
                _ => {}
            }
        }
    }
    if resource == "secrets" {
        for s in arr(&spec["imagePullSecrets"]) {
            add(&s["name"]);
        }
    }
    for field in ["initContainers", "containers", "ephemeralContainers"] {
        for c in arr(&spec[field]) {
            for e in arr(&c["env"]) {
                match resource {
                    "secrets" => add(&e["valueFrom"]["secretKeyRef"]["name"]),
                    "configmaps" => add(&e["valueFrom"]["configMapKeyRef"]["name"]),
                    _ => {}
                }
            }
            for e in arr(&c["envFrom"]) {
                match resource {
                    "secrets" => add(&e["secretRef"]["name"]),
                    "configmaps" => add(&e["configMapRef"]["name"]),
                    _ => {}
                }
            }
        }
    }
    out
}

fn forbidden(a: &Attributes, user: &User, why: String) -> ApiError {
    let what = if a.name.is_empty() {
        a.resource.clone()
    } else {
        format!("{} \"{}\"", a.resource, a.name)
    };
    let mut e = ApiError::forbidden(format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{}\": {why}",
        user.name, a.verb, a.resource
    ));
    e.details = Some(serde_json::json!({"name": a.name, "group": a.group, "kind": a.resource}));
    e
}

/// The object a create, update or patch of a node's Node or Pod would write (None for other
/// requests): what [`admit`] looks at.
pub async fn proposed(
    api: &Api,
    a: &Attributes,
    headers: &axum::http::HeaderMap,
    body: &bytes::Bytes,
) -> ApiResult<Option<Value>> {
    let token = a.group.is_empty() && a.resource == "serviceaccounts" && a.subresource == "token";
    if token && a.verb == "create" {
        return Ok(Some(super::body::parse_any(headers, body).await?.value));
    }
    let relevant = a.group.is_empty() && matches!(a.resource.as_str(), "pods" | "nodes")
        || a.group == "coordination.k8s.io" && a.resource == "leases";
    if !relevant || !a.subresource.is_empty() {
        return Ok(None);
    }
    match a.verb.as_str() {
        "create" | "update" => Ok(Some(super::body::parse_any(headers, body).await?.value)),
        "patch" if a.resource == "nodes" => {
            let ct = headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or_default();
            let Some(kind) = super::patch::PatchType::from_content_type(ct) else {
                return Ok(None);
            };
            let info = resources::find("", "v1", "nodes").expect("nodes are served");
            let Some(kv) = api.store.get(&info.key("", &a.name)).await? else {
                return Ok(None);
            };
            Ok(Some(super::patch::apply(kind, &decode(&kv), body)?))
        }
        _ => Ok(None),
    }
}

/// NodeRestriction admission for a node's writes; `body` is what [`proposed`] found.
pub async fn admit(
    api: &Api,
    user: &User,
    node: &str,
    a: &Attributes,
    body: Option<&Value>,
) -> ApiResult<()> {
    let write = matches!(
        a.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    );
    if !write || !a.group.is_empty() && a.group != "coordination.k8s.io" {
        return Ok(());
    }
    let deny = |why: String| Err(forbidden(a, user, why));
    match (
        a.group.as_str(),
        a.resource.as_str(),
        a.subresource.as_str(),
    ) {
        ("", "pods", "") => match a.verb.as_str() {
            "create" => {
                let pod = body.cloned().unwrap_or_default();
                if pod["metadata"]["annotations"][MIRROR].is_null() {
                    return deny(format!("pod does not have \"{MIRROR}\" annotation, node \"{node}\" can only create mirror pods"));
                }
                if pod["spec"]["nodeName"].as_str() != Some(node) {
                    return deny(format!(
                        "node \"{node}\" can only create pods with spec.nodeName set to itself"
                    ));
                }
                let refs = ["secrets", "configmaps", "persistentvolumeclaims"]
                    .iter()
                    .any(|r| !references(&pod["spec"], r).is_empty());
                if refs {
                    return deny(format!("node \"{node}\" can not create pods that reference secrets, configmaps or persistentvolumeclaims"));
                }
                Ok(())
            }
            "delete" => {
                if pod_node(api, &a.namespace, &a.name).await?.as_deref() != Some(node) {
                    return deny(format!(
                        "node \"{node}\" can only delete pods with spec.nodeName set to itself"
                    ));
                }
                Ok(())
            }
            _ => deny(format!(
                "node \"{node}\" can only update pod status, not pods"
            )),
        },
        ("", "pods", "status") => {
            if pod_node(api, &a.namespace, &a.name).await?.as_deref() != Some(node) {
                return deny(format!(
                    "node \"{node}\" can only update pod status for pods with spec.nodeName set to itself"
                ));
            }
            Ok(())
        }
        ("", "pods", _) => deny(format!(
            "node \"{node}\" may not change pods/{}",
            a.subresource
        )),
        ("", "nodes", _) => {
            let target = if a.verb == "create" {
                body.and_then(|b| b["metadata"]["name"].as_str())
                    .unwrap_or_default()
                    .to_string()
            } else {
                a.name.clone()
            };
            if target != node {
                return deny(format!(
                    "node \"{node}\" is not allowed to modify node \"{target}\""
                ));
            }
            if let Some(new) = body {
                let info = resources::find("", "v1", "nodes").expect("nodes are served");
                let old = match api.store.get(&info.key("", &target)).await? {
                    Some(kv) => decode(&kv),
                    None => Value::Null,
                };
                let changed = restricted_label_change(&old, new);
                if !changed.is_empty() {
                    return deny(format!(
                        "node \"{node}\" is not allowed to modify labels: {}",
                        changed.join(", ")
                    ));
                }
            }
            Ok(())
        }
        ("coordination.k8s.io", "leases", _) => {
            let name = if a.verb == "create" {
                body.and_then(|b| b["metadata"]["name"].as_str())
                    .unwrap_or_default()
            } else {
                a.name.as_str()
            };
            if a.namespace != "kube-node-lease" || name != node {
                return deny(
                    "can only access node lease with the same name as the requesting node".into(),
                );
            }
            Ok(())
        }
        ("", "serviceaccounts", "token") => {
            let bound = body.map(|b| &b["spec"]["boundObjectRef"]);
            let pod_name = match bound {
                Some(r) if r["kind"].as_str() == Some("Pod") => {
                    r["name"].as_str().unwrap_or_default()
                }
                _ => {
                    return deny(format!(
                        "node \"{node}\" can only request tokens bound to pods"
                    ))
                }
            };
            let info = resources::find("", "v1", "pods").expect("pods are served");
            let pod = match api.store.get(&info.key(&a.namespace, pod_name)).await? {
                Some(kv) => decode(&kv),
                None => Value::Null,
            };
            if pod["spec"]["nodeName"].as_str() != Some(node) || pod_account(&pod) != a.name {
                return deny(format!(
                    "node \"{node}\" can only request tokens for service accounts of pods bound to it"
                ));
            }
            Ok(())
        }
        ("", "secrets" | "configmaps" | "persistentvolumeclaims" | "namespaces", _) => {
            deny(format!("node \"{node}\" may not change {}", a.resource))
        }
        _ => Ok(()),
    }
}

/// Restricted labels a node's update would change (checked on the object after the update).
pub fn restricted_label_change(old: &Value, new: &Value) -> Vec<String> {
    let labels = |v: &Value| -> Vec<(String, String)> {
        v["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.contains(RESTRICTED_LABELS))
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (a, b) = (labels(old), labels(new));
    let mut changed: Vec<String> = a
        .iter()
        .filter(|x| !b.contains(x))
        .chain(b.iter().filter(|x| !a.contains(x)))
        .map(|(k, _)| k.clone())
        .collect();
    changed.sort();
    changed.dedup();
    changed
}

async fn pod_node(api: &Api, ns: &str, name: &str) -> ApiResult<Option<String>> {
    let info = resources::find("", "v1", "pods").expect("pods are served");
    Ok(api
        .store
        .get(&info.key(ns, name))
        .await?
        .and_then(|kv| decode(&kv)["spec"]["nodeName"].as_str().map(String::from)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pod_spec_names_its_secrets_configmaps_and_claims() {
        let spec = json!({
            "volumes": [{"name": "a", "secret": {"secretName": "s1"}},
                        {"name": "b", "configMap": {"name": "c1"}},
                        {"name": "c", "persistentVolumeClaim": {"claimName": "p1"}},
                        {"name": "d", "projected": {"sources": [{"secret": {"name": "s2"}}, {"configMap": {"name": "c2"}}]}}],
            "imagePullSecrets": [{"name": "s3"}],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s4"}}]}],
            "containers": [{"name": "m", "env": [
                {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s5", "key": "k"}}},
                {"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "c3", "key": "k"}}}],
                "envFrom": [{"configMapRef": {"name": "c4"}}]}]
        });
        let mut s = references(&spec, "secrets");
        s.sort();
        assert_eq!(s, ["s1", "s2", "s3", "s4", "s5"]);
        let mut c = references(&spec, "configmaps");
        c.sort();
        assert_eq!(c, ["c1", "c2", "c3", "c4"]);
        assert_eq!(references(&spec, "persistentvolumeclaims"), ["p1"]);
    }

    #[test]
    fn only_node_users_are_nodes() {
        assert_eq!(
            node_of(&User::new("system:node:n1", &[NODES_GROUP])),
            Some("n1")
        );
        assert_eq!(node_of(&User::new("system:node:n1", &[])), None);
        assert_eq!(node_of(&User::new("jane", &[NODES_GROUP])), None);
        assert_eq!(single_name(Some("metadata.name=db")), Some("db".into()));
        assert_eq!(single_name(Some("metadata.name=db,spec.x=y")), None);
        assert_eq!(single_name(None), None);
    }

    #[test]
    fn restricted_labels_cannot_change() {
        let old =
            json!({"metadata": {"labels": {"node-restriction.kubernetes.io/pool": "a", "x": "1"}}});
        let new =
            json!({"metadata": {"labels": {"node-restriction.kubernetes.io/pool": "b", "x": "2"}}});
        assert_eq!(
            restricted_label_change(&old, &new),
            ["node-restriction.kubernetes.io/pool"]
        );
        assert!(restricted_label_change(&old, &old).is_empty());
    }
}
