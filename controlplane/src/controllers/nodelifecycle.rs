//! The node lifecycle controller: notices nodes whose kubelet went silent and moves work off
//! them, as Kubernetes' does.
//!
//! - Heartbeats are the node's Lease in `kube-node-lease` (renewed every ~10 s by a kubelet)
//!   and its Ready condition's heartbeat; a node is *probed* when either changes, on this
//!   controller's own clock. A node not probed for the grace period (40 s) gets its
//!   conditions set to Unknown ("Kubelet stopped posting node status.").
//! - A node whose Ready condition is not True is tainted: `node.kubernetes.io/unreachable`
//!   (Unknown) or `node.kubernetes.io/not-ready` (False), NoSchedule so nothing new lands there
//!   and NoExecute for eviction. The taints go when it is Ready again.
//! - The pods of such a node get Ready=False at once, so the endpoints controller takes them
//!   out of Services' endpoints and traffic leaves them.
//! - Eviction: a pod on a node with a NoExecute taint it does not tolerate is deleted; one
//!   that tolerates it for `tolerationSeconds` (every pod gets 300 s by default at admission)
//!   is deleted when that time has passed since the taint was added. Its controller replaces it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::scheduler::framework::tolerates;
use ferry_common::events::{self, Recorder};

pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
type Stamp = k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>;
const LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Clone, Debug)]
pub struct Options {
    /// How long a node may stay silent before it is marked Unknown.
    pub grace_period: Duration,
    /// How often nodes are checked.
    pub monitor_period: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            grace_period: Duration::from_secs(40),
            monitor_period: Duration::from_secs(5),
        }
    }
}

/// The last heartbeat seen from a node and when it was seen (on our clock).
struct Probe {
    lease_renew: Option<MicroTime>,
    ready_heartbeat: Option<Time>,
    at: Instant,
}

fn ready_status(node: &Node) -> Option<&str> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str())
}

fn pods_on<'a>(
    pods: &'a [std::sync::Arc<Pod>],
    node: &'a str,
) -> impl Iterator<Item = &'a std::sync::Arc<Pod>> {
    pods.iter().filter(move |p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && p.metadata.deletion_timestamp.is_none()
    })
}

/// The taints a node should carry for its Ready status, with the time they were first added.
fn wanted_taints(node: &Node) -> Vec<Taint> {
    let key = match ready_status(node) {
        Some("True") => return Vec::new(),
        Some("Unknown") => UNREACHABLE,
        _ => NOT_READY,
    };
    let existing = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    ["NoSchedule", "NoExecute"]
        .into_iter()
        .map(|effect| {
            existing
                .iter()
                .find(|t| t.key == key && t.effect == effect)
                .cloned()
                .unwrap_or_else(|| Taint {
                    key: key.into(),
                    effect: effect.into(),
                    time_added: (effect == "NoExecute")
                        .then(|| Time(k8s_openapi::chrono::Utc::now())),
                    value: None,
                })
        })
        .collect()
}

/// When a pod on a node with these NoExecute taints must go: now (None tolerated), at a
/// time (the shortest tolerationSeconds counted from each taint's timeAdded), or never.
fn eviction_deadline(pod: &Pod, taints: &[Taint]) -> Option<Stamp> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let mut deadline: Option<Stamp> = None;
    for t in taints.iter().filter(|t| t.effect == "NoExecute") {
        let matching: Vec<_> = tolerations
            .iter()
            .filter(|tol| tolerates(std::slice::from_ref(*tol), t))
            .collect();
        let added = t
            .time_added
            .as_ref()
            .map(|x| x.0)
            .unwrap_or_else(k8s_openapi::chrono::Utc::now);
        let at = if matching.is_empty() {
            Some(added)
        } else if matching.iter().any(|tol| tol.toleration_seconds.is_none()) {
            None // tolerated forever
        } else {
            let secs = matching
                .iter()
                .filter_map(|tol| tol.toleration_seconds)
                .min()
                .unwrap_or(0)
                .max(0);
            Some(added + k8s_openapi::chrono::Duration::seconds(secs))
        };
        if let Some(at) = at {
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
    }
    deadline
}

struct Monitor {
    client: Client,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    opts: Options,
    probes: HashMap<String, Probe>,
    recorder: Recorder,
}

impl Monitor {
    async fn pass(&mut self) {
        let pods = self.pods.state();
        let nodes = self.nodes.state();
        let names: std::collections::HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
        self.probes.retain(|n, _| names.contains(n));
        for node in nodes {
            let name = node.name_any();
            if let Err(e) = self.check(&node, &name, &pods).await {
                warn!(node = %name, error = %e, "node lifecycle");
            }
        }
    }

    async fn check(
        &mut self,
        node: &Node,
        name: &str,
        pods: &[std::sync::Arc<Pod>],
    ) -> Result<(), kube::Error> {
        let lease_renew = self
            .leases
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(LEASE_NAMESPACE))
            .and_then(|l| l.spec.as_ref().and_then(|s| s.renew_time.clone()));
        let ready_heartbeat = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .and_then(|c| c.last_heartbeat_time.clone());
        let probe = self.probes.entry(name.to_string()).or_insert(Probe {
            lease_renew: lease_renew.clone(),
            ready_heartbeat: ready_heartbeat.clone(),
            at: Instant::now(),
        });
        if probe.lease_renew != lease_renew || probe.ready_heartbeat != ready_heartbeat {
            *probe = Probe {
                lease_renew,
                ready_heartbeat,
                at: Instant::now(),
            };
        }
        let silent = probe.at.elapsed() > self.opts.grace_period;
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let mut node = node.clone();
        if silent && ready_status(&node) != Some("Unknown") {
            let never = ready_status(&node).is_none();
            let now = Time(k8s_openapi::chrono::Utc::now());
            let mut conditions = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if never {
                conditions.push(Default::default());
                conditions.last_mut().expect("pushed").type_ = "Ready".into();
            }
            for c in &mut conditions {
                if ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"]
                    .contains(&c.type_.as_str())
                {
                    c.status = "Unknown".into();
                    c.reason = Some("NodeStatusUnknown".into());
                    c.message = Some(if never {
                        "Kubelet never posted node status.".into()
                    } else {
                        "Kubelet stopped posting node status.".into()
                    });
                    c.last_transition_time = Some(now.clone());
                }
            }
            info!(node = %name, grace = ?self.opts.grace_period, "node stopped posting status; marking it Unknown");
            node = nodes_api
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": {"conditions": conditions}})),
                )
                .await?;
            self.recorder.normal(
                events::reference(&node),
                "NodeNotReady",
                format!("Node {name} status is now: NodeNotReady"),
            );
        }
        // Taints follow the Ready condition.
        let wanted = wanted_taints(&node);
        let existing = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let mut taints: Vec<Taint> = existing
            .iter()
            .filter(|t| t.key != NOT_READY && t.key != UNREACHABLE)
            .cloned()
            .collect();
        taints.extend(wanted.iter().cloned());
        if taints != existing {
            info!(node = %name, taints = ?wanted.iter().map(|t| format!("{}:{}", t.key, t.effect)).collect::<Vec<_>>(), "node taints");
            node = nodes_api
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({
                        "metadata": {"resourceVersion": node.resource_version()},
                        "spec": {"taints": taints}})),
                )
                .await?;
        }
        if ready_status(&node) == Some("True") {
            return Ok(());
        }
        // Pods of a node that is not ready are not ready either.
        for pod in pods_on(pods, name) {
            let ready_true = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready_true {
                let conditions: Vec<serde_json::Value> = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|mut c| {
                        if c.type_ == "Ready" {
                            c.status = "False".into();
                            c.last_transition_time = Some(Time(k8s_openapi::chrono::Utc::now()));
                        }
                        serde_json::to_value(c).unwrap_or_default()
                    })
                    .collect();
                let api: Api<Pod> =
                    Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
                debug!(pod = %pod.name_any(), node = %name, "marking pod not ready");
                match api
                    .patch_status(
                        &pod.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"status": {"conditions": conditions}})),
                    )
                    .await
                {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Eviction by NoExecute taints.
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let now = k8s_openapi::chrono::Utc::now();
        for pod in pods_on(pods, name) {
            if eviction_deadline(pod, &taints).is_some_and(|d| d <= now) {
                let ns = pod.namespace().unwrap_or_default();
                info!(pod = %format!("{ns}/{}", pod.name_any()), node = %name, "evicting pod from a node that is not ready");
                self.recorder.normal(
                    events::reference(&**pod),
                    "TaintManagerEviction",
                    format!("Marking for deletion Pod {ns}/{}", pod.name_any()),
                );
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

pub async fn run(client: Client, opts: Options) -> anyhow::Result<()> {
    let (nodes, node_events) = super::cached::<Node>(&client);
    let (leases, lease_events) = super::cached::<Lease>(&client);
    let (pods, pod_events) = super::cached::<Pod>(&client);
    // The stores fill as their streams are polled.
    let feed = futures::stream::select(
        futures::stream::select(node_events.map(|_| ()), lease_events.map(|_| ())),
        pod_events.map(|_| ()),
    )
    .for_each(|_| std::future::ready(()));
    let mut m = Monitor {
        recorder: Recorder::new(client.clone(), "node-controller"),
        client,
        nodes,
        leases,
        pods,
        opts,
        probes: HashMap::new(),
    };
    info!(grace = ?m.opts.grace_period, "node lifecycle controller started");
    let monitor = async {
        m.nodes.wait_until_ready().await.ok();
        m.leases.wait_until_ready().await.ok();
        m.pods.wait_until_ready().await.ok();
        let mut tick = tokio::time::interval(m.opts.monitor_period);
        loop {
            tick.tick().await;
            m.pass().await;
        }
    };
    tokio::select! {
        _ = feed => anyhow::bail!("the node lifecycle controller's watches ended"),
        r = monitor => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(tolerations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"containers": [], "tolerations": tolerations}}))
        .unwrap()
    }

    fn taint(key: &str, added: Stamp) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(added)),
            value: None,
        }
    }

    #[test]
    fn eviction_waits_for_the_shortest_matching_toleration() {
        let t0: Stamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let taints = [taint(UNREACHABLE, t0)];
        // Untolerated: at once.
        assert_eq!(eviction_deadline(&pod(json!([])), &taints), Some(t0));
        // The admission default: 300 s.
        let p = pod(
            json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                          {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]),
        );
        assert_eq!(
            eviction_deadline(&p, &taints),
            Some(t0 + k8s_openapi::chrono::Duration::seconds(5))
        );
        // Without tolerationSeconds: never.
        let p = pod(json!([{"operator": "Exists"}]));
        assert_eq!(eviction_deadline(&p, &taints), None);
    }

    #[test]
    fn taints_follow_the_ready_condition() {
        let node = |status: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": "n"},
                "status": {"conditions": [{"type": "Ready", "status": status}]}}))
            .unwrap()
        };
        assert!(wanted_taints(&node("True")).is_empty());
        let keys = |n: &Node| -> Vec<String> {
            wanted_taints(n)
                .iter()
                .map(|t| format!("{}:{}", t.key, t.effect))
                .collect()
        };
        assert_eq!(
            keys(&node("Unknown")),
            [
                format!("{UNREACHABLE}:NoSchedule"),
                format!("{UNREACHABLE}:NoExecute")
            ]
        );
        assert_eq!(
            keys(&node("False")),
            [
                format!("{NOT_READY}:NoSchedule"),
                format!("{NOT_READY}:NoExecute")
            ]
        );
    }
}
