//! The resources the API server serves: group, version, kind, plural, scope, subresources,
//! short names, the fields a field selector may name, and the k8s-openapi type each object is
//! decoded into (so field names, types and unknown fields are judged as Kubernetes does).

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use k8s_openapi::api::{
    apps::v1 as apps, authentication::v1 as authn, authorization::v1 as authz,
    autoscaling::v2 as autoscaling, batch::v1 as batch, coordination::v1 as coordination,
    core::v1 as core, discovery::v1 as discovery, networking::v1 as networking,
    policy::v1 as policy, rbac::v1 as rbac, scheduling::v1 as scheduling,
};

pub struct ResourceInfo {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Subresources besides the object itself: status, scale, binding, finalize.
    pub subresources: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// A question put to the server and answered, never stored: only `create` is served
    /// (the review APIs, `reviews.rs`).
    pub create_only: bool,
    /// Fields a field selector may name, besides metadata.name and metadata.namespace.
    pub fields: &'static [&'static str],
    /// Decodes into the typed object and back: errors name the field.
    pub normalize: fn(Value) -> Result<Value, String>,
    /// The typed object's schema, for the OpenAPI documents.
    pub schema: fn(&mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema,
}

impl ResourceInfo {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Prefix of this resource's keys in the store (all namespaces).
    pub fn prefix(&self) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{g}/{}/", self.plural)
    }

    pub fn key(&self, ns: &str, name: &str) -> String {
        if self.namespaced {
            format!("{}{ns}/{name}", self.prefix())
        } else {
            format!("{}{name}", self.prefix())
        }
    }

    pub fn list_prefix(&self, ns: Option<&str>) -> String {
        match ns {
            Some(ns) if self.namespaced => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }

    /// The group-qualified resource name used in messages: `deployments.apps`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn field_selectable(&self) -> Vec<&'static str> {
        let mut f = vec!["metadata.name"];
        if self.namespaced {
            f.push("metadata.namespace");
        }
        f.extend(self.fields);
        f
    }
}

fn typed<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, String> {
    let t: T = serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path.is_empty() {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })?;
    serde_json::to_value(&t).map_err(|e| e.to_string())
}

fn schema_of<T: schemars::JsonSchema>(
    g: &mut schemars::gen::SchemaGenerator,
) -> schemars::schema::Schema {
    g.subschema_for::<T>()
}

macro_rules! res {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr,
     $short:expr, $sub:expr, $cat:expr, $fields:expr, $ty:ty) => {
        ResourceInfo {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $ns,
            short_names: $short,
            subresources: $sub,
            categories: $cat,
            create_only: false,
            fields: $fields,
            normalize: typed::<$ty>,
            schema: schema_of::<$ty>,
        }
    };
}

/// A review: created, answered, not stored.
macro_rules! review {
    ($group:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr, $ty:ty) => {
        ResourceInfo {
            create_only: true,
            ..res!($group, "v1", $kind, $plural, $singular, $ns, NONE, NONE, NONE, NONE, $ty)
        }
    };
}

const ALL: &[&str] = &["all"];
const NONE: &[&str] = &[];

pub static RESOURCES: &[ResourceInfo] = &[
    res!(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        &["ns"],
        &["status", "finalize"],
        NONE,
        &["status.phase"],
        core::Namespace
    ),
    res!(
        "",
        "v1",
        "Pod",
        "pods",
        "pod",
        true,
        &["po"],
        &[
            "status",
            "binding",
            "eviction",
            "log",
            "exec",
            "attach",
            "portforward"
        ],
        ALL,
        &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName"
        ],
        core::Pod
    ),
    res!(
        "",
        "v1",
        "Service",
        "services",
        "service",
        true,
        &["svc"],
        &["status"],
        ALL,
        &["spec.clusterIP", "spec.type"],
        core::Service
    ),
    res!(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        "endpoints",
        true,
        &["ep"],
        NONE,
        NONE,
        NONE,
        core::Endpoints
    ),
    res!(
        "",
        "v1",
        "Node",
        "nodes",
        "node",
        false,
        &["no"],
        &["status"],
        NONE,
        &["spec.unschedulable"],
        core::Node
    ),
    res!(
        "",
        "v1",
        "Event",
        "events",
        "event",
        true,
        &["ev"],
        NONE,
        NONE,
        &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type"
        ],
        core::Event
    ),
    res!(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        true,
        &["cm"],
        NONE,
        NONE,
        NONE,
        core::ConfigMap
    ),
    res!(
        "",
        "v1",
        "Secret",
        "secrets",
        "secret",
        true,
        NONE,
        NONE,
        NONE,
        &["type"],
        core::Secret
    ),
    res!(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        &["sa"],
        &["token"],
        NONE,
        NONE,
        core::ServiceAccount
    ),
    res!(
        "",
        "v1",
        "ReplicationController",
        "replicationcontrollers",
        "replicationcontroller",
        true,
        &["rc"],
        &["status", "scale"],
        ALL,
        &["status.replicas"],
        core::ReplicationController
    ),
    res!(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        true,
        NONE,
        NONE,
        NONE,
        &["addressType"],
        discovery::EndpointSlice
    ),
    res!(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        true,
        NONE,
        NONE,
        NONE,
        NONE,
        coordination::Lease
    ),
    res!(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        &["deploy"],
        &["status", "scale"],
        ALL,
        NONE,
        apps::Deployment
    ),
    res!(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        &["rs"],
        &["status", "scale"],
        ALL,
        &["status.replicas"],
        apps::ReplicaSet
    ),
    res!(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        "daemonset",
        true,
        &["ds"],
        &["status"],
        ALL,
        NONE,
        apps::DaemonSet
    ),
    res!(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        true,
        &["sts"],
        &["status", "scale"],
        ALL,
        NONE,
        apps::StatefulSet
    ),
    res!(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        "controllerrevision",
        true,
        NONE,
        NONE,
        NONE,
        NONE,
        apps::ControllerRevision
    ),
    res!(
        "batch",
        "v1",
        "Job",
        "jobs",
        "job",
        true,
        NONE,
        &["status"],
        ALL,
        &["status.successful"],
        batch::Job
    ),
    res!(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        "cronjob",
        true,
        &["cj"],
        &["status"],
        ALL,
        NONE,
        batch::CronJob
    ),
    res!(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        "role",
        true,
        NONE,
        NONE,
        NONE,
        NONE,
        rbac::Role
    ),
    res!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        "clusterrole",
        false,
        NONE,
        NONE,
        NONE,
        NONE,
        rbac::ClusterRole
    ),
    res!(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        "rolebinding",
        true,
        NONE,
        NONE,
        NONE,
        NONE,
        rbac::RoleBinding
    ),
    res!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        false,
        NONE,
        NONE,
        NONE,
        NONE,
        rbac::ClusterRoleBinding
    ),
    res!(
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        "resourcequota",
        true,
        &["quota"],
        &["status"],
        NONE,
        NONE,
        core::ResourceQuota
    ),
    res!(
        "",
        "v1",
        "LimitRange",
        "limitranges",
        "limitrange",
        true,
        &["limits"],
        NONE,
        NONE,
        NONE,
        core::LimitRange
    ),
    res!(
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        "priorityclass",
        false,
        &["pc"],
        NONE,
        NONE,
        NONE,
        scheduling::PriorityClass
    ),
    res!(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        true,
        &["pdb"],
        &["status"],
        NONE,
        NONE,
        policy::PodDisruptionBudget
    ),
    res!(
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        "ingress",
        true,
        &["ing"],
        &["status"],
        NONE,
        NONE,
        networking::Ingress
    ),
    res!(
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        "ingressclass",
        false,
        NONE,
        NONE,
        NONE,
        NONE,
        networking::IngressClass
    ),
    res!(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        &["hpa"],
        &["status"],
        ALL,
        NONE,
        autoscaling::HorizontalPodAutoscaler
    ),
    review!(
        "authorization.k8s.io",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        false,
        authz::SelfSubjectAccessReview
    ),
    review!(
        "authorization.k8s.io",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview",
        false,
        authz::SelfSubjectRulesReview
    ),
    review!(
        "authorization.k8s.io",
        "SubjectAccessReview",
        "subjectaccessreviews",
        "subjectaccessreview",
        false,
        authz::SubjectAccessReview
    ),
    review!(
        "authorization.k8s.io",
        "LocalSubjectAccessReview",
        "localsubjectaccessreviews",
        "localsubjectaccessreview",
        true,
        authz::LocalSubjectAccessReview
    ),
    review!(
        "authentication.k8s.io",
        "TokenReview",
        "tokenreviews",
        "tokenreview",
        false,
        authn::TokenReview
    ),
    review!(
        "authentication.k8s.io",
        "SelfSubjectReview",
        "selfsubjectreviews",
        "selfsubjectreview",
        false,
        authn::SelfSubjectReview
    ),
];

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resources served in one group version.
pub fn in_group_version(group: &str, version: &str) -> Vec<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect()
}

pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// The groups served, in discovery order, each with its one version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// Field paths present in `input` that decoding dropped: fields the type does not have.
pub fn unknown_fields(input: &Value, output: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(input, output, "", &mut out);
    out
}

fn walk(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    None if !v.is_null() => out.push(p),
                    Some(ov) => walk(v, ov, &p, out),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (a, b)) in i.iter().zip(o.iter()).enumerate() {
                walk(a, b, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_decoding_names_the_bad_field_and_finds_unknown_ones() {
        let d = find("apps", "v1", "deployments").unwrap();
        let bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
            "spec": {"replicas": "three", "selector": {}, "template": {}}});
        let err = (d.normalize)(bad).unwrap_err();
        assert!(err.starts_with("spec.replicas: invalid type"), "{err}");
        let extra = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
            "spec": {"replicaz": 3, "selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagee": "x"}]}}}});
        let out = (d.normalize)(extra.clone()).unwrap();
        assert_eq!(
            unknown_fields(&extra, &out),
            vec!["spec.replicaz", "spec.template.spec.containers[0].imagee"]
        );
    }

    #[test]
    fn keys_keep_namespaces_apart() {
        let p = find("", "v1", "pods").unwrap();
        assert_eq!(p.key("a", "x"), "/registry/core/pods/a/x");
        assert!(!p.key("ab", "x").starts_with(&p.list_prefix(Some("a"))));
        let n = find("", "v1", "nodes").unwrap();
        assert_eq!(n.key("", "n1"), "/registry/core/nodes/n1");
    }
}
