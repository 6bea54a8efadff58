//! A namespace's limits, at admission, as Kubernetes' LimitRanger and ResourceQuota plugins:
//! a LimitRange's `Container` defaults fill a new pod's missing requests and limits and its
//! min/max bound them; each ResourceQuota's `pods`, `requests.cpu|memory` (`cpu`, `memory`)
//! and `limits.cpu|memory` are charged with the new pod against what the namespace's pods
//! that have not finished already use; its object counts (`count/<resource>[.<group>]`, and
//! `configmaps`, `secrets`, `services`, `replicationcontrollers`, `resourcequotas`,
//! `persistentvolumeclaims`) with any new object of that resource. An object that would pass
//! a hard limit, or a pod that leaves unset what a quota limits, is refused with Kubernetes'
//! message. Admissions in a namespace with quotas are serialized in this API server, so two
//! objects cannot both take the last place; `status.used` is written when a quota is created
//! or changed and after each admitted object, each deleted one and each pod that finishes.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::resources::{self, ResourceInfo};
use super::status::{ApiError, ApiResult};
use super::{Api, Query};
use crate::quantity;

/// The quota resources charged per pod.
const TRACKED: [&str; 7] = [
    "pods",
    "requests.cpu",
    "requests.memory",
    "limits.cpu",
    "limits.memory",
    "cpu",
    "memory",
];

/// Core resources a quota may also count by their plain name.
const PLAIN_COUNTS: [&str; 6] = [
    "configmaps",
    "secrets",
    "services",
    "replicationcontrollers",
    "resourcequotas",
    "persistentvolumeclaims",
];

/// The quota names that count objects of a resource.
fn count_names(info: &ResourceInfo) -> Vec<String> {
    let mut names = vec![if info.group.is_empty() {
        format!("count/{}", info.plural)
    } else {
        format!("count/{}.{}", info.plural, info.group)
    }];
    if info.group.is_empty() && PLAIN_COUNTS.contains(&info.plural) {
        names.push(info.plural.to_string());
    }
    names
}

/// The namespaced resource a quota name counts, if it is an object count.
fn counted(name: &str) -> Option<&'static ResourceInfo> {
    let (plural, group) = match name.strip_prefix("count/") {
        Some(r) => r.split_once('.').unwrap_or((r, "")),
        None if PLAIN_COUNTS.contains(&name) => (name, ""),
        None => return None,
    };
    resources::RESOURCES
        .iter()
        .find(|i| i.namespaced && !i.create_only && i.plural == plural && i.group == group)
}

fn is_cpu(key: &str) -> bool {
    key.ends_with("cpu")
}

fn parse(key: &str, v: &Value) -> Option<i64> {
    quantity::parse(v.as_str()?, is_cpu(key)).ok()
}

/// A quantity as Kubernetes prints it: cores or millicores, bytes in the largest binary unit
/// that divides them.
fn show(key: &str, v: i64) -> String {
    if key == "pods" {
        return v.to_string();
    }
    if is_cpu(key) {
        return if v % 1000 == 0 {
            (v / 1000).to_string()
        } else {
            format!("{v}m")
        };
    }
    for (unit, shift) in [("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if v != 0 && v % (1i64 << shift) == 0 {
            return format!("{}{unit}", v >> shift);
        }
    }
    v.to_string()
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["containers", "initContainers"]
        .into_iter()
        .flat_map(move |list| pod["spec"][list].as_array().into_iter().flatten())
}

/// What a pod is charged: one pod, and its containers' requests and limits (the larger of the
/// app containers' sum and any one init container, as the scheduler counts), with the names
/// of containers that leave each unset.
fn charge(
    pod: &Value,
) -> (
    BTreeMap<&'static str, i64>,
    BTreeMap<&'static str, Vec<String>>,
) {
    let mut used = BTreeMap::from([("pods", 1)]);
    let mut unset: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for (kind, field) in [("requests", "requests"), ("limits", "limits")] {
        for r in ["cpu", "memory"] {
            let key: &'static str = match (kind, r) {
                ("requests", "cpu") => "requests.cpu",
                ("requests", _) => "requests.memory",
                (_, "cpu") => "limits.cpu",
                _ => "limits.memory",
            };
            let amount = |c: &Value| parse(key, &c["resources"][field][r]);
            let apps: i64 = pod["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(amount)
                .sum();
            let init = pod["spec"]["initContainers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(amount)
                .max()
                .unwrap_or(0);
            used.insert(key, apps.max(init));
            let missing: Vec<String> = containers(pod)
                .filter(|c| amount(c).is_none())
                .map(|c| c["name"].as_str().unwrap_or_default().to_string())
                .collect();
            if !missing.is_empty() {
                unset.insert(key, missing);
            }
        }
    }
    used.insert("cpu", used["requests.cpu"]);
    used.insert("memory", used["requests.memory"]);
    if let Some(m) = unset.get("requests.cpu").cloned() {
        unset.insert("cpu", m);
    }
    if let Some(m) = unset.get("requests.memory").cloned() {
        unset.insert("memory", m);
    }
    (used, unset)
}

/// Applies a LimitRange's `Container` items to the pod's containers: defaults first, then the
/// bounds. The error is Kubernetes' sentence.
fn limit_range(pod: &mut Value, range: &Value) -> Result<(), String> {
    for item in range["spec"]["limits"].as_array().into_iter().flatten() {
        if item["type"] != "Container" {
            continue;
        }
        for list in ["containers", "initContainers"] {
            let Some(cs) = pod["spec"][list].as_array_mut() else {
                continue;
            };
            for c in cs.iter_mut() {
                let res = &mut c["resources"];
                for (from, into) in [("default", "limits"), ("defaultRequest", "requests")] {
                    for (r, v) in item[from].as_object().into_iter().flatten() {
                        if res[into][r.as_str()].is_null() {
                            res[into][r.as_str()] = v.clone();
                        }
                    }
                }
                // A limit without a request requests the limit (Kubernetes' defaulting).
                let limits = res["limits"].as_object().cloned().unwrap_or_default();
                for (r, v) in limits {
                    if res["requests"][r.as_str()].is_null() {
                        res["requests"][r.as_str()] = v;
                    }
                }
                for (r, bound) in item["min"].as_object().into_iter().flatten() {
                    let min = quantity::parse(bound.as_str().unwrap_or_default(), r == "cpu");
                    for kind in ["requests", "limits"] {
                        let have = res[kind][r.as_str()].as_str().unwrap_or_default();
                        if let (Ok(min), Ok(v)) = (&min, quantity::parse(have, r == "cpu")) {
                            if v < *min {
                                return Err(format!(
                                    "minimum {r} usage per Container is {}, but {} is {have}",
                                    bound.as_str().unwrap_or_default(),
                                    &kind[..kind.len() - 1]
                                ));
                            }
                        }
                    }
                }
                for (r, bound) in item["max"].as_object().into_iter().flatten() {
                    let b = bound.as_str().unwrap_or_default();
                    let have = res["limits"][r.as_str()].as_str().unwrap_or_default();
                    if have.is_empty() {
                        return Err(format!(
                            "maximum {r} usage per Container is {b}.  No limit is specified"
                        ));
                    }
                    if let (Ok(max), Ok(v)) = (
                        quantity::parse(b, r == "cpu"),
                        quantity::parse(have, r == "cpu"),
                    ) {
                        if v > max {
                            return Err(format!(
                                "maximum {r} usage per Container is {b}, but limit is {have}"
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn finished(pod: &Value) -> bool {
    matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    )
}

impl Api {
    async fn in_namespace(&self, plural: &str, ns: &str) -> ApiResult<Vec<Value>> {
        let info = resources::find("", "v1", plural).expect("core resources are served");
        Ok(self
            .list_objects(info, Some(ns), &Query::parse(None))
            .await?
            .0)
    }

    /// A new object in `ns` against the namespace's LimitRanges (pods) and ResourceQuotas.
    /// When the namespace has quotas the returned guard serializes admissions until the
    /// caller has stored the object.
    pub(super) async fn admit_quotas(
        &self,
        info: &ResourceInfo,
        ns: &str,
        obj: &mut Value,
    ) -> ApiResult<Option<tokio::sync::MutexGuard<'_, ()>>> {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let is_pod = (info.group, info.plural) == ("", "pods");
        let forbidden = |why: String| {
            ApiError::forbidden(format!(
                "{} \"{name}\" is forbidden: {why}",
                info.qualified()
            ))
        };
        if is_pod {
            for range in self.in_namespace("limitranges", ns).await? {
                limit_range(obj, &range).map_err(forbidden)?;
            }
        }
        let quotas = self.in_namespace("resourcequotas", ns).await?;
        let counts = count_names(info);
        let applies = |q: &Value| {
            q["spec"]["hard"].as_object().is_some_and(|h| {
                h.keys()
                    .any(|k| counts.contains(k) || (is_pod && TRACKED.contains(&k.as_str())))
            })
        };
        if !quotas.iter().any(applies) {
            return Ok(None);
        }
        let guard = self.quota_gate.lock().await;
        if is_pod {
            self.charge_pod(ns, obj, &quotas, &forbidden).await?;
        }
        // Object counts: the objects of this resource in the namespace, and the new one.
        let mut existing = None;
        for q in &quotas {
            let qname = q["metadata"]["name"].as_str().unwrap_or_default();
            for (k, hard) in q["spec"]["hard"].as_object().into_iter().flatten() {
                if !counts.contains(k) {
                    continue;
                }
                let Some(limit) = parse("count", hard) else {
                    continue;
                };
                let used = match existing {
                    Some(n) => n,
                    None => *existing.insert(self.count_in(info, ns).await?),
                };
                if used + 1 > limit {
                    return Err(forbidden(format!(
                        "exceeded quota: {qname}, requested: {k}=1, used: {k}={used}, limited: {k}={limit}"
                    )));
                }
            }
        }
        Ok(Some(guard))
    }

    /// How many objects of a resource the namespace has.
    async fn count_in(&self, info: &ResourceInfo, ns: &str) -> ApiResult<i64> {
        let listed = self
            .list_decoded(
                info,
                Some(ns),
                &Query::parse(None),
                super::decode_without_managed_fields,
            )
            .await?;
        Ok(listed.0.len() as i64)
    }

    /// A new pod's charge against each quota's pod resources.
    async fn charge_pod(
        &self,
        ns: &str,
        pod: &Value,
        quotas: &[Value],
        forbidden: &(dyn Fn(String) -> ApiError + Sync),
    ) -> ApiResult<()> {
        let (want, unset) = charge(pod);
        let used = self.used_in(ns).await?;
        for q in quotas {
            let qname = q["metadata"]["name"].as_str().unwrap_or_default();
            let hard = q["spec"]["hard"].as_object().cloned().unwrap_or_default();
            let tracked = || {
                hard.keys()
                    .filter_map(|k| TRACKED.iter().find(|t| **t == k.as_str()).copied())
            };
            let missing: Vec<&str> = tracked().filter(|k| unset.contains_key(k)).collect();
            if !missing.is_empty() {
                return Err(forbidden(format!(
                    "failed quota: {qname}: must specify {}",
                    missing.join(",")
                )));
            }
            let over: Vec<&str> = tracked()
                .filter(|k| {
                    parse(k, &hard[*k])
                        .is_some_and(|h| used.get(k).copied().unwrap_or(0) + want[k] > h)
                })
                .collect();
            if !over.is_empty() {
                let list = |f: &dyn Fn(&str) -> i64| {
                    over.iter()
                        .map(|k| format!("{k}={}", show(k, f(k))))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                return Err(forbidden(format!(
                    "exceeded quota: {qname}, requested: {}, used: {}, limited: {}",
                    list(&|k| want[k]),
                    list(&|k| used.get(k).copied().unwrap_or(0)),
                    list(&|k| parse(k, &hard[k]).unwrap_or(0)),
                )));
            }
        }
        Ok(())
    }

    /// What the namespace's pods that have not finished use, per tracked resource.
    async fn used_in(&self, ns: &str) -> ApiResult<BTreeMap<&'static str, i64>> {
        let mut used: BTreeMap<&'static str, i64> = BTreeMap::new();
        for p in self.in_namespace("pods", ns).await? {
            if finished(&p) {
                continue;
            }
            for (k, v) in charge(&p).0 {
                *used.entry(k).or_default() += v;
            }
        }
        Ok(used)
    }

    /// [`Api::refresh_quotas`] boxed, for the delete path (an update that finalizes an object
    /// deletes it, and a quota status update is an update).
    pub(super) fn refresh_quotas_boxed<'a>(
        &'a self,
        ns: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(self.refresh_quotas(ns))
    }

    /// Writes each quota's `status.hard` and `status.used` in `ns` as they are now.
    pub(super) async fn refresh_quotas(&self, ns: &str) {
        let result: ApiResult<()> = async {
            let quotas = self.in_namespace("resourcequotas", ns).await?;
            if quotas.is_empty() {
                return Ok(());
            }
            let keys = || {
                quotas
                    .iter()
                    .flat_map(|q| q["spec"]["hard"].as_object().into_iter().flatten())
                    .map(|(k, _)| k.as_str())
            };
            let used = if keys().any(|k| TRACKED.contains(&k)) {
                self.used_in(ns).await?
            } else {
                BTreeMap::new()
            };
            // Each counted resource listed once for all the quotas that name it.
            let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
            for k in keys() {
                if let (Some(info), false) = (counted(k), counts.contains_key(k)) {
                    counts.insert(k, self.count_in(info, ns).await?);
                }
            }
            let info = resources::find("", "v1", "resourcequotas").expect("served");
            for q in &quotas {
                let name = q["metadata"]["name"].as_str().unwrap_or_default();
                let hard = q["spec"]["hard"].clone();
                let mut status_used = serde_json::Map::new();
                for k in hard.as_object().into_iter().flatten().map(|(k, _)| k) {
                    if let Some(t) = TRACKED.iter().find(|t| **t == k.as_str()) {
                        status_used
                            .insert(k.clone(), json!(show(t, used.get(t).copied().unwrap_or(0))));
                    } else if let Some(n) = counts.get(k.as_str()) {
                        status_used.insert(k.clone(), json!(n.to_string()));
                    }
                }
                let status = json!({"hard": hard, "used": status_used});
                if q["status"] == status {
                    continue;
                }
                let (cur, kv) = self.get_object(info, Some(ns), name).await?;
                let mut new = cur.clone();
                new["status"] = status;
                self.update_object(
                    info,
                    Some(ns),
                    name,
                    new,
                    &cur,
                    &kv,
                    Some("status"),
                    false,
                    Some(super::SERVER_MANAGER),
                )
                .await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(namespace = ns, error = %e.message, "refreshing quota status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_charged_and_quantities_shown_as_kubernetes() {
        let pod = json!({"spec": {
            "initContainers": [{"name": "init", "resources": {"requests": {"cpu": "2"}}}],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"},
                                            "limits": {"memory": "128Mi"}}},
                {"name": "b", "resources": {"requests": {"cpu": "500m"}}}]}});
        let (used, unset) = charge(&pod);
        assert_eq!(used["pods"], 1);
        assert_eq!(used["requests.cpu"], 2000, "the init container's 2 cores");
        assert_eq!(used["requests.memory"], 64 << 20);
        assert_eq!(used["limits.memory"], 128 << 20);
        assert_eq!(unset["requests.memory"], vec!["b", "init"]);
        assert_eq!(unset["limits.cpu"], vec!["a", "b", "init"]);
        assert_eq!(show("requests.cpu", 1500), "1500m");
        assert_eq!(show("cpu", 2000), "2");
        assert_eq!(show("memory", 64 << 20), "64Mi");
        assert_eq!(show("pods", 3), "3");
    }

    #[test]
    fn object_counts_are_named_as_kubernetes_names_them() {
        let find = |g, v, p| resources::find(g, v, p).unwrap();
        assert_eq!(
            count_names(find("", "v1", "configmaps")),
            ["count/configmaps", "configmaps"]
        );
        assert_eq!(
            count_names(find("apps", "v1", "deployments")),
            ["count/deployments.apps"]
        );
        assert_eq!(count_names(find("", "v1", "pods")), ["count/pods"]);
        assert_eq!(
            counted("count/deployments.apps").map(|i| i.kind),
            Some("Deployment")
        );
        assert_eq!(counted("secrets").map(|i| i.kind), Some("Secret"));
        assert!(counted("count/nodes").is_none(), "nodes are not namespaced");
        assert!(
            counted("pods").is_none(),
            "pods are charged, not counted, by that name"
        );
        assert!(counted("count/nonsense.example.com").is_none());
    }

    #[test]
    fn limit_ranges_default_then_bound() {
        let range = json!({"spec": {"limits": [{"type": "Container",
            "default": {"cpu": "500m"}, "defaultRequest": {"cpu": "100m"},
            "max": {"cpu": "1"}, "min": {"cpu": "50m"}}]}});
        let mut pod = json!({"spec": {"containers": [{"name": "c"}]}});
        limit_range(&mut pod, &range).unwrap();
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"limits": {"cpu": "500m"}, "requests": {"cpu": "100m"}})
        );
        let mut big = json!({"spec": {"containers": [{"name": "c",
            "resources": {"limits": {"cpu": "2"}}}]}});
        assert_eq!(
            limit_range(&mut big, &range).unwrap_err(),
            "maximum cpu usage per Container is 1, but limit is 2"
        );
        let mut small = json!({"spec": {"containers": [{"name": "c",
            "resources": {"requests": {"cpu": "10m"}}}]}});
        assert_eq!(
            limit_range(&mut small, &range).unwrap_err(),
            "minimum cpu usage per Container is 50m, but request is 10m"
        );
    }
}
