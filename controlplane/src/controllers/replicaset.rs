//! The ReplicaSet and ReplicationController controller: keeps exactly `spec.replicas` live
//! pods per set (one generic loop serves both kinds; they differ only in how the selector
//! is written).
//!
//! Pods are matched by the set's selector and owned through a controller ownerReference;
//! matching orphans are adopted. New pods get names chosen here, so the controller knows which
//! pods it is waiting to see: until its cache shows every pod it created (and no longer shows
//! those it deleted), it does not act on that set again. Without these expectations a
//! lagging cache would make it create a fourth pod where three were asked for. Scaling down
//! removes pods that are not scheduled, then not ready, then the newest.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, ReplicationController};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::pods::{
    controller_of, controller_ref, from_template, is_active, is_ready, owned_by, random_suffix,
    Expectations,
};
use ferry_common::selectors::LabelSelector;

/// A kind that keeps a number of pods from a template.
pub trait Replicated:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn selector(&self) -> Result<LabelSelector, String>;
    fn replicas(&self) -> i32;
    fn template(&self) -> PodTemplateSpec;
}

impl Replicated for ReplicaSet {
    fn selector(&self) -> Result<LabelSelector, String> {
        let sel = self.spec.as_ref().map(|s| &s.selector);
        LabelSelector::from_object(&serde_json::to_value(sel).unwrap_or_default())
    }
    fn replicas(&self) -> i32 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }
    fn template(&self) -> PodTemplateSpec {
        self.spec
            .as_ref()
            .and_then(|s| s.template.clone())
            .unwrap_or_default()
    }
}

impl Replicated for ReplicationController {
    /// A map of labels; without one, the template's labels (as Kubernetes defaults it).
    fn selector(&self) -> Result<LabelSelector, String> {
        let labels = self
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty())
            .or_else(|| self.template().metadata.and_then(|m| m.labels))
            .unwrap_or_default();
        LabelSelector::from_object(&json!({ "matchLabels": labels }))
    }
    fn replicas(&self) -> i32 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }
    fn template(&self) -> PodTemplateSpec {
        self.spec
            .as_ref()
            .and_then(|s| s.template.clone())
            .unwrap_or_default()
    }
}

struct Ctx {
    client: Client,
    pods: Store<Pod>,
    expect: Expectations,
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

async fn reconcile<K: Replicated>(rs: Arc<K>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.pods.wait_until_ready().await.ok();
    let ns = rs.namespace().unwrap_or_default();
    let name = rs.name_any();
    let kind = K::kind(&());
    let uid = rs.meta().uid.clone().unwrap_or_default();
    if rs.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let selector = match rs.selector() {
        Ok(s) if !s.is_empty() => s,
        _ => {
            warn!(%kind, set = %format!("{ns}/{name}"), "invalid or empty selector; nothing to do");
            return Ok(Action::await_change());
        }
    };
    let pods = super::pods::in_namespace(&ctx.pods, &ns);
    let names: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
    // Wait for the cache to catch up with our own creates and deletes.
    if !ctx.expect.satisfied(&uid, &names) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut mine: Vec<Arc<Pod>> = Vec::new();
    for p in &pods {
        let labels = p.labels().clone();
        if owned_by(&**p, &uid) {
            if selector.matches(&labels) {
                mine.push(p.clone());
            }
        } else if controller_of(&**p).is_none() && selector.matches(&labels) && is_active(p) {
            // Adopt a matching orphan.
            let patch = json!({"metadata": {"ownerReferences": [controller_ref(&*rs)]}});
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
    let want = rs.replicas().max(0) as usize;
    if active.len() < want {
        let mut created = 0;
        let template = rs.template();
        for _ in active.len()..want {
            let pod_name = format!("{name}-{}", random_suffix());
            let pod = from_template(
                &template,
                &ns,
                pod_name.clone(),
                controller_ref(&*rs),
                BTreeMap::new(),
            );
            match pod_api.create(&PostParams::default(), &pod).await {
                Ok(_) => {
                    ctx.expect.created(&uid, pod_name);
                    created += 1;
                }
                Err(e) => {
                    warn!(%kind, set = %format!("{ns}/{name}"), error = %e, "creating a pod");
                    break;
                }
            }
        }
        info!(%kind, set = %format!("{ns}/{name}"), created, "scaled up");
    } else if active.len() > want {
        let mut victims = active.clone();
        victims.sort_by_key(|p| deletion_rank(p));
        let mut deleted = 0;
        for p in victims.into_iter().take(active.len() - want) {
            match pod_api
                .delete(&p.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    ctx.expect.deleted(&uid, p.name_any());
                    deleted += 1;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        info!(%kind, set = %format!("{ns}/{name}"), deleted, "scaled down");
    }
    // Status from what the cache shows now; the next pass (our writes wake it) corrects it.
    let ready = active.iter().filter(|p| is_ready(p)).count();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": active.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "observedGeneration": rs.meta().generation,
    });
    super::pods::write_status(&ctx.client, &*rs, status).await?;
    debug!(%kind, set = %format!("{ns}/{name}"), active = active.len(), want, "reconciled");
    Ok(Action::await_change())
}

fn error_policy<K: Replicated>(rs: Arc<K>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(kind = %K::kind(&()), set = %rs.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Runs the controller for one kind (ReplicaSet or ReplicationController).
pub async fn run<K: Replicated>(client: Client) -> anyhow::Result<()> {
    let kind = K::kind(&()).into_owned();
    let (pods, pod_events) = super::cached::<Pod>(&client);
    let controller = Controller::new(Api::<K>::all(client.clone()), watcher::Config::default());
    let sets = controller.store();
    info!(%kind, "replica controller started");
    let owner_kind = kind.clone();
    super::drain(
        &kind,
        controller
            // A pod change wakes its owner, or every set of its namespace (it may be adoptable).
            .watches_stream(pod_events, move |pod: Pod| {
                let ns = pod.namespace();
                let owner = controller_of(&pod).map(|o| (o.kind.clone(), o.name.clone()));
                let owner_kind = owner_kind.clone();
                sets.state()
                    .into_iter()
                    .filter(move |s| {
                        s.namespace() == ns
                            && owner
                                .as_ref()
                                .is_none_or(|(k, n)| *k == owner_kind && *n == s.name_any())
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            })
            .run(
                reconcile::<K>,
                error_policy::<K>,
                Arc::new(Ctx {
                    client,
                    pods,
                    expect: Expectations::default(),
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
