//! Kubernetes' protobuf request bodies (`application/vnd.kubernetes.protobuf`), which kubectl's
//! typed commands send (`kubectl create namespace|deployment|service|configmap|secret|job|
//! cronjob|role|rolebinding|token|...`). The envelope is `k8s\0` + runtime.Unknown; the object is
//! decoded by a schema of the messages those commands fill, with the field numbers of
//! Kubernetes' generated.proto and the JSON names of the API. A field outside the schema is
//! refused with 415 and a request to send JSON, never silently dropped.

use base64::Engine as _;
use serde_json::{json, Map, Value};

#[derive(Clone, Copy)]
enum Ty {
    Str,
    I32,
    I64,
    Bool,
    Msg(&'static str),
    RepStr,
    RepMsg(&'static str),
    MapStr,
    MapBytes,
    /// map<string, Quantity>: Quantity is a message with the string in field 1.
    MapQty,
    Time,
    IntOrStr,
}

use Ty::*;

type Fields = &'static [(u32, &'static str, Ty)];

fn schema(msg: &str) -> Option<Fields> {
    Some(match msg {
        "ObjectMeta" => &[
            (1, "name", Str),
            (2, "generateName", Str),
            (3, "namespace", Str),
            (5, "uid", Str),
            (6, "resourceVersion", Str),
            (7, "generation", I64),
            (8, "creationTimestamp", Time),
            (11, "labels", MapStr),
            (12, "annotations", MapStr),
            (13, "ownerReferences", RepMsg("OwnerReference")),
            (14, "finalizers", RepStr),
        ],
        "OwnerReference" => &[
            (1, "kind", Str),
            (3, "name", Str),
            (4, "uid", Str),
            (5, "apiVersion", Str),
            (6, "controller", Bool),
            (7, "blockOwnerDeletion", Bool),
        ],
        "LabelSelector" => &[
            (1, "matchLabels", MapStr),
            (2, "matchExpressions", RepMsg("LabelSelectorRequirement")),
        ],
        "LabelSelectorRequirement" => {
            &[(1, "key", Str), (2, "operator", Str), (3, "values", RepStr)]
        }
        "Namespace" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("NamespaceSpec")),
        ],
        "NamespaceSpec" => &[(1, "finalizers", RepStr)],
        "ConfigMap" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "data", MapStr),
            (3, "binaryData", MapBytes),
            (4, "immutable", Bool),
        ],
        "Secret" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "data", MapBytes),
            (3, "type", Str),
            (4, "stringData", MapStr),
            (5, "immutable", Bool),
        ],
        "ServiceAccount" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (3, "imagePullSecrets", RepMsg("LocalObjectReference")),
            (4, "automountServiceAccountToken", Bool),
        ],
        "LocalObjectReference" => &[(1, "name", Str)],
        "Service" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("ServiceSpec")),
        ],
        "ServiceSpec" => &[
            (1, "ports", RepMsg("ServicePort")),
            (2, "selector", MapStr),
            (3, "clusterIP", Str),
            (4, "type", Str),
            (5, "externalIPs", RepStr),
            (7, "sessionAffinity", Str),
            (8, "loadBalancerIP", Str),
            (10, "externalName", Str),
            (11, "externalTrafficPolicy", Str),
            (18, "clusterIPs", RepStr),
            (22, "internalTrafficPolicy", Str),
        ],
        "ServicePort" => &[
            (1, "name", Str),
            (2, "protocol", Str),
            (3, "port", I32),
            (4, "targetPort", IntOrStr),
            (5, "nodePort", I32),
            (6, "appProtocol", Str),
        ],
        "PodTemplateSpec" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("PodSpec")),
        ],
        "PodSpec" => &[
            (2, "containers", RepMsg("Container")),
            (3, "restartPolicy", Str),
            (4, "terminationGracePeriodSeconds", I64),
            (5, "activeDeadlineSeconds", I64),
            (6, "dnsPolicy", Str),
            (7, "nodeSelector", MapStr),
            (8, "serviceAccountName", Str),
            (10, "nodeName", Str),
            (11, "hostNetwork", Bool),
            (15, "imagePullSecrets", RepMsg("LocalObjectReference")),
            (16, "hostname", Str),
            (17, "subdomain", Str),
            (19, "schedulerName", Str),
            (20, "initContainers", RepMsg("Container")),
            (24, "priorityClassName", Str),
        ],
        "Container" => &[
            (1, "name", Str),
            (2, "image", Str),
            (3, "command", RepStr),
            (4, "args", RepStr),
            (5, "workingDir", Str),
            (6, "ports", RepMsg("ContainerPort")),
            (7, "env", RepMsg("EnvVar")),
            (8, "resources", Msg("ResourceRequirements")),
            (13, "terminationMessagePath", Str),
            (14, "imagePullPolicy", Str),
            (16, "stdin", Bool),
            (17, "stdinOnce", Bool),
            (18, "tty", Bool),
            (20, "terminationMessagePolicy", Str),
        ],
        "ContainerPort" => &[
            (1, "name", Str),
            (2, "hostPort", I32),
            (3, "containerPort", I32),
            (4, "protocol", Str),
            (5, "hostIP", Str),
        ],
        "EnvVar" => &[(1, "name", Str), (2, "value", Str)],
        "ResourceRequirements" => &[(1, "limits", MapQty), (2, "requests", MapQty)],
        "Deployment" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("DeploymentSpec")),
        ],
        "DeploymentSpec" => &[
            (1, "replicas", I32),
            (2, "selector", Msg("LabelSelector")),
            (3, "template", Msg("PodTemplateSpec")),
            (5, "minReadySeconds", I32),
            (6, "revisionHistoryLimit", I32),
            (7, "paused", Bool),
            (4, "strategy", Msg("DeploymentStrategy")),
            (9, "progressDeadlineSeconds", I32),
        ],
        "DeploymentStrategy" => &[
            (1, "type", Str),
            (2, "rollingUpdate", Msg("RollingUpdateDeployment")),
        ],
        "RollingUpdateDeployment" => &[(1, "maxUnavailable", IntOrStr), (2, "maxSurge", IntOrStr)],
        "Job" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("JobSpec")),
        ],
        "JobSpec" => &[
            (1, "parallelism", I32),
            (2, "completions", I32),
            (3, "activeDeadlineSeconds", I64),
            (4, "selector", Msg("LabelSelector")),
            (5, "manualSelector", Bool),
            (6, "template", Msg("PodTemplateSpec")),
            (7, "backoffLimit", I32),
            (8, "ttlSecondsAfterFinished", I32),
            (9, "completionMode", Str),
            (10, "suspend", Bool),
        ],
        "CronJob" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("CronJobSpec")),
        ],
        "CronJobSpec" => &[
            (1, "schedule", Str),
            (2, "startingDeadlineSeconds", I64),
            (3, "concurrencyPolicy", Str),
            (4, "suspend", Bool),
            (5, "jobTemplate", Msg("JobTemplateSpec")),
            (6, "successfulJobsHistoryLimit", I32),
            (7, "failedJobsHistoryLimit", I32),
            (8, "timeZone", Str),
        ],
        "JobTemplateSpec" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("JobSpec")),
        ],
        "Role" | "ClusterRole" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "rules", RepMsg("PolicyRule")),
        ],
        "PolicyRule" => &[
            (1, "verbs", RepStr),
            (2, "apiGroups", RepStr),
            (3, "resources", RepStr),
            (4, "resourceNames", RepStr),
            (5, "nonResourceURLs", RepStr),
        ],
        "RoleBinding" | "ClusterRoleBinding" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "subjects", RepMsg("Subject")),
            (3, "roleRef", Msg("RoleRef")),
        ],
        "Subject" => &[
            (1, "kind", Str),
            (2, "apiGroup", Str),
            (3, "name", Str),
            (4, "namespace", Str),
        ],
        "RoleRef" => &[(1, "apiGroup", Str), (2, "kind", Str), (3, "name", Str)],
        "TokenRequest" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("TokenRequestSpec")),
        ],
        "TokenRequestSpec" => &[
            (1, "audiences", RepStr),
            (3, "boundObjectRef", Msg("BoundObjectReference")),
            (4, "expirationSeconds", I64),
        ],
        "BoundObjectReference" => &[
            (1, "kind", Str),
            (2, "apiVersion", Str),
            (3, "name", Str),
            (4, "uid", Str),
        ],
        // `kubectl drain`'s evictions.
        "Eviction" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "deleteOptions", Msg("DeleteOptions")),
        ],
        // `kubectl create priorityclass|quota|poddisruptionbudget`.
        "PriorityClass" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "value", I32),
            (3, "globalDefault", Bool),
            (4, "description", Str),
            (5, "preemptionPolicy", Str),
        ],
        "ResourceQuota" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("ResourceQuotaSpec")),
        ],
        "ResourceQuotaSpec" => &[(1, "hard", MapQty), (2, "scopes", RepStr)],
        "PodDisruptionBudget" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("PodDisruptionBudgetSpec")),
        ],
        "PodDisruptionBudgetSpec" => &[
            (1, "minAvailable", IntOrStr),
            (2, "selector", Msg("LabelSelector")),
            (3, "maxUnavailable", IntOrStr),
            (4, "unhealthyPodEvictionPolicy", Str),
        ],
        // The reviews (`kubectl auth can-i`, `can-i --list`, `auth whoami`); their status,
        // output only, is an empty message in a request.
        "SelfSubjectAccessReview" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("SelfSubjectAccessReviewSpec")),
        ],
        "SelfSubjectAccessReviewSpec" => &[
            (1, "resourceAttributes", Msg("ResourceAttributes")),
            (2, "nonResourceAttributes", Msg("NonResourceAttributes")),
        ],
        "SubjectAccessReview" | "LocalSubjectAccessReview" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("SubjectAccessReviewSpec")),
        ],
        "SubjectAccessReviewSpec" => &[
            (1, "resourceAttributes", Msg("ResourceAttributes")),
            (2, "nonResourceAttributes", Msg("NonResourceAttributes")),
            (3, "user", Str),
            (4, "groups", RepStr),
            (6, "uid", Str),
        ],
        "ResourceAttributes" => &[
            (1, "namespace", Str),
            (2, "verb", Str),
            (3, "group", Str),
            (4, "version", Str),
            (5, "resource", Str),
            (6, "subresource", Str),
            (7, "name", Str),
        ],
        "NonResourceAttributes" => &[(1, "path", Str), (2, "verb", Str)],
        "SelfSubjectRulesReview" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("SelfSubjectRulesReviewSpec")),
        ],
        "SelfSubjectRulesReviewSpec" => &[(1, "namespace", Str)],
        "TokenReview" => &[
            (1, "metadata", Msg("ObjectMeta")),
            (2, "spec", Msg("TokenReviewSpec")),
        ],
        "TokenReviewSpec" => &[(1, "token", Str), (2, "audiences", RepStr)],
        "SelfSubjectReview" => &[(1, "metadata", Msg("ObjectMeta"))],
        "DeleteOptions" => &[
            (1, "gracePeriodSeconds", I64),
            (3, "orphanDependents", Bool),
            (4, "propagationPolicy", Str),
            (5, "dryRun", RepStr),
        ],
        _ => return None,
    })
}

/// Fields that are pointers in Go: a zero there was set on purpose.
const POINTERS: &[&str] = &[
    "replicas",
    "parallelism",
    "completions",
    "backoffLimit",
    "suspend",
    "immutable",
    "automountServiceAccountToken",
    "terminationGracePeriodSeconds",
    "controller",
    "blockOwnerDeletion",
];

/// Fields outside the schema that are dropped even when set: status (the server resets it
/// on create) and managed fields (not kept).
const IGNORED: &[(&str, u32)] = &[
    ("ObjectMeta", 17),
    ("Namespace", 3),
    ("Service", 3),
    ("Deployment", 3),
    ("Job", 3),
    ("CronJob", 3),
];

/// A payload that holds nothing but zero values (Go's encoding of an unset struct).
fn is_empty_payload(b: &[u8]) -> bool {
    let mut r = Reader { buf: b };
    while !r.buf.is_empty() {
        let Ok((_, w)) = r.key() else { return false };
        let empty = match w {
            0 => r.varint().is_ok_and(|v| v == 0),
            2 => r.bytes().is_ok_and(is_empty_payload),
            _ => false,
        };
        if !empty {
            return false;
        }
    }
    true
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.first().ok_or("truncated varint")?;
            self.buf = &self.buf[1..];
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()? as usize;
        if self.buf.len() < n {
            return Err("truncated field".into());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// Next (field number, wire type).
    fn key(&mut self) -> Result<(u32, u8), String> {
        let k = self.varint()?;
        Ok(((k >> 3) as u32, (k & 7) as u8))
    }
    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.take(8),
            2 => self.bytes().map(|_| ()),
            5 => self.take(4),
            w => Err(format!("unsupported wire type {w}")),
        }
    }
    fn take(&mut self, n: usize) -> Result<(), String> {
        if self.buf.len() < n {
            return Err("truncated".into());
        }
        self.buf = &self.buf[n..];
        Ok(())
    }
}

fn string(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_string())
}

/// A map entry message: key in field 1, value in field 2.
fn map_entry(b: &[u8]) -> Result<(String, Vec<u8>), String> {
    let mut r = Reader { buf: b };
    let (mut k, mut v) = (String::new(), Vec::new());
    while !r.buf.is_empty() {
        let (f, w) = r.key()?;
        match (f, w) {
            (1, 2) => k = string(r.bytes()?)?,
            (2, 2) => v = r.bytes()?.to_vec(),
            _ => r.skip(w)?,
        }
    }
    Ok((k, v))
}

fn decode_msg(msg: &str, b: &[u8]) -> Result<Value, String> {
    let fields = schema(msg).ok_or_else(|| format!("message {msg} is not supported"))?;
    let mut out = Map::new();
    let mut r = Reader { buf: b };
    while !r.buf.is_empty() {
        let (f, w) = r.key()?;
        let Some((_, name, ty)) = fields.iter().find(|(n, _, _)| *n == f) else {
            // Go's encoder writes every non-pointer field, set or not: an empty one outside
            // the schema (selfLink, status, ...) carries nothing and is skipped.
            let empty = match w {
                0 => r.varint()? == 0,
                2 => is_empty_payload(r.bytes()?),
                _ => {
                    r.skip(w)?;
                    false
                }
            };
            if empty || IGNORED.contains(&(msg, f)) {
                continue;
            }
            return Err(format!("field {f} of {msg} is not supported"));
        };
        let name = name.to_string();
        match *ty {
            // Zero values are what Go writes for fields nobody set (JSON would omit them),
            // except in the pointer fields where 0 and false are choices.
            Str => {
                let v = string(r.bytes()?)?;
                if !v.is_empty() {
                    out.insert(name, json!(v));
                }
            }
            I32 | I64 => {
                let v = r.varint()? as i64;
                let v = if matches!(ty, I32) {
                    v as i32 as i64
                } else {
                    v
                };
                if v != 0 || POINTERS.contains(&name.as_str()) {
                    out.insert(name, json!(v));
                }
            }
            Bool => {
                let v = r.varint()? != 0;
                if v || POINTERS.contains(&name.as_str()) {
                    out.insert(name, json!(v));
                }
            }
            Msg(m) => {
                out.insert(name, decode_msg(m, r.bytes()?)?);
            }
            RepStr => {
                let s = json!(string(r.bytes()?)?);
                out.entry(name)
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap()
                    .push(s);
            }
            RepMsg(m) => {
                let v = decode_msg(m, r.bytes()?)?;
                out.entry(name)
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap()
                    .push(v);
            }
            MapStr | MapBytes | MapQty => {
                let (k, v) = map_entry(r.bytes()?)?;
                let v = match ty {
                    MapStr => json!(string(&v)?),
                    MapBytes => json!(base64::engine::general_purpose::STANDARD.encode(&v)),
                    _ => {
                        // resource.Quantity { string = 1 }: the same layout as a map entry's
                        // key.
                        let (q, _) = map_entry(&v)?;
                        json!(q)
                    }
                };
                out.entry(name)
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .unwrap()
                    .insert(k, v);
            }
            Time => {
                let mut t = Reader { buf: r.bytes()? };
                let mut secs = 0i64;
                while !t.buf.is_empty() {
                    let (f, w) = t.key()?;
                    if f == 1 {
                        secs = t.varint()? as i64;
                    } else {
                        t.skip(w)?;
                    }
                }
                if secs != 0 {
                    let ts = jiff::Timestamp::from_second(secs).map_err(|e| e.to_string())?;
                    out.insert(name, json!(ts.to_string()));
                }
            }
            IntOrStr => {
                let mut t = Reader { buf: r.bytes()? };
                let (mut kind, mut i, mut s) = (0u64, 0i64, String::new());
                while !t.buf.is_empty() {
                    match t.key()? {
                        (1, 0) => kind = t.varint()?,
                        (2, 0) => i = t.varint()? as i32 as i64,
                        (3, 2) => s = string(t.bytes()?)?,
                        (_, w) => t.skip(w)?,
                    }
                }
                out.insert(name, if kind == 1 { json!(s) } else { json!(i) });
            }
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a `k8s\0`-framed protobuf body into the object's JSON.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let payload = body
        .strip_prefix(b"k8s\0")
        .ok_or("protobuf body without the k8s\\0 prefix")?;
    let mut r = Reader { buf: payload };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), Vec::new());
    while !r.buf.is_empty() {
        match r.key()? {
            (1, 2) => {
                let mut t = Reader { buf: r.bytes()? };
                while !t.buf.is_empty() {
                    match t.key()? {
                        (1, 2) => api_version = string(t.bytes()?)?,
                        (2, 2) => kind = string(t.bytes()?)?,
                        (_, w) => t.skip(w)?,
                    }
                }
            }
            (2, 2) => raw = r.bytes()?.to_vec(),
            (_, w) => r.skip(w)?,
        }
    }
    let mut obj = decode_msg(&kind, &raw)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_maps_keep_their_string() {
        // hard: {pods: "5"}: a map entry whose value is a Quantity { string = 1 }.
        let qty = field(1, 2, b"5");
        let entry = [field(1, 2, b"pods"), field(2, 2, &qty)].concat();
        let spec = decode_msg("ResourceQuotaSpec", &field(1, 2, &entry)).unwrap();
        assert_eq!(spec, json!({"hard": {"pods": "5"}}));
    }

    fn field(tag: u32, wire: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((tag << 3) | wire as u32) as u8];
        if wire == 2 {
            out.push(payload.len() as u8);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_namespace_envelope_and_refuses_unknown_fields() {
        let meta = [
            field(1, 2, b"team-a"),
            field(11, 2, &[field(1, 2, b"env"), field(2, 2, b"prod")].concat()),
        ]
        .concat();
        let ns = field(1, 2, &meta);
        let type_meta = [field(1, 2, b"v1"), field(2, 2, b"Namespace")].concat();
        let body = [b"k8s\0".to_vec(), field(1, 2, &type_meta), field(2, 2, &ns)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "labels": {"env": "prod"}}})
        );
        let odd = [
            b"k8s\0".to_vec(),
            field(1, 2, &type_meta),
            field(2, 2, &field(9, 2, b"x")),
        ]
        .concat();
        assert!(decode(&odd).unwrap_err().contains("field 9 of Namespace"));
        assert!(decode(b"{}").is_err());
    }
}
