//! The DaemonSet controller: one pod per node the template may run on.
//!
//! Where a pod belongs is decided as kube-scheduler would without load: the node must not be
//! cordoned, its taints tolerated and its labels match the template's nodeSelector and node
//! affinity. Pods get the tolerations Kubernetes gives daemon pods (not-ready and unreachable
//! without eviction, pressure conditions, cordoned nodes) and a required node affinity on
//! their node's name, so the scheduler binds each to its node. A pod on a node that no longer
//! qualifies is deleted. A changed template rolls out node by node, at most `maxUnavailable`
//! nodes without a ready pod at a time (`updateStrategy: OnDelete` waits for pods to be
//! deleted by hand).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::pods::{
    controller_ref, from_template, hash, is_active, is_ready, owned_by, Expectations,
};
use crate::scheduler::framework::{node_constraints, NodeState};
use ferry_common::selectors::LabelSelector;

pub const REVISION_LABEL: &str = "controller-revision-hash";

struct Ctx {
    client: Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    expect: Expectations,
}

/// The tolerations every daemon pod gets (Kubernetes' list).
fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    let mut v = vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        v.push(t("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    v
}

/// The template as its pods are made: daemon tolerations added.
fn daemon_template(ds: &DaemonSet) -> PodTemplateSpec {
    let mut t = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let spec = t.spec.get_or_insert_with(Default::default);
    let mut tol = spec.tolerations.clone().unwrap_or_default();
    for d in daemon_tolerations(spec.host_network == Some(true)) {
        if !tol.iter().any(|x| x.key == d.key && x.effect == d.effect) {
            tol.push(d);
        }
    }
    spec.tolerations = Some(tol);
    t
}

/// The template pinned to one node through a required node affinity on its name.
fn pod_for_node(template: &PodTemplateSpec, node: &str) -> PodTemplateSpec {
    let mut t = template.clone();
    let spec = t.spec.get_or_insert_with(Default::default);
    let affinity = spec.affinity.get_or_insert_with(Default::default);
    let na = affinity.node_affinity.get_or_insert_with(Default::default);
    na.required_during_scheduling_ignored_during_execution = Some(serde_json::from_value(json!({
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]
    })).expect("a valid node selector"));
    t
}

/// The node a daemon pod is for: where it is bound, or the node its affinity names.
fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.clone().filter(|n| !n.is_empty()) {
        return Some(n);
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

fn max_unavailable(ds: &DaemonSet, desired: usize) -> usize {
    let v = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone());
    let n = match v {
        Some(IntOrString::Int(n)) => n.max(0) as usize,
        Some(IntOrString::String(p)) => {
            let pct: usize = p.trim_end_matches('%').parse().unwrap_or(0);
            desired * pct / 100
        }
        None => 1,
    };
    n.max(1)
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.pods.wait_until_ready().await.ok();
    ctx.nodes.wait_until_ready().await.ok();
    let ns = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let selector = match LabelSelector::from_object(
        &serde_json::to_value(ds.spec.as_ref().map(|s| &s.selector)).unwrap_or_default(),
    ) {
        Ok(s) if !s.is_empty() => s,
        _ => {
            warn!(daemonset = %format!("{ns}/{name}"), "invalid or empty selector; nothing to do");
            return Ok(Action::await_change());
        }
    };
    let pods = super::pods::in_namespace(&ctx.pods, &ns);
    let names: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
    if !ctx.expect.satisfied(&uid, &names) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let template = daemon_template(&ds);
    let revision = hash(&ds.spec.as_ref().map(|s| &s.template));
    let probe = Pod {
        metadata: Default::default(),
        spec: template.spec.clone(),
        status: None,
    };
    // Nodes the pods belong on.
    let mut eligible: BTreeMap<String, ()> = BTreeMap::new();
    for node in ctx.nodes.state() {
        if node_constraints(&probe, &NodeState::new((*node).clone())).is_ok() {
            eligible.insert(node.name_any(), ());
        }
    }
    // This set's live pods by node.
    let mut by_node: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
    for p in pods
        .iter()
        .filter(|p| owned_by(&***p, &uid) && is_active(p))
    {
        if !selector.matches(p.labels()) {
            continue;
        }
        if let Some(n) = target_node(p) {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let delete = |pod: String| {
        let api = api.clone();
        async move {
            match api.delete(&pod, &DeleteParams::default()).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
                Err(e) => Err(e),
            }
        }
    };
    let (mut created, mut deleted) = (0, 0);
    // Misscheduled: pods on nodes that no longer qualify; duplicates on one node.
    let misscheduled = by_node
        .iter()
        .filter(|(n, _)| !eligible.contains_key(*n))
        .map(|(_, v)| v.len())
        .sum::<usize>();
    for (node, list) in &by_node {
        let extra: Vec<&Arc<Pod>> = if eligible.contains_key(node) {
            let mut l: Vec<&Arc<Pod>> = list.iter().collect();
            // Keep the updated, ready, oldest one.
            l.sort_by_key(|p| {
                (
                    p.labels().get(REVISION_LABEL) != Some(&revision),
                    !is_ready(p),
                    p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                )
            });
            l.into_iter().skip(1).collect()
        } else {
            list.iter().collect()
        };
        for p in extra {
            if delete(p.name_any()).await? {
                ctx.expect.deleted(&uid, p.name_any());
                deleted += 1;
            }
        }
    }
    // Missing pods.
    for node in eligible.keys() {
        if by_node.get(node).is_some_and(|l| !l.is_empty()) {
            continue;
        }
        let pod_name = format!("{name}-{}", super::pods::random_suffix());
        let labels = BTreeMap::from([(REVISION_LABEL.to_string(), revision.clone())]);
        let pod = from_template(
            &pod_for_node(&template, node),
            &ns,
            pod_name.clone(),
            controller_ref(&*ds),
            labels,
        );
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                ctx.expect.created(&uid, pod_name);
                created += 1;
            }
            Err(e) => {
                warn!(daemonset = %format!("{ns}/{name}"), %node, error = %e, "creating a pod")
            }
        }
    }
    // Rolling update: replace old pods while few enough nodes are without a ready pod.
    let on_delete = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref())
        == Some("OnDelete");
    let current = |n: &str| -> Option<&Arc<Pod>> { by_node.get(n).and_then(|l| l.first()) };
    let unavailable = eligible
        .keys()
        .filter(|n| current(n).is_none_or(|p| !is_ready(p)))
        .count();
    if !on_delete {
        let budget = max_unavailable(&ds, eligible.len()).saturating_sub(unavailable);
        // Not-ready old pods first: replacing them costs no availability.
        let mut old: Vec<&Arc<Pod>> = eligible
            .keys()
            .filter_map(|n| current(n))
            .filter(|p| p.labels().get(REVISION_LABEL) != Some(&revision))
            .collect();
        old.sort_by_key(|p| is_ready(p));
        let mut spent = 0;
        for p in old {
            let costs = is_ready(p) as usize;
            if spent + costs > budget {
                break;
            }
            if delete(p.name_any()).await? {
                ctx.expect.deleted(&uid, p.name_any());
                deleted += 1;
                spent += costs;
            }
        }
    }
    if created + deleted > 0 {
        info!(daemonset = %format!("{ns}/{name}"), created, deleted, nodes = eligible.len(), "daemon pods");
    }
    let scheduled = eligible.keys().filter(|n| current(n).is_some()).count();
    let ready = eligible
        .keys()
        .filter(|n| current(n).is_some_and(|p| is_ready(p)))
        .count();
    let updated = eligible
        .keys()
        .filter(|n| current(n).is_some_and(|p| p.labels().get(REVISION_LABEL) == Some(&revision)))
        .count();
    let status = json!({
        "desiredNumberScheduled": eligible.len(),
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "updatedNumberScheduled": updated,
        "numberAvailable": ready,
        "numberUnavailable": eligible.len() - ready,
        "observedGeneration": ds.metadata.generation,
    });
    super::pods::write_status(&ctx.client, &*ds, status).await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn error_policy(ds: Arc<DaemonSet>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(daemonset = %ds.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let (pods, pod_events) = super::cached::<Pod>(&client);
    let (nodes, node_events) = super::cached::<Node>(&client);
    let controller = Controller::new(
        Api::<DaemonSet>::all(client.clone()),
        watcher::Config::default(),
    );
    let sets = controller.store();
    let all_sets = sets.clone();
    info!("DaemonSet controller started");
    super::drain(
        "daemonset",
        controller
            .watches_stream(pod_events, |pod: Pod| {
                super::pods::owner_to_wake::<DaemonSet, _>(&pod)
            })
            // A node change may add or remove a place for every set.
            .watches_stream(node_events, move |_node: Node| {
                all_sets
                    .state()
                    .into_iter()
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            })
            .run(
                reconcile,
                error_policy,
                Arc::new(Ctx {
                    client,
                    pods,
                    nodes,
                    expect: Expectations::default(),
                }),
            ),
    )
    .await;
    drop(sets);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_pods_tolerate_what_kubernetes_gives_them_and_target_their_node() {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "agent"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}}
        }))
        .unwrap();
        let t = daemon_template(&ds);
        let tol = t.spec.as_ref().unwrap().tolerations.clone().unwrap();
        assert!(tol
            .iter()
            .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unschedulable")));
        let pinned = pod_for_node(&t, "n7");
        let pod = Pod {
            spec: pinned.spec,
            ..Default::default()
        };
        assert_eq!(target_node(&pod).as_deref(), Some("n7"));
        let pod = Pod {
            spec: t.spec.clone(),
            ..Default::default()
        };
        // A cordoned node still gets its daemon pod; a tainted one does not.
        let node = |extra: serde_json::Value| -> NodeState {
            let mut n = json!({"metadata": {"name": "n"}, "spec": {},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
            json_patch::merge(&mut n, &extra);
            NodeState::new(serde_json::from_value(n).unwrap())
        };
        assert!(node_constraints(&pod, &node(json!({"spec": {"unschedulable": true}}))).is_ok());
        assert!(node_constraints(
            &pod,
            &node(json!({"spec": {"taints": [{"key": "gpu", "effect": "NoSchedule"}]}}))
        )
        .is_err());
    }
}
