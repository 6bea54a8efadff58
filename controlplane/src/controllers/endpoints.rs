//! The Endpoints and EndpointSlice controller: for each Service with a selector, the pods it
//! selects become endpoints, with Kubernetes' conditions (ready, serving, terminating), ports
//! resolved by name per pod, and the node of each endpoint. EndpointSlices hold at most 100
//! endpoints and are labelled `kubernetes.io/service-name`, as kube-proxy (and ferry-proxy)
//! read them; the v1 Endpoints object is kept for older clients.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MAX_PER_SLICE: usize = 100;

struct Ctx {
    client: Client,
    pods: Store<Pod>,
}

/// One endpoint of a Service, with the ports it serves (resolved for its pod).
#[derive(Clone, Debug, PartialEq)]
struct Ep {
    ip: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    pod: String,
    uid: Option<String>,
    /// The pod's stable DNS name under a headless Service (`<hostname>.<service>`): set when
    /// the pod names the Service as its subdomain, as StatefulSet pods do.
    hostname: Option<String>,
}

type PortSet = Vec<(Option<String>, String, i32)>;

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The port a Service port reaches on `pod`: a number, or a container port found by name.
fn resolve(target: Option<&IntOrString>, port: i32, pod: &Pod) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// Endpoints of `svc` grouped by the ports they serve.
fn desired(svc: &Service, pods: &[Arc<Pod>]) -> BTreeMap<String, (PortSet, Vec<Ep>)> {
    let mut groups: BTreeMap<String, (PortSet, Vec<Ep>)> = BTreeMap::new();
    let Some(spec) = svc.spec.as_ref() else {
        return groups;
    };
    let Some(sel) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return groups;
    };
    let ns = svc.namespace().unwrap_or_default();
    let publish_unready = spec.publish_not_ready_addresses == Some(true);
    for pod in pods {
        if pod.namespace().as_deref() != Some(ns.as_str()) {
            continue;
        }
        let labels = pod.labels();
        if !sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let status = pod.status.clone().unwrap_or_default();
        let Some(ip) = status.pod_ip.clone().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
            continue;
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = pod_ready(pod);
        let ports: PortSet = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let target = resolve(p.target_port.as_ref(), p.port, pod)?;
                Some((
                    p.name.clone(),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    target,
                ))
            })
            .collect();
        if ports.is_empty() && !spec.ports.as_ref().is_none_or(|p| p.is_empty()) {
            continue;
        }
        let key = format!("{ports:?}");
        let ep = Ep {
            ip,
            ready: (ready || publish_unready) && !terminating,
            serving: ready || publish_unready,
            terminating,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            pod: pod.name_any(),
            uid: pod.metadata.uid.clone(),
            hostname: pod
                .spec
                .as_ref()
                .filter(|s| s.subdomain.as_deref() == Some(svc.name_any().as_str()))
                .and_then(|s| s.hostname.clone()),
        };
        groups
            .entry(key)
            .or_insert_with(|| (ports, Vec::new()))
            .1
            .push(ep);
    }
    for (_, eps) in groups.values_mut() {
        eps.sort_by(|a, b| a.ip.cmp(&b.ip));
    }
    groups
}

fn short_hash(s: &str) -> String {
    // FNV-1a: stable across runs, enough to tell port sets apart in a name.
    let mut h: u32 = 0x811c9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("{:08x}", h)[..5].to_string()
}

fn slices_for(svc: &Service, groups: &BTreeMap<String, (PortSet, Vec<Ep>)>) -> Vec<EndpointSlice> {
    let name = svc.name_any();
    let ns = svc.namespace().unwrap_or_default();
    let mut out = Vec::new();
    for (key, (ports, eps)) in groups {
        for (i, chunk) in eps.chunks(MAX_PER_SLICE).enumerate() {
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{}-{i}", short_hash(key))),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME.to_string(), name.clone()),
                        (
                            "endpointslice.kubernetes.io/managed-by".to_string(),
                            MANAGED_BY.to_string(),
                        ),
                    ])),
                    owner_references: Some(vec![super::pods::controller_ref(svc)]),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, proto, port)| SlicePort {
                            name: n.clone(),
                            protocol: Some(proto.clone()),
                            port: Some(*port),
                            app_protocol: None,
                        })
                        .collect(),
                ),
                endpoints: chunk
                    .iter()
                    .map(|e| Endpoint {
                        addresses: vec![e.ip.clone()],
                        hostname: e.hostname.clone(),
                        conditions: Some(EndpointConditions {
                            ready: Some(e.ready),
                            serving: Some(e.serving),
                            terminating: Some(e.terminating),
                        }),
                        node_name: e.node.clone(),
                        target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some(e.pod.clone()),
                            namespace: Some(ns.clone()),
                            uid: e.uid.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            });
        }
    }
    out
}

fn endpoints_for(svc: &Service, groups: &BTreeMap<String, (PortSet, Vec<Ep>)>) -> Endpoints {
    let subsets: Vec<EndpointSubset> = groups
        .values()
        .map(|(ports, eps)| {
            let addr = |e: &Ep| EndpointAddress {
                ip: e.ip.clone(),
                hostname: e.hostname.clone(),
                node_name: e.node.clone(),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(e.pod.clone()),
                    namespace: svc.namespace(),
                    uid: e.uid.clone(),
                    ..Default::default()
                }),
            };
            let ready: Vec<EndpointAddress> = eps.iter().filter(|e| e.ready).map(addr).collect();
            let not_ready: Vec<EndpointAddress> =
                eps.iter().filter(|e| !e.ready).map(addr).collect();
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, proto, port)| EndpointPort {
                            name: n.clone(),
                            port: *port,
                            protocol: Some(proto.clone()),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }
        })
        .filter(|s| s.addresses.is_some() || s.not_ready_addresses.is_some())
        .collect();
    Endpoints {
        metadata: ObjectMeta {
            name: Some(svc.name_any()),
            namespace: svc.namespace(),
            labels: svc.metadata.labels.clone(),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    }
}

/// Creates `want` or replaces what is there when its content differs.
async fn put<K>(api: &Api<K>, mut want: K, same: impl Fn(&K, &K) -> bool) -> kube::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = want.meta().name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        None => {
            api.create(&PostParams::default(), &want).await?;
        }
        Some(cur) if same(&cur, &want) => {}
        Some(cur) => {
            want.meta_mut().resource_version = cur.meta().resource_version.clone();
            api.replace(&name, &PostParams::default(), &want).await?;
        }
    }
    Ok(())
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.pods.wait_until_ready().await.ok();
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let endpoints: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    let managed = ListParams::default().labels(&format!(
        "{SERVICE_NAME}={name},endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
    ));
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let has_selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty());
    let groups = desired(&svc, &ctx.pods.state());
    let want: Vec<EndpointSlice> = if has_selector {
        slices_for(&svc, &groups)
    } else {
        vec![]
    };
    let names: BTreeSet<String> = want
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    for s in want {
        put(&slices, s, |a, b| {
            a.endpoints == b.endpoints && a.ports == b.ports
        })
        .await?;
    }
    for old in slices.list(&managed).await? {
        if !names.contains(&old.name_any()) {
            slices
                .delete(&old.name_any(), &DeleteParams::default())
                .await?;
        }
    }
    if has_selector {
        put(&endpoints, endpoints_for(&svc, &groups), |a, b| {
            a.subsets == b.subsets
        })
        .await?;
    }
    debug!(service = %format!("{ns}/{name}"), slices = names.len(), "endpoints reconciled");
    Ok(Action::await_change())
}

fn error_policy(svc: Arc<Service>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(service = %svc.name_any(), error = %e, "endpoints reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Runs until the process stops.
pub async fn run(client: Client) -> anyhow::Result<()> {
    let (pods, pod_events) = super::cached::<Pod>(&client);
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let services = controller.store();
    info!("endpoints and EndpointSlice controller started");
    super::drain(
        "endpoints",
        controller
            // A pod change can touch any Service of its namespace (labels may have changed).
            .watches_stream(pod_events, move |pod: Pod| {
                let ns = pod.namespace();
                services
                    .state()
                    .into_iter()
                    .filter(move |s| s.namespace() == ns)
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            })
            .run(reconcile, error_policy, Arc::new(Ctx { client, pods })),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(
        name: &str,
        ip: &str,
        labels: serde_json::Value,
        ready: bool,
        port_name: &str,
        port: i32,
    ) -> Arc<Pod> {
        Arc::new(serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels, "uid": format!("uid-{name}")},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": port_name, "containerPort": port}]}]},
            "status": {"podIP": ip, "phase": "Running",
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        })).unwrap())
    }

    #[test]
    fn endpoints_follow_selector_readiness_and_named_ports() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
        })).unwrap();
        let pods = vec![
            pod("a", "10.0.0.1", json!({"app": "web"}), true, "http", 8080),
            pod("b", "10.0.0.2", json!({"app": "web"}), false, "http", 8080),
            pod("c", "10.0.0.3", json!({"app": "web"}), true, "http", 9090),
            pod("d", "10.0.0.4", json!({"app": "db"}), true, "http", 8080),
            pod(
                "e",
                "10.0.0.5",
                json!({"app": "web"}),
                true,
                "metrics",
                8080,
            ),
        ];
        let groups = desired(&svc, &pods);
        // Two port mappings (8080 and 9090); d is not selected; e has no port named http.
        assert_eq!(groups.len(), 2);
        let slices = slices_for(&svc, &groups);
        let all: Vec<(String, bool, i32)> = slices
            .iter()
            .flat_map(|s| {
                let port = s.ports.as_ref().unwrap()[0].port.unwrap();
                s.endpoints.iter().map(move |e| {
                    (
                        e.addresses[0].clone(),
                        e.conditions.as_ref().unwrap().ready.unwrap(),
                        port,
                    )
                })
            })
            .collect();
        assert!(all.contains(&("10.0.0.1".into(), true, 8080)));
        assert!(all.contains(&("10.0.0.2".into(), false, 8080)));
        assert!(all.contains(&("10.0.0.3".into(), true, 9090)));
        assert_eq!(all.len(), 3);
        let s = &slices[0];
        assert_eq!(s.metadata.labels.as_ref().unwrap()[SERVICE_NAME], "web");
        assert_eq!(
            s.metadata.owner_references.as_ref().unwrap()[0].uid,
            "svc-uid"
        );
        let ep = endpoints_for(&svc, &groups);
        let subsets = ep.subsets.unwrap();
        let ready: usize = subsets
            .iter()
            .map(|s| s.addresses.as_ref().map_or(0, |a| a.len()))
            .sum();
        let unready: usize = subsets
            .iter()
            .map(|s| s.not_ready_addresses.as_ref().map_or(0, |a| a.len()))
            .sum();
        assert_eq!((ready, unready), (2, 1));
    }
}
