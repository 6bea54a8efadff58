//! Admission, as the Kubernetes API server does it before an object is stored: defaults
//! (Service type and protocols, pod restart policy, Deployment strategy...) and validation
//! (names, ports, selectors, immutable fields) with messages in Kubernetes' style.
//! Cluster IPs and node ports are allocated by the server (see `alloc` in the parent module).

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Map, Value};

use super::resources::ResourceInfo;
use super::status::FieldError;
use ferry_common::selectors::{labels_of, LabelSelector};

pub const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const SVC_NAME_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

pub use super::metadata::{is_dns1123_label, is_dns1123_subdomain};

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// Validates `metadata.name` for the resource's naming rule.
pub fn validate_name(info: &ResourceInfo, name: &str) -> Vec<FieldError> {
    let (ok, msg) = match info.plural {
        "namespaces" => (is_dns1123_label(name), LABEL_MSG),
        "services" => (is_dns1035_label(name), SVC_NAME_MSG),
        // RBAC names are path segments: anything without '/' or '%'.
        "roles" | "clusterroles" | "rolebindings" | "clusterrolebindings" => (
            !name.is_empty() && !name.contains('/') && !name.contains('%'),
            "may not contain '/' or '%'",
        ),
        _ => (is_dns1123_subdomain(name), SUBDOMAIN_MSG),
    };
    if name.is_empty() {
        return vec![FieldError::required_why(
            "metadata.name",
            "name or generateName is required",
        )];
    }
    if ok {
        vec![]
    } else {
        vec![FieldError::invalid(
            "metadata.name",
            format!("\"{name}\""),
            msg,
        )]
    }
}

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        if m.get(key).is_none_or(|x| x.is_null()) {
            m.insert(key.into(), v);
        }
    }
}

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    if !v[key].is_object() {
        v[key] = Value::Object(Map::new());
    }
    &mut v[key]
}

// ---------------------------------------------------------------------------------------
// Defaults

pub fn default(info: &ResourceInfo, obj: &mut Value) {
    match (info.group, info.kind) {
        ("", "Service") => default_service(obj),
        ("", "Pod") => {
            default_pod_spec(obj_mut(obj, "spec"));
            set_default(obj_mut(obj, "status"), "phase", json!("Pending"));
            let qos = qos_class(&obj["spec"]);
            set_default(obj_mut(obj, "status"), "qosClass", json!(qos));
        }
        ("", "Namespace") => {
            set_default(obj_mut(obj, "spec"), "finalizers", json!(["kubernetes"]));
            set_default(obj_mut(obj, "status"), "phase", json!("Active"));
        }
        ("", "ReplicationController") | ("apps", "ReplicaSet") => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "replicas", json!(1));
            default_template(spec);
        }
        ("apps", "Deployment") => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            let strategy = obj_mut(spec, "strategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = obj_mut(strategy, "rollingUpdate");
                set_default(ru, "maxSurge", json!("25%"));
                set_default(ru, "maxUnavailable", json!("25%"));
            }
            default_template(spec);
        }
        ("apps", "DaemonSet") => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "revisionHistoryLimit", json!(10));
            let strategy = obj_mut(spec, "updateStrategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = obj_mut(strategy, "rollingUpdate");
                set_default(ru, "maxUnavailable", json!(1));
                set_default(ru, "maxSurge", json!(0));
            }
            default_template(spec);
        }
        ("apps", "StatefulSet") => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            set_default(spec, "revisionHistoryLimit", json!(10));
            let strategy = obj_mut(spec, "updateStrategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            default_template(spec);
        }
        ("batch", "Job") => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "backoffLimit", json!(6));
            set_default(spec, "completions", json!(1));
            set_default(spec, "parallelism", json!(1));
            set_default(spec, "completionMode", json!("NonIndexed"));
            set_default(spec, "suspend", json!(false));
            default_template(spec);
        }
        ("batch", "CronJob") => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "concurrencyPolicy", json!("Allow"));
            set_default(spec, "suspend", json!(false));
            set_default(spec, "successfulJobsHistoryLimit", json!(3));
            set_default(spec, "failedJobsHistoryLimit", json!(1));
            if let Some(js) = spec.pointer_mut("/jobTemplate/spec") {
                set_default(js, "backoffLimit", json!(6));
                default_template(js);
            }
        }
        ("", "Secret") => set_default(obj, "type", json!("Opaque")),
        _ => {}
    }
}

/// How long a pod stays bound to a node that stopped answering (or reports not ready) before
/// it is evicted, unless it says otherwise: Kubernetes' DefaultTolerationSeconds admission.
pub const DEFAULT_TOLERATION_SECONDS: i64 = 300;

/// Admission that applies to creates only (defaults apply to updates too).
pub fn on_create(info: &ResourceInfo, obj: &mut Value) {
    if (info.group, info.kind) == ("", "Pod") {
        // Every pod tolerates a node being not ready or unreachable for a while, so a short
        // loss of heartbeat does not evict it at once (DefaultTolerationSeconds).
        let spec = obj_mut(obj, "spec");
        if !spec["tolerations"].is_array() {
            spec["tolerations"] = json!([]);
        }
        let list = spec["tolerations"].as_array_mut().expect("set above");
        for key in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let covered = list.iter().any(|t| {
                let effect = t["effect"].as_str().unwrap_or_default();
                (effect.is_empty() || effect == "NoExecute")
                    && (t["key"] == key || (t["key"].is_null() && t["operator"] == "Exists"))
            });
            if !covered {
                list.push(
                    json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                                 "tolerationSeconds": DEFAULT_TOLERATION_SECONDS}),
                );
            }
        }
    }
}

fn default_template(spec: &mut Value) {
    if let Some(t) = spec.get_mut("template") {
        default_pod_spec(obj_mut(t, "spec"));
    }
}

fn default_pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(list).and_then(|c| c.as_array_mut()) {
            for c in cs {
                let image = c["image"].as_str().unwrap_or_default().to_string();
                let latest = !image.contains(':') || image.ends_with(":latest");
                let tag_less = !image.rsplit('/').next().unwrap_or("").contains(':');
                set_default(
                    c,
                    "imagePullPolicy",
                    json!(if latest || tag_less {
                        "Always"
                    } else {
                        "IfNotPresent"
                    }),
                );
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(|p| p.as_array_mut()) {
                    for p in ports {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
                for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                    if let Some(p) = c.get_mut(probe).filter(|p| p.is_object()) {
                        default_probe(p);
                    }
                }
            }
        }
    }
}

/// Kubernetes' probe defaults: every 10 s, 1 s timeout, 1 success, 3 failures.
fn default_probe(p: &mut Value) {
    set_default(p, "timeoutSeconds", json!(1));
    set_default(p, "periodSeconds", json!(10));
    set_default(p, "successThreshold", json!(1));
    set_default(p, "failureThreshold", json!(3));
    if let Some(h) = p.get_mut("httpGet").filter(|h| h.is_object()) {
        set_default(h, "scheme", json!("HTTP"));
        set_default(h, "path", json!("/"));
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let cs = spec["containers"].as_array().cloned().unwrap_or_default();
    let has = |c: &Value, k: &str| c["resources"][k].as_object().is_some_and(|m| !m.is_empty());
    if cs.iter().all(|c| !has(c, "requests") && !has(c, "limits")) {
        "BestEffort"
    } else if cs.iter().all(|c| {
        let l = &c["resources"]["limits"];
        let r = &c["resources"]["requests"];
        l["cpu"].is_string()
            && l["memory"].is_string()
            && (r["cpu"].is_null() || r["cpu"] == l["cpu"])
            && (r["memory"].is_null() || r["memory"] == l["memory"])
    }) {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn default_service(obj: &mut Value) {
    let spec = obj_mut(obj, "spec");
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    let ty = spec["type"].as_str().unwrap_or_default().to_string();
    if ty != "ExternalName" {
        set_default(spec, "internalTrafficPolicy", json!("Cluster"));
        set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
        set_default(spec, "ipFamilies", json!(["IPv4"]));
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if spec["sessionAffinity"] == "ClientIP" {
        set_default(
            spec,
            "sessionAffinityConfig",
            json!({"clientIP": {"timeoutSeconds": 10800}}),
        );
    }
    if let Some(ports) = spec.get_mut("ports").and_then(|p| p.as_array_mut()) {
        for p in ports {
            set_default(p, "protocol", json!("TCP"));
            let port = p["port"].clone();
            set_default(p, "targetPort", port);
        }
    }
    set_default(obj_mut(obj, "status"), "loadBalancer", json!({}));
}

// ---------------------------------------------------------------------------------------
// Validation

pub fn validate(info: &ResourceInfo, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    super::metadata::validate_meta(obj, &mut errs);
    match (info.group, info.kind) {
        ("", "ConfigMap" | "Secret") => super::metadata::validate_data(info.kind, obj, &mut errs),
        ("", "Service") => validate_service(obj, old, &mut errs),
        ("scheduling.k8s.io", "PriorityClass") => {
            super::priority::validate_class(obj, old, &mut errs)
        }
        ("", "Pod") => {
            validate_pod_spec(&obj["spec"], "spec", &mut errs);
            if let Some(old) = old {
                // A pod's spec is immutable but for images, deadlines and tolerations.
                let strip = |v: &Value| {
                    let mut s = v["spec"].clone();
                    for list in ["containers", "initContainers"] {
                        if let Some(cs) = s.get_mut(list).and_then(|c| c.as_array_mut()) {
                            for c in cs {
                                c.as_object_mut().map(|m| m.remove("image"));
                            }
                        }
                    }
                    for f in ["activeDeadlineSeconds", "tolerations", "nodeName"] {
                        s.as_object_mut().map(|m| m.remove(f));
                    }
                    s
                };
                if strip(obj) != strip(old) {
                    errs.push(FieldError::forbidden(
                        "spec",
                        "pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations)",
                    ));
                }
                let old_node = old["spec"]["nodeName"].as_str().unwrap_or_default();
                if !old_node.is_empty() && obj["spec"]["nodeName"] != old["spec"]["nodeName"] {
                    errs.push(FieldError::forbidden(
                        "spec.nodeName",
                        "field is immutable once set",
                    ));
                }
            }
        }
        ("", "ReplicationController") => {
            let spec = &obj["spec"];
            non_negative(spec, "replicas", "spec.replicas", &mut errs);
            if let Some(sel) = spec["selector"].as_object() {
                let tl = labels_of(&spec["template"]);
                if sel
                    .iter()
                    .any(|(k, v)| tl.get(k).map(String::as_str) != v.as_str())
                {
                    errs.push(FieldError::invalid(
                        "spec.template.metadata.labels",
                        format!("{:?}", tl),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
            validate_pod_spec(&spec["template"]["spec"], "spec.template.spec", &mut errs);
        }
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") => {
            let spec = &obj["spec"];
            if info.kind != "DaemonSet" {
                non_negative(spec, "replicas", "spec.replicas", &mut errs);
            }
            validate_selector(spec, &mut errs);
            validate_pod_spec(&spec["template"]["spec"], "spec.template.spec", &mut errs);
            if info.kind == "Deployment" && spec["strategy"]["type"] == "RollingUpdate" {
                let ru = &spec["strategy"]["rollingUpdate"];
                let zero = |v: &Value| v == &json!(0) || v == &json!("0%");
                if zero(&ru["maxSurge"]) && zero(&ru["maxUnavailable"]) {
                    errs.push(FieldError::invalid(
                        "spec.strategy.rollingUpdate.maxUnavailable",
                        "0",
                        "may not be 0 when `maxSurge` is 0",
                    ));
                }
            }
            if let Some(old) = old {
                if old["spec"]["selector"] != spec["selector"] {
                    errs.push(FieldError::invalid(
                        "spec.selector",
                        spec["selector"].to_string(),
                        "field is immutable",
                    ));
                }
            }
        }
        ("batch", "Job") => {
            let spec = &obj["spec"];
            for f in ["parallelism", "completions", "backoffLimit"] {
                non_negative(spec, f, &format!("spec.{f}"), &mut errs);
            }
            validate_pod_spec(&spec["template"]["spec"], "spec.template.spec", &mut errs);
            let rp = spec["template"]["spec"]["restartPolicy"]
                .as_str()
                .unwrap_or_default();
            if rp == "Always" {
                errs.push(FieldError::unsupported(
                    "spec.template.spec.restartPolicy",
                    rp,
                    &["OnFailure", "Never"],
                ));
            }
        }
        ("batch", "CronJob") => {
            let sched = obj["spec"]["schedule"].as_str().unwrap_or_default();
            if sched.is_empty() {
                errs.push(FieldError::required("spec.schedule"));
            } else if let Err(e) = ferry_common::cron::Schedule::parse(sched) {
                errs.push(FieldError::invalid(
                    "spec.schedule",
                    format!("\"{sched}\""),
                    &e,
                ));
            }
            if let Some(tz) = obj["spec"]["timeZone"].as_str().filter(|z| !z.is_empty()) {
                if jiff::tz::TimeZone::get(tz).is_err() {
                    errs.push(FieldError::invalid(
                        "spec.timeZone",
                        format!("\"{tz}\""),
                        "unknown time zone (use an IANA name such as Europe/Berlin)",
                    ));
                }
            }
        }
        _ => {}
    }
    errs
}

fn non_negative(spec: &Value, key: &str, field: &str, errs: &mut Vec<FieldError>) {
    if let Some(n) = spec[key].as_i64() {
        if n < 0 {
            errs.push(FieldError::invalid(
                field,
                n,
                "must be greater than or equal to 0",
            ));
        }
    }
}

fn validate_selector(spec: &Value, errs: &mut Vec<FieldError>) {
    let sel = &spec["selector"];
    if sel.is_null() {
        errs.push(FieldError::required("spec.selector"));
        return;
    }
    match LabelSelector::from_object(sel) {
        Err(e) => errs.push(FieldError::invalid("spec.selector", sel.to_string(), &e)),
        Ok(s) if s.is_empty() => errs.push(FieldError::invalid(
            "spec.selector",
            sel.to_string(),
            "empty selector is invalid for deployment",
        )),
        Ok(s) => {
            let tl = labels_of(&spec["template"]);
            if !s.matches(&tl) {
                let shown: BTreeMap<_, _> = tl.into_iter().collect();
                errs.push(FieldError::invalid(
                    "spec.template.metadata.labels",
                    format!("map[string]string{shown:?}"),
                    "`selector` does not match template `labels`",
                ));
            }
        }
    }
}

fn validate_port(v: &Value, field: &str, errs: &mut Vec<FieldError>) {
    match v.as_i64() {
        Some(p) if (1..=65535).contains(&p) => {}
        Some(p) => errs.push(FieldError::invalid(
            field,
            p,
            "must be between 1 and 65535, inclusive",
        )),
        None => errs.push(FieldError::required(field)),
    }
}

fn validate_pod_spec(spec: &Value, field: &str, errs: &mut Vec<FieldError>) {
    let cs = spec["containers"].as_array();
    if cs.is_none_or(|c| c.is_empty()) {
        errs.push(FieldError::required(format!("{field}.containers")));
    }
    let mut names = HashSet::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in spec[list].as_array().into_iter().flatten().enumerate() {
            let f = format!("{field}.{list}[{i}]");
            let name = c["name"].as_str().unwrap_or_default();
            if name.is_empty() {
                errs.push(FieldError::required(format!("{f}.name")));
            } else if !is_dns1123_label(name) {
                errs.push(FieldError::invalid(
                    format!("{f}.name"),
                    format!("\"{name}\""),
                    LABEL_MSG,
                ));
            } else if !names.insert(name.to_string()) {
                errs.push(FieldError::duplicate(
                    format!("{f}.name"),
                    format!("\"{name}\""),
                ));
            }
            if c["image"].as_str().unwrap_or_default().trim().is_empty() {
                errs.push(FieldError::required(format!("{f}.image")));
            }
            for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                validate_port(
                    &p["containerPort"],
                    &format!("{f}.ports[{j}].containerPort"),
                    errs,
                );
                if let Some(proto) = p["protocol"].as_str() {
                    if !["TCP", "UDP", "SCTP"].contains(&proto) {
                        errs.push(FieldError::unsupported(
                            format!("{f}.ports[{j}].protocol"),
                            proto,
                            &["SCTP", "TCP", "UDP"],
                        ));
                    }
                }
            }
        }
    }
    if let Some(rp) = spec["restartPolicy"].as_str() {
        if !["Always", "OnFailure", "Never"].contains(&rp) {
            errs.push(FieldError::unsupported(
                format!("{field}.restartPolicy"),
                rp,
                &["Always", "OnFailure", "Never"],
            ));
        }
    }
}

fn validate_service(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let spec = &obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&ty) {
        errs.push(FieldError::unsupported(
            "spec.type",
            ty,
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let headless = spec["clusterIP"] == "None";
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() && !headless && ty != "ExternalName" {
        errs.push(FieldError::required("spec.ports"));
    }
    if ty == "ExternalName" && spec["externalName"].as_str().unwrap_or_default().is_empty() {
        errs.push(FieldError::required("spec.externalName"));
    }
    let has = |f: &str| match &spec[f] {
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    };
    if ty == "ExternalName" && (has("clusterIP") || has("clusterIPs")) {
        errs.push(FieldError::forbidden(
            "spec.clusterIPs",
            "may not be set for ExternalName services",
        ));
    }
    let local_lb = ty == "LoadBalancer" && spec["externalTrafficPolicy"] == "Local";
    if !spec["healthCheckNodePort"].is_null() && !local_lb {
        errs.push(FieldError::invalid(
            "spec.healthCheckNodePort",
            spec["healthCheckNodePort"].to_string(),
            "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
        ));
    }
    let mut names = HashSet::new();
    let mut seen = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        let name = p["name"].as_str().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            errs.push(FieldError::required(format!("{f}.name")));
        }
        if !name.is_empty() && !is_dns1123_label(name) {
            errs.push(FieldError::invalid(
                format!("{f}.name"),
                format!("\"{name}\""),
                LABEL_MSG,
            ));
        }
        if !name.is_empty() && !names.insert(name) {
            errs.push(FieldError::duplicate(
                format!("{f}.name"),
                format!("\"{name}\""),
            ));
        }
        validate_port(&p["port"], &format!("{f}.port"), errs);
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            errs.push(FieldError::unsupported(
                format!("{f}.protocol"),
                proto,
                &["SCTP", "TCP", "UDP"],
            ));
        }
        if !seen.insert((p["port"].as_i64(), proto)) {
            errs.push(FieldError::duplicate(
                f.clone(),
                format!("{{\"port\": {}, \"protocol\": \"{proto}\"}}", p["port"]),
            ));
        }
        match &p["targetPort"] {
            Value::Number(_) => validate_port(&p["targetPort"], &format!("{f}.targetPort"), errs),
            Value::String(s) if !is_dns1123_label(s) || s.len() > 15 => errs.push(FieldError::invalid(
                format!("{f}.targetPort"),
                format!("\"{s}\""),
                "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-), at most 15 characters",
            )),
            _ => {}
        }
        if let Some(np) = p["nodePort"].as_i64() {
            if ty == "ClusterIP" {
                errs.push(FieldError::forbidden(
                    format!("{f}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            } else if !(1..=65535).contains(&np) {
                errs.push(FieldError::invalid(
                    format!("{f}.nodePort"),
                    np,
                    "must be between 1 and 65535, inclusive",
                ));
            }
        }
    }
    let sel = &spec["selector"];
    super::metadata::validate_labels(sel, "spec.selector", errs);
    if let Some(a) = spec["sessionAffinity"].as_str() {
        if !["None", "ClientIP"].contains(&a) {
            errs.push(FieldError::unsupported(
                "spec.sessionAffinity",
                a,
                &["ClientIP", "None"],
            ));
        }
    }
    for f in ["externalTrafficPolicy", "internalTrafficPolicy"] {
        if let Some(v) = spec[f].as_str() {
            if !["Cluster", "Local"].contains(&v) {
                errs.push(FieldError::unsupported(
                    format!("spec.{f}"),
                    v,
                    &["Cluster", "Local"],
                ));
            }
        }
    }
    if let Some(old) = old {
        let (o, n) = (&old["spec"]["clusterIP"], &spec["clusterIP"]);
        if o.is_string() && n.is_string() && o != n && ty != "ExternalName" {
            errs.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                n.to_string(),
                "may not change once set",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::find;

    #[test]
    fn service_defaults_and_validation_messages() {
        let svc = find("", "v1", "services").unwrap();
        let mut obj = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}});
        default(svc, &mut obj);
        assert_eq!(obj["spec"]["type"], "ClusterIP");
        assert_eq!(obj["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(obj["spec"]["ports"][0]["targetPort"], 80);
        assert!(validate(svc, &obj, None).is_empty());
        let bad = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 70000, "name": "a"}, {"port": 80}]}});
        let errs: Vec<String> = validate(svc, &bad, None)
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        assert!(
            errs.contains(
                &"spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
                    .to_string()
            ),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"spec.ports[1].name: Required value".to_string()),
            "{errs:?}"
        );
        let names: Vec<_> = validate_name(svc, "Web_1")
            .iter()
            .map(|e| e.field.clone())
            .collect();
        assert_eq!(names, ["metadata.name"]);
        assert!(
            validate_name(svc, "1web").len() == 1,
            "service names start with a letter"
        );
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let d = find("apps", "v1", "deployments").unwrap();
        let mut obj = json!({"metadata": {"name": "web"}, "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}});
        default(d, &mut obj);
        assert_eq!(obj["spec"]["replicas"], 1);
        assert_eq!(obj["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(
            obj["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        let errs = validate(d, &obj, None);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.template.metadata.labels");
        assert!(errs[0]
            .message
            .contains("`selector` does not match template `labels`"));
    }

    #[test]
    fn probes_get_kubernetes_defaults() {
        let p = find("", "v1", "pods").unwrap();
        let mut obj = json!({"spec": {"containers": [{"name": "c", "image": "x:1",
            "readinessProbe": {"httpGet": {"port": 80}, "periodSeconds": 1},
            "livenessProbe": {"tcpSocket": {"port": 80}}}]}});
        default(p, &mut obj);
        let c = &obj["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["periodSeconds"], 1, "given values stay");
        assert_eq!(c["readinessProbe"]["timeoutSeconds"], 1);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/");
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTP");
        assert_eq!(c["livenessProbe"]["periodSeconds"], 10);
        assert_eq!(c["livenessProbe"]["successThreshold"], 1);
        assert_eq!(c["livenessProbe"]["failureThreshold"], 3);
        assert!(c.get("startupProbe").is_none());
    }

    #[test]
    fn pod_needs_containers_with_images() {
        let p = find("", "v1", "pods").unwrap();
        let obj = json!({"spec": {"containers": [{"name": "a"}, {"name": "a", "image": "x"}]}});
        let fields: Vec<_> = validate(p, &obj, None)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            ["spec.containers[0].image", "spec.containers[1].name"]
        );
    }
}
