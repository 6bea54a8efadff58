//! From Kubernetes objects to the datapath's desired state.
//!
//! `service_desired` validates one v1 Service and its discovery.k8s.io/v1 EndpointSlices (as
//! k8s-openapi defines them) and computes, for each of its frontends (ClusterIP, externalIP,
//! LoadBalancer IP or node address with a NodePort), the ordered list of backends the datapath
//! must balance over, applying traffic policies, terminating-endpoint fallback and session
//! affinity the way kube-proxy does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proxy_common::{PROTO_TCP, PROTO_UDP};

mod health;
mod local_dns;
mod source_ranges;
use health::health_check;
pub use health::HealthCheck;
pub use local_dns::LocalDns;
use source_ranges::source_ranges;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label is served by another proxy (kube-proxy's rule: any value, since
/// Ferry, like kube-proxy by default, has no name of its own).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A Service with this label is not proxied (it may still have a cluster IP).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Which node this daemon runs on: decides `Local` traffic policies and NodePort addresses.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    /// The cluster DNS Service answered by this node's own DNS server.
    pub local_dns: Option<LocalDns>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// A destination the datapath intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// A place traffic is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    /// `namespace/name:port` of the Service port, for logs and metrics.
    pub service: String,
    pub nodeport: bool,
    /// ClientIP session affinity timeout in seconds, when affinity is on.
    pub affinity_timeout: Option<u32>,
    /// Backends, sorted, without duplicates. Empty: the datapath drops new flows.
    pub backends: Vec<BackendAddr>,
    /// `loadBalancerSourceRanges` (IPv4) of a load balancer's ingress IP: new flows from other
    /// sources are dropped. `None`: no restriction (every other frontend).
    pub source_ranges: Option<BTreeSet<Ipv4Network>>,
}

pub type DesiredState = BTreeMap<Frontend, FrontendSpec>;

/// Everything one Service asks of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    pub frontends: DesiredState,
    pub health: Option<HealthCheck>,
}

/// One problem found in the input, naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidField {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

/// The input was rejected; the datapath keeps its last good state.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ValidationError(pub Vec<InvalidField>);

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} invalid field(s)", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

struct Errors(Vec<InvalidField>);

impl Errors {
    fn push(&mut self, object: &str, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(InvalidField {
            object: object.to_string(),
            field: field.into(),
            message: message.into(),
        });
    }
}

fn object_name(kind: &str, ns: Option<&String>, name: Option<&String>) -> String {
    format!(
        "{kind} {}/{}",
        ns.map(String::as_str).unwrap_or("default"),
        name.map(String::as_str).unwrap_or("<unnamed>")
    )
}

fn parse_proto(
    errs: &mut Errors,
    obj: &str,
    field: String,
    value: Option<&String>,
) -> Option<Proto> {
    match value.map(String::as_str).unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => {
            errs.push(
                obj,
                field,
                "protocol SCTP is not supported by Ferry's datapath; use TCP or UDP",
            );
            None
        }
        other => {
            errs.push(
                obj,
                field,
                format!("unsupported value \"{other}\": supported values are \"TCP\", \"UDP\""),
            );
            None
        }
    }
}

fn parse_port(errs: &mut Errors, obj: &str, field: String, value: i32) -> Option<u16> {
    if (1..=65535).contains(&value) {
        Some(value as u16)
    } else {
        errs.push(
            obj,
            field,
            format!("invalid value {value}: must be between 1 and 65535, inclusive"),
        );
        None
    }
}

fn parse_ipv4(errs: &mut Errors, obj: &str, field: String, value: &str) -> Option<Ipv4Addr> {
    match value.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => Some(a),
        // IPv6 is valid Kubernetes input that this IPv4 datapath does not handle yet.
        Ok(std::net::IpAddr::V6(_)) => None,
        Err(_) => {
            errs.push(
                obj,
                field,
                format!("invalid value \"{value}\": must be a valid IP address, (e.g. 10.9.8.7)"),
            );
            None
        }
    }
}

/// An endpoint of one Service port, after validation.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: Ipv4Addr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
}

/// Endpoints of a Service, by (port name, protocol).
type PortEndpoints = BTreeMap<(String, Proto), Vec<Endpoint>>;

/// Adds the endpoints of one slice to its Service's, by (port name, protocol).
fn add_slice_endpoints(
    slice: &EndpointSlice,
    obj: &str,
    into: &mut PortEndpoints,
    errs: &mut Errors,
) {
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return,
        other => {
            errs.push(
                obj,
                "addressType",
                format!("unsupported value \"{other}\": supported values are \"IPv4\", \"IPv6\", \"FQDN\""),
            );
            return;
        }
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let proto = parse_proto(
            errs,
            obj,
            format!("ports[{i}].protocol"),
            p.protocol.as_ref(),
        );
        let port = match p.port {
            Some(v) => parse_port(errs, obj, format!("ports[{i}].port"), v),
            None => {
                errs.push(
                    obj,
                    format!("ports[{i}].port"),
                    "Required value: port is required",
                );
                None
            }
        };
        if let (Some(proto), Some(port)) = (proto, port) {
            ports.push((p.name.clone().unwrap_or_default(), proto, port));
        }
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        if ep.addresses.is_empty() {
            errs.push(
                obj,
                format!("endpoints[{i}].addresses"),
                "Required value: at least one address",
            );
        }
        // Kubernetes consumers use the first address of an endpoint.
        let Some(first) = ep.addresses.first() else {
            continue;
        };
        let Some(addr) = parse_ipv4(errs, obj, format!("endpoints[{i}].addresses[0]"), first)
        else {
            continue;
        };
        for (name, proto, port) in &ports {
            into.entry((name.clone(), *proto))
                .or_default()
                .push(Endpoint {
                    addr,
                    port: *port,
                    ready,
                    serving,
                    terminating,
                    node: ep.node_name.clone(),
                });
        }
    }
}

/// Labelled for another proxy, or headless: Ferry leaves it alone.
fn not_ours(svc: &Service) -> bool {
    svc.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
}

/// Adds the frontends of one Service, with the backends its endpoints give them.
fn add_service_frontends(
    ns: &str,
    name: &str,
    svc: &Service,
    eps: &PortEndpoints,
    node: &NodeInfo,
    errs: &mut Errors,
    desired: &mut DesiredState,
) {
    let obj = format!("Service {ns}/{name}");
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    if not_ours(svc) {
        return;
    }
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return;
    }
    if !matches!(svc_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        errs.push(
            &obj,
            "spec.type",
            format!("unsupported value \"{svc_type}\": supported values are \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
        );
        return;
    }
    // Cluster-internal addresses.
    let mut cluster_ips = Vec::new();
    let ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => list.iter().collect(),
        (_, Some(ip)) => vec![ip],
        _ => vec![],
    };
    for (i, ip) in ips.into_iter().enumerate() {
        if ip == "None" || ip.is_empty() {
            continue; // headless
        }
        let field = if spec.cluster_ips.is_some() {
            format!("spec.clusterIPs[{i}]")
        } else {
            "spec.clusterIP".into()
        };
        if let Some(a) = parse_ipv4(errs, &obj, field, ip) {
            cluster_ips.push(a);
        }
    }
    // Addresses reached from outside: external IPs and load-balancer ingress IPs.
    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if let Some(a) = parse_ipv4(errs, &obj, format!("spec.externalIPs[{i}]"), ip) {
            external_ips.push(a);
        }
    }
    let mut lb_ips = Vec::new();
    let source_ranges = if svc_type == "LoadBalancer" {
        source_ranges(svc, &obj, errs)
    } else {
        None
    };
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            if let Some(ip) = &ing.ip {
                if let Some(a) = parse_ipv4(
                    errs,
                    &obj,
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    ip,
                ) {
                    lb_ips.push(a);
                }
            }
        }
    }
    let affinity_timeout = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            if !(1..=86_400).contains(&t) {
                errs.push(
                    &obj,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("invalid value {t}: must be greater than 0 and less than 86400"),
                );
                return;
            }
            Some(t as u32)
        }
        other => {
            errs.push(
                &obj,
                "spec.sessionAffinity",
                format!(
                    "unsupported value \"{other}\": supported values are \"ClientIP\", \"None\""
                ),
            );
            return;
        }
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let Some(ports) = spec.ports.as_ref() else {
        return;
    };
    if ports.is_empty() && !cluster_ips.is_empty() {
        errs.push(
            &obj,
            "spec.ports",
            "Required value: a Service with a clusterIP needs at least one port",
        );
    }
    for (i, p) in ports.iter().enumerate() {
        let proto = parse_proto(
            errs,
            &obj,
            format!("spec.ports[{i}].protocol"),
            p.protocol.as_ref(),
        );
        let port = parse_port(errs, &obj, format!("spec.ports[{i}].port"), p.port);
        let node_port = match p.node_port {
            Some(np) if svc_type != "ClusterIP" => {
                parse_port(errs, &obj, format!("spec.ports[{i}].nodePort"), np)
            }
            Some(_) => None,
            None => None,
        };
        let (Some(proto), Some(port)) = (proto, port) else {
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && port_name.is_empty() {
            errs.push(
                &obj,
                format!("spec.ports[{i}].name"),
                "Required value: ports must be named when a Service has more than one",
            );
        }
        let label = if port_name.is_empty() {
            format!("{ns}/{name}")
        } else {
            format!("{ns}/{name}:{port_name}")
        };
        let all = eps
            .get(&(port_name, proto))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut internal =
            select_endpoints(all, internal_local.then_some(node.name.as_str()), proto);
        if let Some(b) = node
            .local_dns
            .as_ref()
            .and_then(|d| d.backend(ns, name, port, proto))
        {
            internal = vec![b];
        }
        let external = select_endpoints(all, external_local.then_some(node.name.as_str()), proto);
        let spec_for = |backends: &Vec<BackendAddr>, nodeport: bool| FrontendSpec {
            service: label.clone(),
            nodeport,
            affinity_timeout,
            backends: backends.clone(),
            source_ranges: None,
        };
        for addr in &cluster_ips {
            desired.insert(
                Frontend {
                    addr: *addr,
                    port,
                    proto,
                },
                spec_for(&internal, false),
            );
        }
        for addr in &external_ips {
            desired.insert(
                Frontend {
                    addr: *addr,
                    port,
                    proto,
                },
                spec_for(&external, false),
            );
        }
        for addr in &lb_ips {
            desired.insert(
                Frontend {
                    addr: *addr,
                    port,
                    proto,
                },
                FrontendSpec {
                    source_ranges: source_ranges.clone(),
                    ..spec_for(&external, false)
                },
            );
        }
        if let Some(np) = node_port {
            for addr in &node.addresses {
                let fe = Frontend {
                    addr: *addr,
                    port: np,
                    proto,
                };
                if desired.insert(fe, spec_for(&external, true)).is_some() {
                    errs.push(
                        &obj,
                        format!("spec.ports[{i}].nodePort"),
                        format!("Duplicate value: {np}/{proto} is used by another Service"),
                    );
                }
            }
        }
    }
}

/// The frontends of one Service from its own slices (slices of other Services are ignored):
/// what a live source recomputes when that Service or one of its slices changes.
pub fn service_desired<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
) -> Result<ServiceState, ValidationError> {
    let mut errs = Errors(Vec::new());
    let ns = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let Some(name) = svc.metadata.name.clone() else {
        errs.push(
            &object_name("Service", Some(&ns), None),
            "metadata.name",
            "Required value: name is required",
        );
        return Err(ValidationError(errs.0));
    };
    let mut eps = PortEndpoints::new();
    for slice in slices {
        let obj = object_name("EndpointSlice", Some(&ns), slice.metadata.name.as_ref());
        add_slice_endpoints(slice, &obj, &mut eps, &mut errs);
    }
    let mut frontends = DesiredState::new();
    add_service_frontends(&ns, &name, svc, &eps, node, &mut errs, &mut frontends);
    let health = health_check(&ns, &name, svc, &eps, node, &mut errs);
    if errs.0.is_empty() {
        Ok(ServiceState { frontends, health })
    } else {
        Err(ValidationError(errs.0))
    }
}

/// kube-proxy's rule: ready endpoints (restricted to this node for a `Local` policy); when none
/// is left, endpoints that are serving while terminating, so a rolling update drains gracefully.
fn select_endpoints(all: &[Endpoint], local_node: Option<&str>, proto: Proto) -> Vec<BackendAddr> {
    let candidates = all.iter().filter(|e| match local_node {
        Some(n) => e.node.as_deref() == Some(n),
        None => true,
    });
    let ready: BTreeSet<BackendAddr> = candidates
        .clone()
        .filter(|e| e.ready && !e.terminating)
        .map(|e| BackendAddr {
            addr: e.addr,
            port: e.port,
            proto,
        })
        .collect();
    let chosen = if ready.is_empty() {
        candidates
            .filter(|e| e.serving && e.terminating)
            .map(|e| BackendAddr {
                addr: e.addr,
                port: e.port,
                proto,
            })
            .collect()
    } else {
        ready
    };
    chosen.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            addresses: vec![Ipv4Addr::new(192, 168, 77, 1)],
            local_dns: None,
        }
    }

    pub(super) const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.3]
  nodeName: node-a
- addresses: [10.244.1.2]
  nodeName: node-b
- addresses: [10.244.1.4]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-a
"#;

    fn be(last: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(10, 244, 1, last),
            port: 8080,
            proto: Proto::Tcp,
        }
    }

    /// What the Service in `yaml` (a Service, then its slices) asks of node-a.
    pub(super) fn state(yaml: &str) -> Result<ServiceState, ValidationError> {
        state_on(yaml, &node())
    }

    /// What the Service in `yaml` asks of `node`.
    pub(super) fn state_on(yaml: &str, node: &NodeInfo) -> Result<ServiceState, ValidationError> {
        let mut docs = yaml.split("\n---\n");
        let svc: Service = serde_yaml::from_str(docs.next().unwrap()).unwrap();
        let slices: Vec<EndpointSlice> = docs.map(|d| serde_yaml::from_str(d).unwrap()).collect();
        service_desired(&svc, &slices, node)
    }

    /// The frontends of the Service in `yaml`.
    fn desired(yaml: &str) -> Result<DesiredState, ValidationError> {
        state(yaml).map(|s| s.frontends)
    }

    #[test]
    fn cluster_ip_and_nodeport_get_ready_backends_sorted() {
        let d = desired(WEB).unwrap();
        let vip = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Proto::Tcp,
        };
        let np = Frontend {
            addr: Ipv4Addr::new(192, 168, 77, 1),
            port: 30080,
            proto: Proto::Tcp,
        };
        assert_eq!(d[&vip].backends, vec![be(2), be(3)]);
        assert_eq!(d[&vip].service, "default/web:http");
        assert!(d[&np].nodeport);
        assert_eq!(d[&np].backends, vec![be(2), be(3)]);
    }

    #[test]
    fn local_policies_keep_this_nodes_endpoints_and_fall_back_to_terminating() {
        let yaml = WEB.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local",
        );
        let d = desired(&yaml).unwrap();
        let vip = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Proto::Tcp,
        };
        assert_eq!(d[&vip].backends, vec![be(3)]);
        // Only the terminating endpoint is left on node-a once .3 is not ready.
        let yaml = yaml.replace(
            "- addresses: [10.244.1.3]\n",
            "- addresses: [10.244.1.3]\n  conditions: {ready: false}\n",
        );
        let d = desired(&yaml).unwrap();
        assert_eq!(d[&vip].backends, vec![be(4)]);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            ("port: 80,", "port: 70000,", "spec.ports[0].port"),
            (
                "clusterIP: 10.96.0.10",
                "clusterIP: 10.96.0.300",
                "spec.clusterIP",
            ),
            ("protocol: TCP", "protocol: QUIC", "ports[0].protocol"),
            (
                "addresses: [10.244.1.2]",
                "addresses: [10.244.1.x]",
                "endpoints[1].addresses[0]",
            ),
        ];
        for (from, to, field) in cases {
            let err = desired(&WEB.replace(from, to)).unwrap_err();
            assert!(
                err.0.iter().any(|e| e.field == field),
                "{to}: expected {field} in {err}"
            );
        }
    }

    #[test]
    fn services_labelled_for_another_proxy_or_headless_are_skipped() {
        assert!(!desired(WEB).unwrap().is_empty());
        for label in [
            "service.kubernetes.io/service-proxy-name: other",
            "service.kubernetes.io/service-proxy-name: ''",
            "service.kubernetes.io/headless: ''",
        ] {
            let yaml = WEB.replace(
                "metadata: {name: web, namespace: default}",
                &format!("metadata: {{name: web, namespace: default, labels: {{{label}}}}}"),
            );
            assert!(desired(&yaml).unwrap().is_empty(), "{label}");
        }
    }

    #[test]
    fn affinity_defaults_to_three_hours() {
        let yaml = WEB.replace(
            "type: NodePort",
            "type: NodePort\n  sessionAffinity: ClientIP",
        );
        let d = desired(&yaml).unwrap();
        assert!(d
            .values()
            .all(|s| s.affinity_timeout == Some(DEFAULT_AFFINITY_TIMEOUT)));
    }

    #[test]
    fn load_balancer_source_ranges_restrict_only_the_ingress_ip() {
        let lb = |spec_extra: &str, meta_extra: &str| {
            WEB.replacen(
                "type: NodePort",
                &format!("type: LoadBalancer\n{spec_extra}"),
                1,
            )
            .replacen(
                "metadata: {name: web, namespace: default}",
                &format!("metadata: {{name: web, namespace: default{meta_extra}}}"),
                1,
            )
            .replacen(
                "\n---\n",
                "\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.10}]}}\n---\n",
                1,
            )
        };
        let ranges_of = |d: &DesiredState, a: [u8; 4]| {
            d.iter()
                .find(|(fe, _)| fe.addr == Ipv4Addr::from(a))
                .map(|(_, s)| s.source_ranges.clone())
                .expect("frontend")
        };
        let net = |s: &str| s.parse::<Ipv4Network>().unwrap();
        let d = desired(&lb(
            "  loadBalancerSourceRanges: [10.1.2.3/8, 2001:db8::/32, 203.0.113.7/32]",
            "",
        ))
        .unwrap();
        assert_eq!(
            ranges_of(&d, [192, 0, 2, 10]),
            Some([net("10.0.0.0/8"), net("203.0.113.7/32")].into())
        );
        assert_eq!(
            ranges_of(&d, [10, 96, 0, 10]),
            None,
            "the cluster IP is not restricted"
        );
        assert_eq!(ranges_of(&d, [192, 168, 77, 1]), None, "nor the node port");

        // The annotation, when the field is empty.
        let annotated = ", annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: '198.51.100.0/24, 192.0.2.0/28'}";
        let d = desired(&lb("", annotated)).unwrap();
        assert_eq!(
            ranges_of(&d, [192, 0, 2, 10]),
            Some([net("198.51.100.0/24"), net("192.0.2.0/28")].into())
        );
        // Only IPv6 ranges: no IPv4 client is admitted.
        let d = desired(&lb("  loadBalancerSourceRanges: [2001:db8::/32]", "")).unwrap();
        assert_eq!(ranges_of(&d, [192, 0, 2, 10]), Some(BTreeSet::new()));
        // No ranges: no restriction.
        assert_eq!(
            ranges_of(&desired(&lb("", "")).unwrap(), [192, 0, 2, 10]),
            None
        );

        let err = desired(&lb("  loadBalancerSourceRanges: [10.0.0.0/8, bogus]", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.loadBalancerSourceRanges[1]"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }
}
