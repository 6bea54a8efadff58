//! The disruption controller: each PodDisruptionBudget's status from the pods it selects, as
//! Kubernetes' computes it for `pods/eviction` to read. `expectedPods` are the selected pods
//! that have not finished, `currentHealthy` those Ready and not being deleted nor recently
//! evicted (`disruptedPods`, forgotten after two minutes or once the pod is gone),
//! `desiredHealthy` from `minAvailable` (a number, or a percentage of the expected pods rounded
//! up) or `maxUnavailable` (the expected pods less it), and `disruptionsAllowed` the healthy
//! pods above that. Expected pods are counted from the pods themselves, not from their
//! controllers' scale.

use std::sync::Arc;
use std::time::Duration;

use ferry_common::selectors::{labels_of, LabelSelector};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use tracing::info;

/// How long an evicted pod counts as disrupted without being deleted (Kubernetes' 2 minutes).
const DISRUPTED_FOR: Duration = Duration::from_secs(120);

fn ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// `n` of `total` for a number or a percentage, rounded up.
fn scaled(v: &Value, total: i64) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let pct: i64 = s.strip_suffix('%')?.parse().ok()?;
            Some((total * pct + 99) / 100)
        }
        _ => None,
    }
}

/// The budget's status given the namespace's pods (JSON) and the time now.
pub fn status(pdb: &Value, pods: &[Value], now: jiff::Timestamp) -> Value {
    // policy/v1: a missing selector selects nothing, an empty one every pod.
    let selected: Vec<&Value> = pods
        .iter()
        .filter(|p| LabelSelector::selects(&pdb["spec"]["selector"], &labels_of(p)))
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        .collect();
    let mut disrupted = serde_json::Map::new();
    for (name, at) in pdb["status"]["disruptedPods"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let fresh = at
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_some_and(|t| now.duration_since(t).unsigned_abs() < DISRUPTED_FOR);
        let present = selected.iter().any(|p| {
            p["metadata"]["name"] == name.as_str() && p["metadata"]["deletionTimestamp"].is_null()
        });
        if fresh && present {
            disrupted.insert(name.clone(), at.clone());
        }
    }
    let expected = selected.len() as i64;
    let healthy = selected
        .iter()
        .filter(|p| {
            ready(p)
                && p["metadata"]["deletionTimestamp"].is_null()
                && !disrupted.contains_key(p["metadata"]["name"].as_str().unwrap_or_default())
        })
        .count() as i64;
    let spec = &pdb["spec"];
    let desired = if !spec["minAvailable"].is_null() {
        scaled(&spec["minAvailable"], expected).unwrap_or(expected)
    } else if !spec["maxUnavailable"].is_null() {
        (expected - scaled(&spec["maxUnavailable"], expected).unwrap_or(0)).max(0)
    } else {
        expected
    };
    let allowed = (healthy - desired).max(0);
    let (cond, reason) = if allowed > 0 {
        ("True", "SufficientPods")
    } else {
        ("False", "InsufficientPods")
    };
    let previous = pdb["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DisruptionAllowed"))
        .filter(|c| c["status"] == cond)
        .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_string));
    json!({
        "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(0),
        "disruptedPods": disrupted,
        "disruptionsAllowed": allowed,
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "conditions": [{"type": "DisruptionAllowed", "status": cond, "reason": reason, "message": "",
                        "observedGeneration": pdb["metadata"]["generation"],
                        "lastTransitionTime": previous.unwrap_or_else(|| now.to_string())}],
    })
}

struct Ctx {
    client: Client,
}

async fn reconcile(pdb: Arc<PodDisruptionBudget>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    let ns = pdb.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let list: Vec<Value> = pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|p| serde_json::to_value(p).ok())
        .collect();
    let me = serde_json::to_value(pdb.as_ref()).unwrap_or_default();
    let new = status(&me, &list, jiff::Timestamp::now());
    let mut old = me["status"].clone();
    // The transition time alone does not make a change.
    if old["conditions"].is_array() && new["conditions"].is_array() {
        old["conditions"][0]["lastTransitionTime"] =
            new["conditions"][0]["lastTransitionTime"].clone();
    }
    if old != new {
        let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &pdb.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": new})),
        )
        .await?;
    }
    // Disrupted pods expire by time, not by an event.
    Ok(
        if me["status"]["disruptedPods"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
        {
            Action::requeue(Duration::from_secs(15))
        } else {
            Action::await_change()
        },
    )
}

fn error_policy(_: Arc<PodDisruptionBudget>, _: &kube::Error, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_secs(2))
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let controller = Controller::new(
        Api::<PodDisruptionBudget>::all(client.clone()),
        watcher::Config::default(),
    );
    let budgets = controller.store();
    // A pod's change wakes the budgets of its namespace that select it.
    let controller = controller.watches(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        move |pod: Pod| {
            let ns = pod.namespace().unwrap_or_default();
            let labels = pod.labels().clone();
            budgets
                .state()
                .into_iter()
                .filter(|b| b.namespace().as_deref() == Some(ns.as_str()))
                .filter(|b| {
                    let sel =
                        serde_json::to_value(b.spec.as_ref().and_then(|s| s.selector.clone()))
                            .unwrap_or_default();
                    LabelSelector::selects(&sel, &labels)
                })
                .map(|b| ObjectRef::from_obj(b.as_ref()))
                .collect::<Vec<_>>()
        },
    );
    info!("disruption controller started");
    super::drain(
        "disruption",
        controller.run(reconcile, error_policy, Arc::new(Ctx { client })),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready_: bool) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "web"}},
               "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready_ {"True"} else {"False"}}]}})
    }

    #[test]
    fn budgets_count_healthy_pods_against_min_available_or_max_unavailable() {
        let now = jiff::Timestamp::now();
        let pods = vec![pod("a", true), pod("b", true), pod("c", false)];
        let pdb = |spec: Value| json!({"metadata": {"generation": 2}, "spec": spec});
        let sel = json!({"matchLabels": {"app": "web"}});
        let st = status(
            &pdb(json!({"selector": sel, "minAvailable": 1})),
            &pods,
            now,
        );
        assert_eq!(
            (
                st["expectedPods"].as_i64(),
                st["currentHealthy"].as_i64(),
                st["desiredHealthy"].as_i64(),
                st["disruptionsAllowed"].as_i64()
            ),
            (Some(3), Some(2), Some(1), Some(1))
        );
        assert_eq!(st["observedGeneration"], 2);
        let st = status(
            &pdb(json!({"selector": sel, "minAvailable": "50%"})),
            &pods,
            now,
        );
        assert_eq!(st["desiredHealthy"], 2, "half of 3, rounded up");
        assert_eq!(st["disruptionsAllowed"], 0);
        assert_eq!(st["conditions"][0]["reason"], "InsufficientPods");
        let st = status(
            &pdb(json!({"selector": sel, "maxUnavailable": 1})),
            &pods,
            now,
        );
        assert_eq!(
            (
                st["desiredHealthy"].as_i64(),
                st["disruptionsAllowed"].as_i64()
            ),
            (Some(2), Some(0))
        );
        // policy/v1: no selector selects nothing, an empty one every pod.
        let st = status(&pdb(json!({"minAvailable": 1})), &pods, now);
        assert_eq!(st["expectedPods"], 0);
        let st = status(&pdb(json!({"selector": {}, "minAvailable": 1})), &pods, now);
        assert_eq!(st["expectedPods"], 3);
        // A pod just evicted is not healthy; an old record is forgotten.
        let mut b = pdb(json!({"selector": sel, "minAvailable": 1}));
        b["status"]["disruptedPods"] = json!({"a": now.to_string(), "b": "2020-01-01T00:00:00Z"});
        let st = status(&b, &pods, now);
        assert_eq!(st["currentHealthy"], 1);
        assert_eq!(st["disruptedPods"], json!({"a": now.to_string()}));
    }
}
