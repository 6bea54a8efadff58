//! The scheduler (`ferry-controlplane scheduler --kubeconfig ...`): assigns each pending pod
//! that names the default scheduler to a node, through `pods/binding`, as kube-scheduler does.
//!
//! One task owns the state: every node with the resources and host ports its pods hold, fed
//! by a watch of nodes and one of pods. A pod is decided on that state (filters and scores in
//! [`framework`]) and *assumed* on its node at once, so the next pod already sees it there;
//! the bind itself runs concurrently. A failed bind forgets the assumption and the pod
//! retries with back-off. A pod no node can take gets a `PodScheduled=False` condition and a
//! `FailedScheduling` event saying why for each node, and is tried again when a node changes
//! or a pod goes away (and at least every 30 s).

pub mod framework;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use ferry_common::events::{self, Recorder};
use framework::{Demand, NodeState};

pub const DEFAULT_SCHEDULER: &str = "default-scheduler";
/// Binds in flight at once.
const PARALLEL_BINDS: usize = 32;
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Unschedulable pods are retried at least this often even if nothing seems to change.
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(30);

struct Accounted {
    node: String,
    demand: Demand,
}

enum Outcome {
    Bound,
    /// The pod is gone or already bound: nothing to retry.
    Moot,
    Failed(String),
}

struct BindResult {
    uid: String,
    node: String,
    outcome: Outcome,
}

#[derive(Default)]
struct State {
    nodes: HashMap<String, NodeState>,
    /// Pods holding resources on a node: bound ones from the watch, assumed ones by us.
    accounted: HashMap<String, Accounted>,
    /// Pods waiting for a node, latest object by uid.
    pending: HashMap<String, Arc<Pod>>,
    active: VecDeque<String>,
    queued: HashSet<String>,
    binding: HashSet<String>,
    unschedulable: HashSet<String>,
    backoff: BinaryHeap<Reverse<(Instant, String)>>,
    attempts: HashMap<String, u32>,
    /// The PodScheduled message last written per pod, not to write it again.
    written: HashMap<String, String>,
    /// Objects seen during a relist; what is missing at its end was deleted meanwhile.
    relist_nodes: Option<HashSet<String>>,
    relist_pods: Option<HashSet<String>>,
    nodes_synced: bool,
    pods_synced: bool,
}

fn is_terminal(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

fn node_of(p: &Pod) -> Option<&str> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn scheduler_of(p: &Pod) -> &str {
    p.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .unwrap_or(DEFAULT_SCHEDULER)
}

fn backoff_for(attempts: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(attempts.saturating_sub(1).min(8)))
        .min(MAX_BACKOFF)
}

enum Decision {
    Bind(Arc<Pod>, String),
    Unschedulable(Arc<Pod>, String),
}

impl State {
    fn release(&mut self, uid: &str) {
        if let Some(a) = self.accounted.remove(uid) {
            if let Some(n) = self.nodes.get_mut(&a.node) {
                n.remove_pod(&a.demand);
            }
        }
    }

    fn account(&mut self, uid: &str, node: &str, pod: &Pod) {
        if self.accounted.get(uid).is_some_and(|a| a.node == node) {
            return;
        }
        self.release(uid);
        let demand = Demand::of(pod).unwrap_or_default();
        if let Some(n) = self.nodes.get_mut(node) {
            n.add_pod(&demand);
        }
        self.accounted.insert(
            uid.to_string(),
            Accounted {
                node: node.to_string(),
                demand,
            },
        );
    }

    fn forget_pending(&mut self, uid: &str) {
        self.pending.remove(uid);
        self.queued.remove(uid);
        self.unschedulable.remove(uid);
        self.attempts.remove(uid);
        self.written.remove(uid);
    }

    fn enqueue(&mut self, uid: &str) {
        if self.queued.insert(uid.to_string()) {
            self.active.push_back(uid.to_string());
        }
    }

    /// Something changed that may let unschedulable pods fit: retry them after their back-off.
    fn wake_unschedulable(&mut self) {
        let now = Instant::now();
        for uid in std::mem::take(&mut self.unschedulable) {
            let wait = backoff_for(self.attempts.get(&uid).copied().unwrap_or(1));
            self.backoff.push(Reverse((now + wait, uid)));
        }
    }

    fn pod_applied(&mut self, pod: Pod) {
        let uid = pod.uid().unwrap_or_default();
        if let Some(seen) = self.relist_pods.as_mut() {
            seen.insert(uid.clone());
        }
        if is_terminal(&pod) {
            self.forget_pending(&uid);
            if self.accounted.contains_key(&uid) && !self.binding.contains(&uid) {
                self.release(&uid);
                self.wake_unschedulable();
            }
            return;
        }
        if let Some(node) = node_of(&pod) {
            let node = node.to_string();
            self.forget_pending(&uid);
            self.account(&uid, &node, &pod);
            return;
        }
        if scheduler_of(&pod) != DEFAULT_SCHEDULER || pod.metadata.deletion_timestamp.is_some() {
            self.forget_pending(&uid);
            return;
        }
        // Unbound and ours. Already decided (binding or assumed): the watch lags; wait for it.
        if self.binding.contains(&uid) || self.accounted.contains_key(&uid) {
            return;
        }
        let pod = Arc::new(pod);
        let spec_changed = self
            .pending
            .insert(uid.clone(), pod.clone())
            .is_some_and(|old| old.spec != pod.spec);
        if self.unschedulable.contains(&uid) {
            // Our own status writes come back here; only a new spec is worth a retry.
            if spec_changed {
                self.unschedulable.remove(&uid);
                self.enqueue(&uid);
            }
        } else if !self.attempts.contains_key(&uid) {
            self.enqueue(&uid);
        }
    }

    fn pod_deleted(&mut self, uid: &str) {
        self.forget_pending(uid);
        if self.accounted.contains_key(uid) {
            self.release(uid);
            self.wake_unschedulable();
        }
    }

    fn node_applied(&mut self, node: Node) {
        let name = node.name_any();
        if let Some(seen) = self.relist_nodes.as_mut() {
            seen.insert(name.clone());
        }
        match self.nodes.get_mut(&name) {
            Some(n) => {
                let old_spec = n.node.spec.clone();
                let old_ready = n.taints.clone();
                let old_alloc = n.allocatable.clone();
                let old_labels = n.node.metadata.labels.clone();
                n.set_node(node);
                let changed = n.node.spec != old_spec
                    || n.taints != old_ready
                    || n.allocatable != old_alloc
                    || n.node.metadata.labels != old_labels;
                if !changed {
                    return; // a heartbeat: nothing a pod could newly fit
                }
            }
            None => {
                let mut n = NodeState::new(node);
                for a in self.accounted.values().filter(|a| a.node == name) {
                    n.add_pod(&a.demand);
                }
                self.nodes.insert(name, n);
            }
        }
        self.wake_unschedulable();
    }

    fn node_event(&mut self, ev: watcher::Event<Node>) {
        match ev {
            watcher::Event::Init => self.relist_nodes = Some(HashSet::new()),
            watcher::Event::InitApply(n) | watcher::Event::Apply(n) => self.node_applied(n),
            watcher::Event::Delete(n) => {
                self.nodes.remove(&n.name_any());
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relist_nodes.take() {
                    self.nodes.retain(|k, _| seen.contains(k));
                }
                self.nodes_synced = true;
                info!(nodes = self.nodes.len(), "nodes listed");
            }
        }
    }

    fn pod_event(&mut self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Init => self.relist_pods = Some(HashSet::new()),
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => self.pod_applied(p),
            watcher::Event::Delete(p) => self.pod_deleted(&p.uid().unwrap_or_default()),
            watcher::Event::InitDone => {
                if let Some(seen) = self.relist_pods.take() {
                    let gone: Vec<String> = self
                        .accounted
                        .keys()
                        .chain(self.pending.keys())
                        .filter(|u| !seen.contains(*u) && !self.binding.contains(*u))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.pod_deleted(&uid);
                    }
                }
                self.pods_synced = true;
                info!(pending = self.pending.len(), "pods listed");
            }
        }
    }

    fn can_schedule(&self) -> bool {
        self.nodes_synced
            && self.pods_synced
            && !self.active.is_empty()
            && self.binding.len() < PARALLEL_BINDS
    }

    fn next_backoff(&self) -> Option<Instant> {
        self.backoff.peek().map(|Reverse((t, _))| *t)
    }

    fn flush_backoff(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, _))) = self.backoff.peek() {
            if *t > now {
                break;
            }
            let Reverse((_, uid)) = self.backoff.pop().expect("peeked");
            if self.pending.contains_key(&uid) && !self.binding.contains(&uid) {
                self.enqueue(&uid);
            }
        }
    }

    /// Decides the next queued pod: a node to bind it to, or why none fits.
    fn decide(&mut self) -> Option<Decision> {
        while let Some(uid) = self.active.pop_front() {
            self.queued.remove(&uid);
            let Some(pod) = self.pending.get(&uid).cloned() else {
                continue;
            };
            *self.attempts.entry(uid.clone()).or_default() += 1;
            let demand = match Demand::of(&pod) {
                Ok(d) => d,
                Err(e) => {
                    self.unschedulable.insert(uid);
                    return Some(Decision::Unschedulable(
                        pod,
                        format!("the pod's resource requests cannot be read: {e}"),
                    ));
                }
            };
            let mut reasons: HashMap<String, usize> = HashMap::new();
            let mut feasible: Vec<&NodeState> = Vec::new();
            for n in self.nodes.values() {
                match framework::filter(&pod, &demand, n) {
                    Ok(()) => feasible.push(n),
                    Err(why) => {
                        for r in why {
                            *reasons.entry(r).or_default() += 1;
                        }
                    }
                }
            }
            if feasible.is_empty() {
                let msg = framework::unschedulable_message(self.nodes.len(), &reasons);
                self.unschedulable.insert(uid);
                return Some(Decision::Unschedulable(pod, msg));
            }
            let scores = framework::score(&pod, &demand, &feasible);
            // Highest score; ties broken at random so equal nodes share the load.
            let mut best = 0;
            let mut ties = 0u32;
            for (i, s) in scores.iter().enumerate() {
                if *s > scores[best] {
                    best = i;
                    ties = 1;
                } else if *s == scores[best] {
                    ties += 1;
                    if rand::random::<u32>().is_multiple_of(ties) {
                        best = i;
                    }
                }
            }
            let node = feasible[best].name().to_string();
            // Assume: the pod holds its resources on the node from now on.
            self.accounted.insert(
                uid.clone(),
                Accounted {
                    node: node.clone(),
                    demand: demand.clone(),
                },
            );
            if let Some(n) = self.nodes.get_mut(&node) {
                n.add_pod(&demand);
            }
            self.binding.insert(uid);
            return Some(Decision::Bind(pod, node));
        }
        None
    }

    fn bind_done(&mut self, r: BindResult) {
        self.binding.remove(&r.uid);
        match r.outcome {
            Outcome::Bound => {
                self.forget_pending(&r.uid);
            }
            Outcome::Moot => {
                self.release(&r.uid);
                self.forget_pending(&r.uid);
            }
            Outcome::Failed(e) => {
                warn!(node = %r.node, error = %e, "binding failed; will retry");
                self.release(&r.uid);
                if self.pending.contains_key(&r.uid) {
                    let wait = backoff_for(self.attempts.get(&r.uid).copied().unwrap_or(1));
                    self.backoff.push(Reverse((Instant::now() + wait, r.uid)));
                }
            }
        }
    }
}

async fn bind(client: Client, pod: Arc<Pod>, node: String) -> Outcome {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: pod.uid(),
            ..Default::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            api_version: Some("v1".into()),
            name: Some(node),
            ..Default::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let body = match serde_json::to_vec(&binding) {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    match api
        .create_subresource::<serde_json::Value>("binding", &name, &PostParams::default(), body)
        .await
    {
        Ok(_) => Outcome::Bound,
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Outcome::Moot,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Records why a pod stays Pending: the PodScheduled condition (what `kubectl describe`
/// and `kubectl get pod -o wide` users look at) and a FailedScheduling event.
async fn mark_unschedulable(client: Client, pod: Arc<Pod>, message: String) {
    let ns = pod.namespace().unwrap_or_default();
    let mut conditions: Vec<serde_json::Value> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.type_ != "PodScheduled")
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .collect();
    conditions.push(json!({
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": message, "lastProbeTime": null,
        "lastTransitionTime": Time(k8s_openapi::chrono::Utc::now()),
    }));
    let api: Api<Pod> = Api::namespaced(client, &ns);
    if let Err(e) = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"conditions": conditions}})),
        )
        .await
    {
        debug!(pod = %pod.name_any(), error = %e, "writing PodScheduled=False");
    }
}

pub async fn run(client: Client) -> anyhow::Result<()> {
    let mut nodes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    let recorder = Recorder::new(client.clone(), DEFAULT_SCHEDULER);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<BindResult>();
    let mut s = State::default();
    let mut retry_all = tokio::time::interval(UNSCHEDULABLE_RETRY);
    info!("scheduler started");
    loop {
        let next_backoff = s.next_backoff();
        tokio::select! {
            biased;
            ev = nodes.next() => match ev {
                Some(Ok(ev)) => s.node_event(ev),
                Some(Err(e)) => warn!(error = %e, "watching nodes"),
                None => anyhow::bail!("the node watch ended"),
            },
            ev = pods.next() => match ev {
                Some(Ok(ev)) => s.pod_event(ev),
                Some(Err(e)) => warn!(error = %e, "watching pods"),
                None => anyhow::bail!("the pod watch ended"),
            },
            Some(r) = done_rx.recv() => s.bind_done(r),
            _ = tokio::time::sleep_until(next_backoff.unwrap_or_else(Instant::now).into()), if next_backoff.is_some() => {
                s.flush_backoff()
            }
            _ = retry_all.tick() => s.wake_unschedulable(),
            _ = std::future::ready(()), if s.can_schedule() => match s.decide() {
                Some(Decision::Bind(pod, node)) => {
                    let (client, tx, rec) = (client.clone(), done_tx.clone(), recorder.clone());
                    tokio::spawn(async move {
                        let uid = pod.uid().unwrap_or_default();
                        let outcome = bind(client, pod.clone(), node.clone()).await;
                        if matches!(outcome, Outcome::Bound) {
                            debug!(pod = %pod.name_any(), %node, "bound");
                            rec.normal(
                                events::reference(&*pod),
                                "Scheduled",
                                format!(
                                    "Successfully assigned {}/{} to {node}",
                                    pod.namespace().unwrap_or_default(),
                                    pod.name_any()
                                ),
                            );
                        }
                        let _ = tx.send(BindResult { uid, node, outcome });
                    });
                }
                Some(Decision::Unschedulable(pod, msg)) => {
                    let uid = pod.uid().unwrap_or_default();
                    recorder.warning(events::reference(&*pod), "FailedScheduling", msg.clone());
                    if s.written.get(&uid) != Some(&msg) {
                        info!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()), reason = %msg, "unschedulable");
                        s.written.insert(uid, msg.clone());
                        tokio::spawn(mark_unschedulable(client.clone(), pod, msg));
                    }
                }
                None => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    }

    fn pod(name: &str, cpu: &str, node: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "schedulerName": DEFAULT_SCHEDULER,
                     "containers": [{"name": "c", "image": "i", "resources": {"requests": {"cpu": cpu}}}]}
        }))
        .unwrap()
    }

    fn synced(nodes: &[Node], pods: Vec<Pod>) -> State {
        let mut s = State::default();
        for n in nodes {
            s.node_event(watcher::Event::Apply(n.clone()));
        }
        s.node_event(watcher::Event::InitDone);
        for p in pods {
            s.pod_event(watcher::Event::Apply(p));
        }
        s.pod_event(watcher::Event::InitDone);
        s
    }

    #[test]
    fn assumed_pods_count_before_the_watch_shows_them_bound() {
        let mut s = synced(
            &[node("a", "2")],
            vec![pod("p1", "1500m", None), pod("p2", "1500m", None)],
        );
        let Some(Decision::Bind(p, n)) = s.decide() else {
            panic!("first pod should fit")
        };
        assert_eq!(n, "a");
        // The second no longer fits: the first holds 1.5 of 2 cores though not yet bound.
        let Some(Decision::Unschedulable(_, msg)) = s.decide() else {
            panic!("second pod should not fit")
        };
        assert_eq!(msg, "0/1 nodes are available: 1 Insufficient cpu.");
        // The bind fails: the assumption goes and the first pod retries.
        s.bind_done(BindResult {
            uid: p.uid().unwrap(),
            node: n,
            outcome: Outcome::Failed("boom".into()),
        });
        assert_eq!(s.nodes["a"].requested.get("cpu"), Some(&0));
        assert_eq!(s.backoff.len(), 1);
    }

    #[test]
    fn deleting_a_bound_pod_lets_the_waiting_one_in() {
        let mut s = synced(
            &[node("a", "2")],
            vec![pod("old", "1500m", Some("a")), pod("new", "1500m", None)],
        );
        assert!(matches!(s.decide(), Some(Decision::Unschedulable(..))));
        s.pod_event(watcher::Event::Delete(pod("old", "1500m", Some("a"))));
        assert_eq!(
            s.backoff.len(),
            1,
            "the unschedulable pod waits for its back-off"
        );
        s.backoff = s
            .backoff
            .drain()
            .map(|Reverse((_, u))| Reverse((Instant::now(), u)))
            .collect();
        s.flush_backoff();
        assert!(matches!(s.decide(), Some(Decision::Bind(_, n)) if n == "a"));
    }

    #[test]
    fn a_relist_forgets_pods_deleted_while_the_watch_was_down() {
        let mut s = synced(&[node("a", "2")], vec![pod("gone", "1", Some("a"))]);
        assert_eq!(s.nodes["a"].requested.get("cpu"), Some(&1000));
        s.pod_event(watcher::Event::Init);
        s.pod_event(watcher::Event::InitDone);
        assert_eq!(s.nodes["a"].requested.get("cpu"), Some(&0));
    }
}
