//! A Service's health check node port, as this node answers it: a LoadBalancer keeping external
//! traffic local (`externalTrafficPolicy: Local`) with a `healthCheckNodePort` tells load
//! balancers how many of its ready endpoints run here. Served by `healthcheck.rs`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;

use super::{not_ours, parse_port, Errors, NodeInfo, PortEndpoints};

/// What a Service's `healthCheckNodePort` answers on this node (kube-proxy's service health
/// server): a LoadBalancer keeping external traffic local tells load balancers which nodes
/// have endpoints of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node (distinct addresses).
    pub local_endpoints: usize,
}

/// The health check of a LoadBalancer Service with `externalTrafficPolicy: Local`, when it has
/// a valid `healthCheckNodePort`.
pub(super) fn health_check(
    ns: &str,
    name: &str,
    svc: &Service,
    eps: &PortEndpoints,
    node: &NodeInfo,
    errs: &mut Errors,
) -> Option<HealthCheck> {
    let spec = svc.spec.as_ref()?;
    if not_ours(svc)
        || spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let obj = format!("Service {ns}/{name}");
    let port = parse_port(
        errs,
        &obj,
        "spec.healthCheckNodePort".into(),
        spec.health_check_node_port?,
    )?;
    let local: BTreeSet<Ipv4Addr> = eps
        .values()
        .flatten()
        .filter(|e| e.ready && e.node.as_deref() == Some(node.name.as_str()))
        .map(|e| e.addr)
        .collect();
    Some(HealthCheck {
        port,
        namespace: ns.to_string(),
        name: name.to_string(),
        local_endpoints: local.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{state, WEB};

    #[test]
    fn local_load_balancers_get_a_health_check_counting_ready_local_endpoints() {
        assert_eq!(state(WEB).unwrap().health, None, "a NodePort has none");
        let lb = WEB.replace(
            "type: NodePort",
            "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000",
        );
        // node-a has 10.244.1.3 ready and 10.244.1.4 terminating (not ready).
        let hc = state(&lb).unwrap().health.unwrap();
        assert_eq!((hc.port, hc.local_endpoints), (31000, 1));
        assert_eq!(
            (hc.namespace.as_str(), hc.name.as_str()),
            ("default", "web")
        );
        let none_ready = lb.replace(
            "- addresses: [10.244.1.3]\n",
            "- addresses: [10.244.1.3]\n  conditions: {ready: false}\n",
        );
        assert_eq!(
            state(&none_ready).unwrap().health.unwrap().local_endpoints,
            0
        );
        let cluster = lb.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        );
        assert_eq!(state(&cluster).unwrap().health, None);
    }
}
