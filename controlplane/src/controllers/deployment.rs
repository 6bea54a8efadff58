//! The Deployment controller: one ReplicaSet per pod template (named by the template's hash,
//! labelled `pod-template-hash`), rolled with the Deployment's strategy:
//! - RollingUpdate: the new set grows while the total stays within replicas + maxSurge, old
//!   sets shrink while the available pods stay at or above replicas - maxUnavailable;
//! - Recreate: old sets go to zero first, the new one grows once their pods are gone.
//!
//! Each set carries `deployment.kubernetes.io/revision`; sets beyond `revisionHistoryLimit` with
//! no replicas are deleted. `kubectl rollout status|history|undo` work from these.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH: &str = "pod-template-hash";

struct Ctx {
    client: Client,
    sets: Store<ReplicaSet>,
}

/// A stable hash of the pod template, as the new set's name suffix and label.
fn template_hash(d: &Deployment) -> String {
    super::pods::hash(&d.spec.as_ref().map(|s| &s.template))
}

/// maxSurge / maxUnavailable: an int, or a percentage of `replicas` (surge rounds up,
/// unavailability down, as Kubernetes does).
fn scaled(v: Option<&IntOrString>, replicas: i32, round_up: bool, default_pct: i32) -> i32 {
    let pct = |p: i32| {
        let x = replicas as i64 * p as i64;
        (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
    };
    match v {
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => s
            .trim_end_matches('%')
            .parse::<i32>()
            .map(pct)
            .unwrap_or_else(|_| pct(default_pct)),
        None => pct(default_pct),
    }
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

async fn scale(api: &Api<ReplicaSet>, rs: &ReplicaSet, to: i32) -> kube::Result<()> {
    if replicas(rs) != to {
        debug!(replicaset = %rs.name_any(), from = replicas(rs), to, "scaling");
        let patch = json!({"spec": {"replicas": to}});
        api.patch(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.sets.wait_until_ready().await.ok();
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1);
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let mut sets: Vec<Arc<ReplicaSet>> = ctx
        .sets
        .state()
        .into_iter()
        .filter(|rs| {
            rs.namespace().as_deref() == Some(ns.as_str())
                && rs
                    .owner_references()
                    .iter()
                    .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .collect();
    sets.sort_by_key(|rs| revision(rs));
    let hash = template_hash(&d);
    let max_rev = sets.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let new = sets
        .iter()
        .find(|rs| rs.labels().get(HASH) == Some(&hash))
        .cloned();
    let new = match new {
        Some(rs) => {
            // A rollback to an older template makes that set the newest revision again.
            if revision(&rs) < max_rev {
                let patch =
                    json!({"metadata": {"annotations": {REVISION: (max_rev + 1).to_string()}}});
                rs_api
                    .patch(
                        &rs.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            rs
        }
        None => {
            let mut template = spec.template.clone();
            let mut labels = template
                .metadata
                .clone()
                .unwrap_or_default()
                .labels
                .unwrap_or_default();
            labels.insert(HASH.into(), hash.clone());
            template
                .metadata
                .get_or_insert_with(Default::default)
                .labels = Some(labels.clone());
            let mut selector = spec.selector.clone();
            selector
                .match_labels
                .get_or_insert_with(BTreeMap::new)
                .insert(HASH.into(), hash.clone());
            let first = sets.is_empty();
            let rs = ReplicaSet {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{hash}")),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        REVISION.to_string(),
                        (max_rev + 1).to_string(),
                    )])),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "Deployment".into(),
                        name: name.clone(),
                        uid: uid.clone(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]),
                    ..Default::default()
                },
                spec: Some(ReplicaSetSpec {
                    replicas: Some(if first { want } else { 0 }),
                    selector,
                    template: Some(template),
                    min_ready_seconds: spec.min_ready_seconds,
                }),
                status: None,
            };
            info!(deployment = %format!("{ns}/{name}"), replicaset = %format!("{name}-{hash}"), revision = max_rev + 1, "new ReplicaSet");
            match rs_api.create(&PostParams::default(), &rs).await {
                Ok(created) => Arc::new(created),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Ok(Action::requeue(Duration::from_millis(200)))
                }
                Err(e) => return Err(e),
            }
        }
    };
    let olds: Vec<Arc<ReplicaSet>> = sets
        .iter()
        .filter(|rs| rs.uid() != new.uid())
        .cloned()
        .collect();
    let strategy = spec.strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref() == Some("Recreate") {
        for rs in &olds {
            scale(&rs_api, rs, 0).await?;
        }
        let old_pods: i32 = olds
            .iter()
            .map(|rs| rs.status.as_ref().map_or(0, |s| s.replicas))
            .sum();
        if old_pods == 0 {
            scale(&rs_api, &new, want).await?;
        }
    } else {
        let ru = strategy.rolling_update.unwrap_or_default();
        let surge = scaled(ru.max_surge.as_ref(), want, true, 25);
        let mut unavailable = scaled(ru.max_unavailable.as_ref(), want, false, 25);
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        // Grow the new set within replicas + maxSurge.
        let total: i32 = sets
            .iter()
            .map(|rs| replicas(rs))
            .sum::<i32>()
            .max(replicas(&new));
        let new_replicas = replicas(&new);
        if new_replicas < want {
            let room = (want + surge - total).max(0);
            let to = (new_replicas + room).min(want);
            scale(&rs_api, &new, to).await?;
        } else if new_replicas > want {
            scale(&rs_api, &new, want).await?;
        }
        // Shrink old sets while availability stays at replicas - maxUnavailable.
        let avail: i32 = sets.iter().map(|rs| available(rs)).sum();
        let mut can_remove = (avail - (want - unavailable)).max(0);
        for rs in &olds {
            // Pods that are not available cost nothing to remove.
            let unhealthy = (replicas(rs) - available(rs)).max(0);
            let cut = (unhealthy + can_remove).min(replicas(rs));
            if cut > 0 {
                scale(&rs_api, rs, replicas(rs) - cut).await?;
                can_remove -= (cut - unhealthy).max(0);
            }
        }
    }
    // History: keep revisionHistoryLimit old sets without replicas.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let idle: Vec<&Arc<ReplicaSet>> = olds
        .iter()
        .filter(|rs| replicas(rs) == 0 && rs.status.as_ref().is_none_or(|s| s.replicas == 0))
        .collect();
    if idle.len() > limit {
        for rs in &idle[..idle.len() - limit] {
            let _ = rs_api
                .delete(&rs.name_any(), &DeleteParams::default())
                .await;
        }
    }
    // Status, from the sets as the cache shows them.
    let status_of = |f: &dyn Fn(&ReplicaSet) -> i32| sets.iter().map(|rs| f(rs)).sum::<i32>();
    let total_pods = status_of(&|rs| rs.status.as_ref().map_or(0, |s| s.replicas));
    let ready = status_of(&|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let avail = status_of(&|rs| available(rs));
    let updated = sets
        .iter()
        .find(|rs| rs.uid() == new.uid())
        .and_then(|rs| rs.status.as_ref().map(|s| s.replicas))
        .unwrap_or(0);
    let complete = updated == want && total_pods == want && avail == want;
    let now = ferry_common::time::now_rfc3339();
    let status = json!({"status": {
        "observedGeneration": d.metadata.generation,
        "replicas": total_pods, "updatedReplicas": updated, "readyReplicas": ready,
        "availableReplicas": avail, "unavailableReplicas": (want - avail).max(0),
        "conditions": [
            {"type": "Available", "status": if avail >= want - scaled(None, want, false, 25) { "True" } else { "False" },
             "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability.",
             "lastUpdateTime": now, "lastTransitionTime": now},
            {"type": "Progressing", "status": "True",
             "reason": if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
             "message": format!("ReplicaSet \"{}\" {}.", new.name_any(), if complete { "has successfully progressed" } else { "is progressing" }),
             "lastUpdateTime": now, "lastTransitionTime": now}]}});
    let d_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let cur = d.status.clone().unwrap_or_default();
    let changed = cur.observed_generation != d.metadata.generation
        || cur.replicas != Some(total_pods)
        || cur.updated_replicas != Some(updated)
        || cur.ready_replicas != Some(ready)
        || cur.available_replicas != Some(avail);
    if changed {
        d_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    if revision(&new) > 0 && d.annotations().get(REVISION) != Some(&revision(&new).to_string()) {
        let patch = json!({"metadata": {"annotations": {REVISION: revision(&new).to_string()}}});
        d_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(if complete {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(2))
    })
}

fn error_policy(d: Arc<Deployment>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(deployment = %d.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let (sets, set_events) = super::cached::<ReplicaSet>(&client);
    let controller = Controller::new(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns_stream(set_events);
    info!("Deployment controller started");
    super::drain(
        "deployment",
        controller.run(reconcile, error_policy, Arc::new(Ctx { client, sets })),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_rounds_up_unavailability_down() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(scaled(Some(&pct("25%")), 3, true, 25), 1);
        assert_eq!(scaled(Some(&pct("25%")), 3, false, 25), 0);
        assert_eq!(scaled(Some(&IntOrString::Int(2)), 3, false, 25), 2);
        assert_eq!(scaled(None, 10, true, 25), 3);
    }
}
