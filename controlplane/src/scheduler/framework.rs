//! The scheduler's decisions as plain functions: what a pod asks for, which nodes can take
//! it (filters) and which of those is best (scores). No I/O here; `super` feeds it from the
//! API and binds.
//!
//! Filters run in Kubernetes' order (node unschedulable, taints, node affinity/selector,
//! host ports, resources) and a node fails at the first that rejects it, so the
//! "0/N nodes are available" message counts the same reasons kube-scheduler would.
//! Scores are the default plugins' with their default weights: least allocated and balanced
//! allocation (weight 1 each), preferred node affinity (2), PreferNoSchedule taints (3).

use std::collections::{BTreeMap, HashMap};

use crate::quantity::parse as parse_quantity;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

/// Resource amounts: `cpu` in millicores, everything else in whole units (bytes, devices).
pub type Resources = BTreeMap<String, i64>;

const CPU: &str = "cpu";
const MEMORY: &str = "memory";
/// What a pod without requests counts as when scoring (not when filtering), as in Kubernetes,
/// so that best-effort pods still spread.
const DEFAULT_MILLI_CPU: i64 = 100;
const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

fn add(into: &mut Resources, from: &Resources) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn max_into(into: &mut Resources, from: &Resources) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_default();
        *e = (*e).max(*v);
    }
}

fn amounts(
    list: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> Result<Resources, String> {
    let mut out = Resources::new();
    for (k, q) in list.into_iter().flatten() {
        let v = parse_quantity(&q.0, k == CPU).map_err(|e| format!("{k}: {e}"))?;
        out.insert(k.clone(), v);
    }
    Ok(out)
}

/// A host port a pod holds: (protocol, host IP, port).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: String,
    pub ip: String,
    pub port: i32,
}

impl HostPort {
    fn conflicts(&self, o: &HostPort) -> bool {
        let any = |ip: &str| ip.is_empty() || ip == "0.0.0.0";
        self.port == o.port
            && self.protocol == o.protocol
            && (self.ip == o.ip || any(&self.ip) || any(&o.ip))
    }
}

/// What a pod needs from a node, computed once per pod.
#[derive(Clone, Debug, Default)]
pub struct Demand {
    /// Requests as Kubernetes sums them: containers added, init containers maxed, overhead added.
    pub requests: Resources,
    /// Requests with the scoring defaults for cpu and memory where a container asks for none.
    pub scoring: (i64, i64),
    pub host_ports: Vec<HostPort>,
}

impl Demand {
    pub fn of(pod: &Pod) -> Result<Demand, String> {
        let Some(spec) = &pod.spec else {
            return Ok(Demand::default());
        };
        let mut requests = Resources::new();
        let (mut cpu, mut mem) = (0, 0);
        for c in &spec.containers {
            let r = c.resources.as_ref();
            // A container that only sets limits requests its limits.
            let mut req = amounts(r.and_then(|r| r.limits.as_ref()))?;
            req.extend(amounts(r.and_then(|r| r.requests.as_ref()))?);
            cpu += req.get(CPU).copied().unwrap_or(DEFAULT_MILLI_CPU);
            mem += req.get(MEMORY).copied().unwrap_or(DEFAULT_MEMORY);
            add(&mut requests, &req);
        }
        for c in spec.init_containers.iter().flatten() {
            let r = c.resources.as_ref();
            let mut req = amounts(r.and_then(|r| r.limits.as_ref()))?;
            req.extend(amounts(r.and_then(|r| r.requests.as_ref()))?);
            max_into(&mut requests, &req);
        }
        let overhead = amounts(spec.overhead.as_ref())?;
        add(&mut requests, &overhead);
        requests.retain(|_, v| *v != 0);
        let host_ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                p.host_port.filter(|hp| *hp > 0).map(|port| HostPort {
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    ip: p.host_ip.clone().unwrap_or_default(),
                    port,
                })
            })
            .collect();
        Ok(Demand {
            requests,
            scoring: (cpu, mem),
            host_ports,
        })
    }
}

/// A node as the scheduler sees it: what it offers and what its pods (bound or assumed) use.
#[derive(Clone, Debug, Default)]
pub struct NodeState {
    pub node: Node,
    pub allocatable: Resources,
    pub max_pods: i64,
    pub requested: Resources,
    pub scoring_requested: (i64, i64),
    pub pods: i64,
    pub host_ports: HashMap<HostPort, usize>,
    /// The node's taints plus the not-ready/unreachable taint its Ready condition implies.
    pub taints: Vec<Taint>,
}

impl NodeState {
    pub fn new(node: Node) -> NodeState {
        let mut s = NodeState::default();
        s.set_node(node);
        s
    }

    /// Replaces the node object, keeping the accounting of its pods.
    pub fn set_node(&mut self, node: Node) {
        let status = node.status.as_ref();
        let alloc = status.and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()));
        let mut allocatable = Resources::new();
        for (k, q) in alloc.into_iter().flatten() {
            if let Ok(v) = parse_quantity(&q.0, k == CPU) {
                allocatable.insert(k.clone(), v);
            }
        }
        self.max_pods = allocatable.remove("pods").unwrap_or(110);
        self.allocatable = allocatable;
        let mut taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.as_str());
        let implied = match ready {
            Some("True") => None,
            Some("Unknown") => Some("node.kubernetes.io/unreachable"),
            _ => Some("node.kubernetes.io/not-ready"),
        };
        if let Some(key) = implied {
            if !taints
                .iter()
                .any(|t| t.key == key && t.effect == "NoSchedule")
            {
                taints.push(Taint {
                    key: key.into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                });
            }
        }
        self.taints = taints;
        self.node = node;
    }

    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn add_pod(&mut self, d: &Demand) {
        add(&mut self.requested, &d.requests);
        self.scoring_requested.0 += d.scoring.0;
        self.scoring_requested.1 += d.scoring.1;
        self.pods += 1;
        for p in &d.host_ports {
            *self.host_ports.entry(p.clone()).or_default() += 1;
        }
    }

    pub fn remove_pod(&mut self, d: &Demand) {
        for (k, v) in &d.requests {
            *self.requested.entry(k.clone()).or_default() -= v;
        }
        self.scoring_requested.0 -= d.scoring.0;
        self.scoring_requested.1 -= d.scoring.1;
        self.pods -= 1;
        for p in &d.host_ports {
            if let Some(n) = self.host_ports.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.host_ports.remove(p);
                }
            }
        }
    }
}

pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key = t.key.as_deref().unwrap_or_default();
        let op = t.operator.as_deref().unwrap_or("Equal");
        if op == "Exists" {
            effect_ok && (key.is_empty() || key == taint.key)
        } else {
            effect_ok
                && key == taint.key
                && t.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
    })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let int = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(int), values.first().and_then(|x| int(x))), (Some(v), Some(x)) if v > x)
        }
        "Lt" => {
            matches!((value.and_then(int), values.first().and_then(|x| int(x))), (Some(v), Some(x)) if v < x)
        }
        _ => false,
    }
}

/// Whether a node selector term matches the node: every expression on labels and every
/// field expression (only `metadata.name` exists) holds. A term with neither matches nothing.
pub fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let labels = node.metadata.labels.as_ref();
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.and_then(|l| l.get(&r.key)).map(String::as_str)))
        && fields.iter().all(|r| {
            r.key == "metadata.name" && requirement_matches(r, node.metadata.name.as_deref())
        })
}

fn selector_and_affinity_match(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = &pod.spec else { return true };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if let Some(sel) = &spec.node_selector {
        if !sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            return false;
        }
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        Some(r) => r.node_selector_terms.iter().any(|t| term_matches(t, node)),
        None => true,
    }
}

/// Why a node cannot take a pod, in kube-scheduler's words (the counts and these strings make
/// the "0/N nodes are available: ..." message).
pub fn filter(pod: &Pod, demand: &Demand, n: &NodeState) -> Result<(), Vec<String>> {
    node_constraints(pod, n)?;
    resources_and_ports(demand, n)
}

/// What the node says about the pod regardless of load: cordoned, taints, labels. (The
/// DaemonSet controller decides with these where its pods belong.)
pub fn node_constraints(pod: &Pod, n: &NodeState) -> Result<(), Vec<String>> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let unschedulable = n.node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    if unschedulable
        && !tolerates(
            &tolerations,
            &Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            },
        )
    {
        return Err(vec!["node(s) were unschedulable".into()]);
    }
    if let Some(t) = n
        .taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerates(&tolerations, t))
    {
        return Err(vec![format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t.key,
            t.value.as_deref().unwrap_or_default()
        )]);
    }
    if !selector_and_affinity_match(pod, &n.node) {
        return Err(vec![
            "node(s) didn't match Pod's node affinity/selector".into()
        ]);
    }
    Ok(())
}

fn resources_and_ports(demand: &Demand, n: &NodeState) -> Result<(), Vec<String>> {
    if demand
        .host_ports
        .iter()
        .any(|p| n.host_ports.keys().any(|q| p.conflicts(q)))
    {
        return Err(vec![
            "node(s) didn't have free ports for the requested pod ports".into(),
        ]);
    }
    let mut why = Vec::new();
    if n.pods + 1 > n.max_pods {
        why.push("Too many pods".to_string());
    }
    for (k, want) in &demand.requests {
        let have = n.allocatable.get(k).copied().unwrap_or(0);
        let used = n.requested.get(k).copied().unwrap_or(0);
        if *want > 0 && used + want > have {
            why.push(format!("Insufficient {k}"));
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

/// The unschedulable message: "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) ...".
pub fn unschedulable_message(nodes: usize, reasons: &HashMap<String, usize>) -> String {
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{nodes} nodes are available.")
    } else {
        format!("0/{nodes} nodes are available: {}.", parts.join(", "))
    }
}

/// Least allocated and balanced allocation over cpu and memory, each 0..=100.
fn resource_scores(demand: &Demand, n: &NodeState) -> (i64, i64) {
    let cpu_alloc = n.allocatable.get(CPU).copied().unwrap_or(0);
    let mem_alloc = n.allocatable.get(MEMORY).copied().unwrap_or(0);
    let cpu_req = n.scoring_requested.0 + demand.scoring.0;
    let mem_req = n.scoring_requested.1 + demand.scoring.1;
    let least = |req: i64, alloc: i64| {
        if alloc <= 0 || req > alloc {
            0
        } else {
            (alloc - req) * 100 / alloc
        }
    };
    let least_allocated = (least(cpu_req, cpu_alloc) + least(mem_req, mem_alloc)) / 2;
    let frac = |req: i64, alloc: i64| {
        if alloc <= 0 {
            1.0
        } else {
            (req as f64 / alloc as f64).min(1.0)
        }
    };
    // Standard deviation of the two fractions is half their difference.
    let std = (frac(cpu_req, cpu_alloc) - frac(mem_req, mem_alloc)).abs() / 2.0;
    let balanced = ((1.0 - std) * 100.0) as i64;
    (least_allocated, balanced)
}

fn preferred_affinity(pod: &Pod, node: &Node) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|terms| {
            terms
                .iter()
                .filter(|t| term_matches(&t.preference, node))
                .map(|t| t.weight as i64)
                .sum()
        })
        .unwrap_or(0)
}

fn intolerable_soft_taints(pod: &Pod, n: &NodeState) -> i64 {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    n.taints
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(&tolerations, t))
        .count() as i64
}

/// Scores the feasible nodes (indices into `nodes`) and returns them with their total score.
pub fn score(pod: &Pod, demand: &Demand, nodes: &[&NodeState]) -> Vec<i64> {
    let affinity: Vec<i64> = nodes
        .iter()
        .map(|n| preferred_affinity(pod, &n.node))
        .collect();
    let taints: Vec<i64> = nodes
        .iter()
        .map(|n| intolerable_soft_taints(pod, n))
        .collect();
    let max_affinity = affinity.iter().copied().max().unwrap_or(0);
    let max_taints = taints.iter().copied().max().unwrap_or(0);
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (least, balanced) = resource_scores(demand, n);
            let aff = if max_affinity > 0 {
                affinity[i] * 100 / max_affinity
            } else {
                0
            };
            let taint = if max_taints > 0 {
                100 - taints[i] * 100 / max_taints
            } else {
                100
            };
            least + balanced + 2 * aff + 3 * taint
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str, mem: &str, extra: serde_json::Value) -> NodeState {
        let mut n = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        json_patch::merge(&mut n, &extra);
        NodeState::new(serde_json::from_value(n).unwrap())
    }

    fn pod(spec: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        json_patch::merge(&mut p, &json!({"spec": spec}));
        serde_json::from_value(p).unwrap()
    }

    fn with_requests(cpu: &str, mem: &str) -> Pod {
        pod(json!({"containers": [{"name": "c", "image": "i",
            "resources": {"requests": {"cpu": cpu, "memory": mem}}}]}))
    }

    #[test]
    fn requests_sum_containers_max_init_and_default_from_limits() {
        let p = pod(json!({
            "containers": [
                {"name": "a", "image": "i", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                {"name": "b", "image": "i", "resources": {"limits": {"cpu": "300m", "memory": "64Mi"}}}],
            "initContainers": [{"name": "init", "image": "i", "resources": {"requests": {"cpu": "1"}}}],
            "overhead": {"cpu": "10m"}
        }));
        let d = Demand::of(&p).unwrap();
        assert_eq!(d.requests[CPU], 1010);
        assert_eq!(d.requests[MEMORY], 128 << 20);
        let bad = pod(
            json!({"containers": [{"name": "a", "image": "i", "resources": {"requests": {"cpu": "lots"}}}]}),
        );
        let e = Demand::of(&bad).unwrap_err();
        assert!(e.contains("cpu") && e.contains("lots"), "{e}");
    }

    #[test]
    fn the_emptier_node_wins_least_allocated() {
        // Nodes with 12 and 16 units free; a pod of 10 goes to the one with 16.
        let a = node("a", "12", "16Gi", json!({}));
        let b = node("b", "16", "16Gi", json!({}));
        let p = with_requests("10", "1Gi");
        let d = Demand::of(&p).unwrap();
        assert!(filter(&p, &d, &a).is_ok() && filter(&p, &d, &b).is_ok());
        let s = score(&p, &d, &[&a, &b]);
        assert!(s[1] > s[0], "{s:?}");
        // Take 10 from b: now a (12 free) beats b (6 free) for the next pod of 5.
        let mut b = b;
        b.add_pod(&d);
        let p5 = with_requests("5", "1Gi");
        let d5 = Demand::of(&p5).unwrap();
        let s = score(&p5, &d5, &[&a, &b]);
        assert!(s[0] > s[1], "{s:?}");
    }

    #[test]
    fn filters_say_why_in_kube_schedulers_words() {
        let small = node("small", "1", "1Gi", json!({}));
        let p = with_requests("2", "2Gi");
        let d = Demand::of(&p).unwrap();
        assert_eq!(
            filter(&p, &d, &small).unwrap_err(),
            ["Insufficient cpu", "Insufficient memory"]
        );

        let tainted = node(
            "t",
            "8",
            "8Gi",
            json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
        );
        let p = pod(json!({}));
        let d = Demand::of(&p).unwrap();
        assert_eq!(
            filter(&p, &d, &tainted).unwrap_err(),
            ["node(s) had untolerated taint {dedicated: db}"]
        );
        let tolerant = pod(
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]}),
        );
        assert!(filter(&tolerant, &d, &tainted).is_ok());
        let wrong_value = pod(json!({"tolerations": [{"key": "dedicated", "value": "web"}]}));
        assert!(filter(&wrong_value, &d, &tainted).is_err());

        let not_ready = node(
            "nr",
            "8",
            "8Gi",
            json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
        );
        assert_eq!(
            filter(&p, &d, &not_ready).unwrap_err(),
            ["node(s) had untolerated taint {node.kubernetes.io/unreachable: }"]
        );
        let cordoned = node("c", "8", "8Gi", json!({"spec": {"unschedulable": true}}));
        assert_eq!(
            filter(&p, &d, &cordoned).unwrap_err(),
            ["node(s) were unschedulable"]
        );

        let picky = pod(json!({"nodeSelector": {"disk": "ssd"}}));
        let ssd = node(
            "ssd",
            "8",
            "8Gi",
            json!({"metadata": {"labels": {"disk": "ssd"}}}),
        );
        assert!(filter(&picky, &d, &ssd).is_ok());
        assert_eq!(
            filter(&picky, &d, &small).unwrap_err(),
            ["node(s) didn't match Pod's node affinity/selector"]
        );

        let mut reasons = HashMap::new();
        reasons.insert("Insufficient cpu".to_string(), 1);
        reasons.insert(
            "node(s) didn't match Pod's node affinity/selector".to_string(),
            2,
        );
        assert_eq!(
            unschedulable_message(3, &reasons),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
        );
    }

    #[test]
    fn node_affinity_terms_or_and_expressions_and() {
        let zone_a = node(
            "n1",
            "8",
            "8Gi",
            json!({"metadata": {"labels": {"zone": "a", "gen": "3"}}}),
        );
        let zone_b = node(
            "n2",
            "8",
            "8Gi",
            json!({"metadata": {"labels": {"zone": "b", "gen": "5"}}}),
        );
        let aff = |terms: serde_json::Value| {
            pod(
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}}),
            )
        };
        let d = Demand::default();
        let p = aff(
            json!([{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]),
        );
        assert!(filter(&p, &d, &zone_a).is_ok() && filter(&p, &d, &zone_b).is_err());
        let p =
            aff(json!([{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]}]));
        assert!(filter(&p, &d, &zone_a).is_err() && filter(&p, &d, &zone_b).is_ok());
        let p = aff(
            json!([{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
                           {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]),
        );
        assert!(filter(&p, &d, &zone_a).is_ok() && filter(&p, &d, &zone_b).is_ok());
        let p = aff(
            json!([{"matchExpressions": [{"key": "zone", "operator": "Exists"},
                                                 {"key": "gpu", "operator": "DoesNotExist"},
                                                 {"key": "gen", "operator": "Lt", "values": ["4"]}]}]),
        );
        assert!(filter(&p, &d, &zone_a).is_ok() && filter(&p, &d, &zone_b).is_err());
        // Preferred terms steer the score.
        let p = pod(
            json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}}]}}}),
        );
        let s = score(&p, &d, &[&zone_a, &zone_b]);
        assert!(s[1] > s[0], "{s:?}");
    }

    #[test]
    fn host_ports_conflict_on_the_same_port_and_protocol() {
        let mut n = node("n", "8", "8Gi", json!({}));
        let web = pod(
            json!({"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
        );
        let d = Demand::of(&web).unwrap();
        assert!(filter(&web, &d, &n).is_ok());
        n.add_pod(&d);
        assert_eq!(
            filter(&web, &d, &n).unwrap_err(),
            ["node(s) didn't have free ports for the requested pod ports"]
        );
        let udp = pod(
            json!({"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}]}]}),
        );
        assert!(filter(&udp, &Demand::of(&udp).unwrap(), &n).is_ok());
        n.remove_pod(&d);
        assert!(filter(&web, &d, &n).is_ok());
        assert_eq!(n.pods, 0);
    }

    #[test]
    fn soft_taints_lower_the_score() {
        let plain = node("a", "8", "8Gi", json!({}));
        let soft = node(
            "b",
            "8",
            "8Gi",
            json!({"spec": {"taints": [{"key": "spot", "effect": "PreferNoSchedule"}]}}),
        );
        let p = pod(json!({}));
        let d = Demand::of(&p).unwrap();
        assert!(filter(&p, &d, &soft).is_ok());
        let s = score(&p, &d, &[&plain, &soft]);
        assert!(s[0] > s[1], "{s:?}");
    }
}
