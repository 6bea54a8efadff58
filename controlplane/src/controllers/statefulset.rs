//! The StatefulSet controller: pods with stable names `<set>-0` .. `<set>-N-1`, each with
//! `hostname` = its name and `subdomain` = the set's `serviceName`, so the headless Service
//! gives each a stable DNS name (`<set>-<i>.<service>`; the endpoints controller publishes
//! the hostnames in the Service's EndpointSlices).
//!
//! `podManagementPolicy: OrderedReady` (the default) creates pod i only when pods 0..i are
//! Running and Ready, and removes pods from the highest ordinal down, one at a time;
//! `Parallel` creates and removes them all at once. A changed template rolls out from the
//! highest ordinal down to `partition`, one pod at a time, each replaced once the others
//! are ready (`OnDelete`: pods are replaced when deleted by hand). A failed pod is replaced.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::pods::{controller_ref, from_template, hash, is_ready, owned_by, owner_to_wake, phase};

const REVISION_LABEL: &str = "controller-revision-hash";

struct Ctx {
    client: Client,
    pods: Store<Pod>,
}

fn ordinal(set: &str, pod: &str) -> Option<usize> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn running_and_ready(p: &Pod) -> bool {
    phase(p) == Some("Running") && is_ready(p) && p.metadata.deletion_timestamp.is_none()
}

/// One pass's decision, from the pods by ordinal (a pure function, tested below).
#[derive(Debug, PartialEq)]
enum Act {
    Create(Vec<usize>),
    Delete(Vec<usize>),
    Wait,
}

struct View<'a> {
    replicas: usize,
    parallel: bool,
    rolling: bool,
    partition: usize,
    revision: &'a str,
    pods: &'a BTreeMap<usize, Arc<Pod>>,
}

fn decide(v: &View) -> Act {
    let revision_of = |p: &Pod| p.labels().get(REVISION_LABEL).cloned().unwrap_or_default();
    let terminating = |p: &Pod| p.metadata.deletion_timestamp.is_some();
    // Failed pods are replaced: delete them first.
    let failed: Vec<usize> = v
        .pods
        .iter()
        .filter(|(_, p)| phase(p) == Some("Failed") && !terminating(p))
        .map(|(i, _)| *i)
        .collect();
    if !failed.is_empty() {
        return Act::Delete(failed);
    }
    // Scale up / fill gaps, in order.
    let mut create = Vec::new();
    for i in 0..v.replicas {
        match v.pods.get(&i) {
            None => {
                create.push(i);
                if !v.parallel {
                    break;
                }
            }
            Some(p) if !v.parallel && !running_and_ready(p) => break,
            Some(_) => {}
        }
    }
    if !create.is_empty() {
        return Act::Create(create);
    }
    // Scale down, from the highest ordinal.
    let extra: Vec<usize> = v
        .pods
        .keys()
        .rev()
        .copied()
        .filter(|i| *i >= v.replicas)
        .collect();
    if !extra.is_empty() {
        if v.parallel {
            let go: Vec<usize> = extra
                .into_iter()
                .filter(|i| !terminating(&v.pods[i]))
                .collect();
            return if go.is_empty() {
                Act::Wait
            } else {
                Act::Delete(go)
            };
        }
        // One at a time, only while everything else is healthy.
        let all_ready = v.pods.values().all(|p| running_and_ready(p));
        return if all_ready {
            Act::Delete(vec![extra[0]])
        } else {
            Act::Wait
        };
    }
    // Rolling update, from the highest ordinal down to the partition.
    if v.rolling {
        if !v.pods.values().all(|p| running_and_ready(p)) {
            return Act::Wait;
        }
        if let Some(i) = (v.partition..v.replicas)
            .rev()
            .find(|i| v.pods.get(i).is_some_and(|p| revision_of(p) != v.revision))
        {
            return Act::Delete(vec![i]);
        }
    }
    Act::Wait
}

async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.pods.wait_until_ready().await.ok();
    let ns = sts.namespace().unwrap_or_default();
    let name = sts.name_any();
    let uid = sts.metadata.uid.clone().unwrap_or_default();
    if sts.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = sts.spec.clone().unwrap_or_default();
    let revision = format!("{name}-{}", hash(&spec.template));
    let pods: BTreeMap<usize, Arc<Pod>> = super::pods::in_namespace(&ctx.pods, &ns)
        .into_iter()
        .filter(|p| owned_by(&**p, &uid))
        .filter_map(|p| ordinal(&name, &p.name_any()).map(|i| (i, p)))
        .collect();
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let view = View {
        replicas: spec.replicas.unwrap_or(1).max(0) as usize,
        parallel: spec.pod_management_policy.as_deref() == Some("Parallel"),
        rolling: strategy.type_.as_deref() != Some("OnDelete"),
        partition: strategy
            .rolling_update
            .and_then(|r| r.partition)
            .unwrap_or(0)
            .max(0) as usize,
        revision: &revision,
        pods: &pods,
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match decide(&view) {
        Act::Create(list) => {
            for i in list {
                let pod_name = format!("{name}-{i}");
                let labels = BTreeMap::from([
                    (REVISION_LABEL.to_string(), revision.clone()),
                    (
                        "statefulset.kubernetes.io/pod-name".to_string(),
                        pod_name.clone(),
                    ),
                    ("apps.kubernetes.io/pod-index".to_string(), i.to_string()),
                ]);
                let mut pod = from_template(
                    &spec.template,
                    &ns,
                    pod_name.clone(),
                    controller_ref(&*sts),
                    labels,
                );
                if let Some(ps) = pod.spec.as_mut() {
                    ps.hostname = Some(pod_name.clone());
                    if !spec.service_name.clone().unwrap_or_default().is_empty() {
                        ps.subdomain = spec.service_name.clone();
                    }
                }
                match api.create(&PostParams::default(), &pod).await {
                    Ok(_) => {
                        info!(statefulset = %format!("{ns}/{name}"), pod = %pod_name, "created")
                    }
                    // The cache has not shown it yet.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Act::Delete(list) => {
            for i in list {
                let pod_name = format!("{name}-{i}");
                match api.delete(&pod_name, &DeleteParams::default()).await {
                    Ok(_) => {
                        info!(statefulset = %format!("{ns}/{name}"), pod = %pod_name, "deleted")
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Act::Wait => {}
    }
    let live: Vec<&Arc<Pod>> = pods
        .values()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let updated = live
        .iter()
        .filter(|p| p.labels().get(REVISION_LABEL) == Some(&revision))
        .count();
    let ready = live.iter().filter(|p| is_ready(p)).count();
    let all_updated = updated == view.replicas && live.len() == view.replicas;
    let current_revision = if all_updated {
        revision.clone()
    } else {
        sts.status
            .as_ref()
            .and_then(|s| s.current_revision.clone())
            .unwrap_or_else(|| revision.clone())
    };
    let current = live
        .iter()
        .filter(|p| p.labels().get(REVISION_LABEL) == Some(&current_revision))
        .count();
    let status = json!({
        "replicas": live.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "currentReplicas": current,
        "updatedReplicas": updated,
        "currentRevision": current_revision,
        "updateRevision": revision,
        "observedGeneration": sts.metadata.generation,
    });
    super::pods::write_status(&ctx.client, &*sts, status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

fn error_policy(sts: Arc<StatefulSet>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(statefulset = %sts.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let (pods, pod_events) = super::cached::<Pod>(&client);
    let controller = Controller::new(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    );
    info!("StatefulSet controller started");
    super::drain(
        "statefulset",
        controller
            .watches_stream(pod_events, |pod: Pod| owner_to_wake::<StatefulSet, _>(&pod))
            .run(reconcile, error_policy, Arc::new(Ctx { client, pods })),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(i: usize, state: &str, rev: &str) -> (usize, Arc<Pod>) {
        let (phase, ready, deleting) = match state {
            "ready" => ("Running", "True", false),
            "starting" => ("Pending", "False", false),
            "failed" => ("Failed", "False", false),
            "terminating" => ("Running", "True", true),
            _ => unreachable!(),
        };
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("web-{i}"), "labels": {REVISION_LABEL: rev}},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap();
        if deleting {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::chrono::Utc::now(),
                ));
        }
        (i, Arc::new(p))
    }

    fn view(replicas: usize, parallel: bool, pods: &BTreeMap<usize, Arc<Pod>>) -> View<'_> {
        View {
            replicas,
            parallel,
            rolling: true,
            partition: 0,
            revision: "new",
            pods,
        }
    }

    #[test]
    fn ordered_ready_creates_one_at_a_time_after_the_previous_is_ready() {
        let none = BTreeMap::new();
        assert_eq!(decide(&view(3, false, &none)), Act::Create(vec![0]));
        let p: BTreeMap<_, _> = [pod(0, "starting", "new")].into_iter().collect();
        assert_eq!(decide(&view(3, false, &p)), Act::Wait);
        let p: BTreeMap<_, _> = [pod(0, "ready", "new")].into_iter().collect();
        assert_eq!(decide(&view(3, false, &p)), Act::Create(vec![1]));
        // Parallel: all at once.
        assert_eq!(decide(&view(3, true, &none)), Act::Create(vec![0, 1, 2]));
    }

    #[test]
    fn scale_down_removes_the_highest_ordinal_first_one_at_a_time() {
        let p: BTreeMap<_, _> = (0..3).map(|i| pod(i, "ready", "new")).collect();
        assert_eq!(decide(&view(1, false, &p)), Act::Delete(vec![2]));
        let p: BTreeMap<_, _> = [
            pod(0, "ready", "new"),
            pod(1, "ready", "new"),
            pod(2, "terminating", "new"),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            decide(&view(1, false, &p)),
            Act::Wait,
            "wait for web-2 to go"
        );
        let p: BTreeMap<_, _> = (0..3).map(|i| pod(i, "ready", "new")).collect();
        assert_eq!(decide(&view(1, true, &p)), Act::Delete(vec![2, 1]));
    }

    #[test]
    fn rolling_update_goes_down_from_the_highest_ordinal_to_the_partition() {
        let p: BTreeMap<_, _> = (0..3).map(|i| pod(i, "ready", "old")).collect();
        assert_eq!(decide(&view(3, false, &p)), Act::Delete(vec![2]));
        let p: BTreeMap<_, _> = [
            pod(0, "ready", "old"),
            pod(1, "ready", "old"),
            pod(2, "ready", "new"),
        ]
        .into_iter()
        .collect();
        assert_eq!(decide(&view(3, false, &p)), Act::Delete(vec![1]));
        let mut v = view(3, false, &p);
        v.partition = 2;
        assert_eq!(
            decide(&v),
            Act::Wait,
            "ordinals below the partition keep the old revision"
        );
        let p: BTreeMap<_, _> = [
            pod(0, "ready", "new"),
            pod(1, "failed", "old"),
            pod(2, "ready", "new"),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            decide(&view(3, false, &p)),
            Act::Delete(vec![1]),
            "a failed pod is replaced"
        );
    }
}
