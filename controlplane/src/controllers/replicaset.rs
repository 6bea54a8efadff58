//! The ReplicaSet controller: keeps exactly `spec.replicas` live pods per ReplicaSet.
//!
//! Pods are matched by the set's selector and owned through a controller ownerReference;
//! matching orphans are adopted. New pods get names chosen here, so the controller knows which
//! pods it is waiting to see: until its cache shows every pod it created (and no longer shows
//! those it deleted), it does not act on that set again. Without these expectations a
//! lagging cache would make it create a fourth pod where three were asked for. Scaling down
//! removes pods that are not scheduled, then not ready, then the newest.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::selectors::LabelSelector;

/// How long to wait for the cache to show our own writes before acting anyway.
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Expect {
    create: HashSet<String>,
    delete: HashSet<String>,
    since: Option<Instant>,
}

struct Ctx {
    client: Client,
    pods: Store<Pod>,
    expect: Mutex<HashMap<String, Expect>>,
}

fn owned_by(pod: &Pod, uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

fn has_controller(pod: &Pod) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.controller == Some(true))
}

fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        )
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Which pods go first when scaling down (Kubernetes' order, simplified): unscheduled, then
/// pending, then not ready, then the newest.
fn deletion_rank(pod: &Pod) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    (
        scheduled as u8,
        running as u8,
        is_ready(pod) as u8,
        std::cmp::Reverse(
            pod.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
        ),
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<u32>() as usize % ALPHABET.len()] as char)
        .collect()
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.pods.wait_until_ready().await.ok();
    let ns = rs.namespace().unwrap_or_default();
    let name = rs.name_any();
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = rs.spec.clone().unwrap_or_default();
    let selector = match LabelSelector::from_object(
        &serde_json::to_value(&spec.selector).unwrap_or_default(),
    ) {
        Ok(s) if !s.is_empty() => s,
        _ => {
            warn!(replicaset = %format!("{ns}/{name}"), "invalid or empty selector; nothing to do");
            return Ok(Action::await_change());
        }
    };
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .collect();
    let names: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
    // Wait for the cache to catch up with our own creates and deletes.
    {
        let mut exp = ctx.expect.lock().unwrap();
        if let Some(e) = exp.get_mut(&uid) {
            e.create.retain(|n| !names.contains(n));
            e.delete.retain(|n| names.contains(n));
            let pending = !e.create.is_empty() || !e.delete.is_empty();
            let fresh = e.since.is_some_and(|t| t.elapsed() < EXPECTATION_TIMEOUT);
            if pending && fresh {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            exp.remove(&uid);
        }
    }
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut mine: Vec<Arc<Pod>> = Vec::new();
    for p in &pods {
        let labels = p.labels().clone();
        if owned_by(p, &uid) {
            if selector.matches(&labels) {
                mine.push(p.clone());
            }
        } else if !has_controller(p) && selector.matches(&labels) && is_active(p) {
            // Adopt a matching orphan.
            let patch = json!({"metadata": {"ownerReferences": [owner(&rs)]}});
            pod_api
                .patch(
                    &p.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            mine.push(p.clone());
        }
    }
    let active: Vec<Arc<Pod>> = mine.iter().filter(|p| is_active(p)).cloned().collect();
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    let mut exp = Expect {
        since: Some(Instant::now()),
        ..Default::default()
    };
    if active.len() < want {
        let template = spec.template.clone().unwrap_or_default();
        for _ in active.len()..want {
            let pod_name = format!("{name}-{}", random_suffix());
            let meta = template.metadata.clone().unwrap_or_default();
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(pod_name.clone()),
                    namespace: Some(ns.clone()),
                    labels: meta.labels,
                    annotations: meta.annotations,
                    owner_references: Some(vec![owner(&rs)]),
                    ..Default::default()
                },
                spec: template.spec.clone(),
                status: None,
            };
            match pod_api.create(&PostParams::default(), &pod).await {
                Ok(_) => {
                    exp.create.insert(pod_name);
                }
                Err(e) => {
                    warn!(replicaset = %format!("{ns}/{name}"), error = %e, "creating a pod");
                    break;
                }
            }
        }
        info!(replicaset = %format!("{ns}/{name}"), created = exp.create.len(), "scaled up");
    } else if active.len() > want {
        let mut victims = active.clone();
        victims.sort_by_key(|p| deletion_rank(p));
        for p in victims.into_iter().take(active.len() - want) {
            match pod_api
                .delete(&p.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    exp.delete.insert(p.name_any());
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        info!(replicaset = %format!("{ns}/{name}"), deleted = exp.delete.len(), "scaled down");
    }
    if !exp.create.is_empty() || !exp.delete.is_empty() {
        ctx.expect.lock().unwrap().insert(uid.clone(), exp);
    }
    // Status from what the cache shows now; the next pass (our writes wake it) corrects it.
    let status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(active.len() as i32),
        ready_replicas: Some(active.iter().filter(|p| is_ready(p)).count() as i32),
        available_replicas: Some(active.iter().filter(|p| is_ready(p)).count() as i32),
        observed_generation: rs.metadata.generation,
        conditions: None,
    };
    if rs.status.as_ref() != Some(&status) {
        let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await?;
    }
    debug!(replicaset = %format!("{ns}/{name}"), active = active.len(), want, "reconciled");
    Ok(Action::await_change())
}

fn owner(rs: &ReplicaSet) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: rs.name_any(),
        uid: rs.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn error_policy(rs: Arc<ReplicaSet>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(replicaset = %rs.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let (pods, pod_events) = super::cached::<Pod>(&client);
    let controller = Controller::new(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    );
    let sets = controller.store();
    info!("ReplicaSet controller started");
    super::drain(
        "replicaset",
        controller
            // A pod change wakes its owner, or every set of its namespace (it may be adoptable).
            .watches_stream(pod_events, move |pod: Pod| {
                let ns = pod.namespace();
                let owner = pod
                    .owner_references()
                    .iter()
                    .find(|o| o.controller == Some(true) && o.kind == "ReplicaSet")
                    .map(|o| o.name.clone());
                sets.state()
                    .into_iter()
                    .filter(move |s| {
                        s.namespace() == ns && owner.as_ref().is_none_or(|o| *o == s.name_any())
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            })
            .run(
                reconcile,
                error_policy,
                Arc::new(Ctx {
                    client,
                    pods,
                    expect: Mutex::new(HashMap::new()),
                }),
            ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, created: &str, node: Option<&str>, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"containers": [], "nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn scale_down_removes_unscheduled_then_unready_then_newest() {
        let mut pods = [
            pod(
                "old-ready",
                "2026-01-01T00:00:00Z",
                Some("n"),
                "Running",
                true,
            ),
            pod(
                "new-ready",
                "2026-01-02T00:00:00Z",
                Some("n"),
                "Running",
                true,
            ),
            pod(
                "unready",
                "2025-01-01T00:00:00Z",
                Some("n"),
                "Running",
                false,
            ),
            pod(
                "unscheduled",
                "2024-01-01T00:00:00Z",
                None,
                "Pending",
                false,
            ),
        ];
        pods.sort_by_key(deletion_rank);
        let order: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        assert_eq!(order, ["unscheduled", "unready", "new-ready", "old-ready"]);
    }
}
