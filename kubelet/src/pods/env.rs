//! A container's environment, as kubelet builds it: the Services' variables, then `envFrom`
//! (ConfigMaps and Secrets, each key a variable, with the source's prefix), then `env` (a
//! literal, or `valueFrom` a ConfigMap or Secret key, a field of the pod, or a resource of the
//! container); a later source wins over an earlier one. The ConfigMaps and Secrets are read
//! from the API each time a container is created (a change reaches a container when it
//! starts again, as in Kubernetes). A required one that is missing, or a key missing from it,
//! leaves the container waiting in `CreateContainerConfigError` with Kubernetes' message; the
//! worker tries again on its next pass.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::Api;
use kube::ResourceExt;

use super::Worker;
use crate::cri::v1 as cri;

/// The ConfigMaps and Secrets a container's environment names, as read for one start
/// (None: not found).
#[derive(Default)]
pub(super) struct Objects {
    configmaps: HashMap<String, Option<BTreeMap<String, String>>>,
    secrets: HashMap<String, Option<BTreeMap<String, String>>>,
}

#[derive(Clone, Copy)]
enum Kind {
    ConfigMap,
    Secret,
}

impl Kind {
    fn lower(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmap",
            Kind::Secret => "secret",
        }
    }
    fn title(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
        }
    }
}

impl Objects {
    fn of(&self, kind: Kind) -> &HashMap<String, Option<BTreeMap<String, String>>> {
        match kind {
            Kind::ConfigMap => &self.configmaps,
            Kind::Secret => &self.secrets,
        }
    }

    /// Every key of a ConfigMap or Secret; None when it is missing and `optional`.
    fn all(
        &self,
        kind: Kind,
        name: &str,
        optional: bool,
    ) -> Result<Option<&BTreeMap<String, String>>, String> {
        match self.of(kind).get(name) {
            Some(Some(data)) => Ok(Some(data)),
            _ if optional => Ok(None),
            _ => Err(format!("{} \"{name}\" not found", kind.lower())),
        }
    }

    /// One key; None when the object or the key is missing and `optional`.
    fn key(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<Option<String>, String> {
        let Some(data) = self.all(kind, name, optional)? else {
            return Ok(None);
        };
        match data.get(key) {
            Some(v) => Ok(Some(v.clone())),
            None if optional => Ok(None),
            None => Err(format!(
                "couldn't find key {key} in {} {ns}/{name}",
                kind.title()
            )),
        }
    }
}

/// The names of the ConfigMaps and Secrets `c`'s environment reads.
fn names(c: &Container) -> (Vec<String>, Vec<String>) {
    let (mut cms, mut secrets) = (Vec::new(), Vec::new());
    for f in c.env_from.iter().flatten() {
        if let Some(r) = &f.config_map_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &f.secret_ref {
            secrets.push(r.name.clone());
        }
    }
    for e in c.env.iter().flatten() {
        let Some(from) = &e.value_from else { continue };
        if let Some(r) = &from.config_map_key_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &from.secret_key_ref {
            secrets.push(r.name.clone());
        }
    }
    for v in [&mut cms, &mut secrets] {
        v.sort();
        v.dedup();
    }
    (cms, secrets)
}

/// A Secret's values as text (an environment holds text; Kubernetes takes the bytes as they are).
fn secret_data(s: Secret) -> BTreeMap<String, String> {
    super::volumes::merged(s.string_data, s.data)
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

/// Variable names Kubernetes accepts from `envFrom` (relaxed since 1.30): not empty, printable
/// ASCII but `=`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'=')
}

/// A resource of the container (`limits.cpu`, `requests.memory`, ...) in units of `divisor`,
/// rounded up, as the downward API gives it; an unset limit is the node's capacity, an unset
/// request the limit if set (the API's defaulting) or 0.
pub(super) fn resource_value(
    c: &Container,
    resource: &str,
    divisor: Option<&Quantity>,
    capacity: &BTreeMap<String, Quantity>,
) -> Result<String, String> {
    let (kind, name) = resource
        .split_once('.')
        .filter(|(k, n)| {
            matches!(*k, "limits" | "requests")
                && matches!(*n, "cpu" | "memory" | "ephemeral-storage")
        })
        .ok_or_else(|| {
            format!("resourceFieldRef {resource:?}: not a supported resource (limits.cpu, limits.memory, limits.ephemeral-storage, requests.cpu, requests.memory, requests.ephemeral-storage)")
        })?;
    let res = c.resources.clone().unwrap_or_default();
    let limit = res.limits.as_ref().and_then(|m| m.get(name));
    let request = res.requests.as_ref().and_then(|m| m.get(name));
    let q = match kind {
        "limits" => limit.or_else(|| capacity.get(name)),
        _ => request.or(limit),
    };
    let value = match q {
        Some(q) => {
            crate::resources::value(q).map_err(|e| format!("resourceFieldRef {resource:?}: {e}"))?
        }
        None => 0.0,
    };
    let divisor = match divisor {
        Some(d) => crate::resources::value(d)
            .map_err(|e| format!("resourceFieldRef {resource:?}: divisor: {e}"))?,
        None => 1.0,
    };
    if divisor <= 0.0 {
        return Err(format!(
            "resourceFieldRef {resource:?}: the divisor must be positive"
        ));
    }
    // A tiny tolerance so 500m / 1m is 500, not 501 after floating point.
    Ok(((value / divisor) - 1e-9).ceil().max(0.0).to_string())
}

impl Worker {
    /// Reads the ConfigMaps and Secrets `c`'s environment names from the API.
    pub(super) async fn env_objects(&self, c: &Container) -> Result<Objects, String> {
        let ns = self.pod.namespace().unwrap_or_default();
        let (cms, secrets) = names(c);
        let mut out = Objects::default();
        let cm_api: Api<ConfigMap> = Api::namespaced(self.k.client.clone(), &ns);
        for name in cms {
            let got = cm_api
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading configmap {ns}/{name}: {e}"))?;
            out.configmaps
                .insert(name, got.map(|cm| cm.data.unwrap_or_default()));
        }
        let secret_api: Api<Secret> = Api::namespaced(self.k.client.clone(), &ns);
        for name in secrets {
            let got = secret_api
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading secret {ns}/{name}: {e}"))?;
            out.secrets.insert(name, got.map(secret_data));
        }
        Ok(out)
    }

    /// The container's environment, from lowest to highest precedence, each name once.
    pub(super) fn env(
        &self,
        c: &Container,
        objects: &Objects,
    ) -> Result<Vec<cri::KeyValue>, String> {
        let ns = self.pod.namespace().unwrap_or_default();
        let mut vars = Vars::default();
        let links = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        for (k, v) in self.k.services.env(&ns, links) {
            vars.set(k, v);
        }
        for f in c.env_from.iter().flatten() {
            let prefix = f.prefix.clone().unwrap_or_default();
            let (kind, name, optional) = match (&f.config_map_ref, &f.secret_ref) {
                (Some(r), _) => (Kind::ConfigMap, &r.name, r.optional.unwrap_or(false)),
                (None, Some(r)) => (Kind::Secret, &r.name, r.optional.unwrap_or(false)),
                (None, None) => continue,
            };
            let Some(data) = objects.all(kind, name, optional)? else {
                continue;
            };
            for (k, v) in data {
                let key = format!("{prefix}{k}");
                // Kubernetes skips (and reports) keys that are not variable names.
                if valid_name(&key) {
                    vars.set(key, v.clone());
                }
            }
        }
        let ip = self
            .sandbox
            .as_ref()
            .map(|s| s.ip.clone())
            .unwrap_or_default();
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                // `$(NAME)` of a variable defined before it expands, as in Kubernetes.
                (Some(v), _) => Some(expand(v, |n| vars.values.get(n).cloned())),
                (None, None) => Some(String::new()),
                (None, Some(from)) => {
                    if let Some(r) = &from.config_map_key_ref {
                        let optional = r.optional.unwrap_or(false);
                        objects.key(Kind::ConfigMap, &ns, &r.name, &r.key, optional)?
                    } else if let Some(r) = &from.secret_key_ref {
                        let optional = r.optional.unwrap_or(false);
                        objects.key(Kind::Secret, &ns, &r.name, &r.key, optional)?
                    } else if let Some(f) = &from.field_ref {
                        Some(
                            self.field(&f.field_path, &ip)
                                .map_err(|m| format!("env {:?}: {m}", e.name))?,
                        )
                    } else if let Some(r) = &from.resource_field_ref {
                        let of = match r.container_name.as_deref() {
                            None | Some("") => c,
                            Some(other) => self.container_named(other).ok_or_else(|| {
                                format!(
                                    "env {:?}: resourceFieldRef: the pod has no container {other:?}",
                                    e.name
                                )
                            })?,
                        };
                        let capacity = crate::node::capacity_quantities();
                        Some(
                            resource_value(of, &r.resource, r.divisor.as_ref(), &capacity)
                                .map_err(|m| format!("env {:?}: {m}", e.name))?,
                        )
                    } else {
                        return Err(format!(
                            "env {:?}: valueFrom names no source (configMapKeyRef, secretKeyRef, fieldRef or resourceFieldRef)",
                            e.name
                        ));
                    }
                }
            };
            // An optional source that is missing sets nothing.
            if let Some(v) = value {
                vars.set(e.name.clone(), v);
            }
        }
        Ok(vars.into_key_values())
    }

    /// A downward API field of the pod.
    pub(super) fn field(&self, path: &str, ip: &str) -> Result<String, String> {
        let meta = &self.pod.metadata;
        // metadata.labels['x'] and metadata.annotations['x'].
        for (prefix, map) in [
            ("metadata.labels", &meta.labels),
            ("metadata.annotations", &meta.annotations),
        ] {
            if let Some(rest) = path.strip_prefix(prefix) {
                let key = rest
                    .strip_prefix("['")
                    .and_then(|r| r.strip_suffix("']"))
                    .ok_or_else(|| {
                        format!("fieldRef {path:?}: use {prefix}['<key>'] for one key")
                    })?;
                return Ok(map
                    .as_ref()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default());
            }
        }
        Ok(match path {
            "metadata.name" => self.pod.name_any(),
            "metadata.namespace" => self.pod.namespace().unwrap_or_default(),
            "metadata.uid" => self.uid(),
            "spec.nodeName" => self.k.node_name.clone(),
            "spec.serviceAccountName" => self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            "status.podIP" => ip.to_string(),
            "status.podIPs" => ip.to_string(),
            "status.hostIP" | "status.hostIPs" => self.k.node_ip.clone(),
            other => return Err(format!("fieldRef {other:?} is not a supported field")),
        })
    }

    /// A container of the pod by name (from the spec: a slot being synced is taken out of
    /// the worker meanwhile).
    pub(super) fn container_named(&self, name: &str) -> Option<&Container> {
        let spec = self.pod.spec.as_ref()?;
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .find(|c| c.name == name)
    }
}

/// Kubernetes' variable references: `$(NAME)` becomes the variable's value when `lookup` knows
/// it and stays as written otherwise; `$$` is a literal `$` (so `$$(NAME)` stays `$(NAME)`).
pub(super) fn expand(s: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Variables in the order first set, each name once, the last value set winning.
#[derive(Default)]
struct Vars {
    order: Vec<String>,
    values: HashMap<String, String>,
}

impl Vars {
    fn set(&mut self, key: String, value: String) {
        if self.values.insert(key.clone(), value).is_none() {
            self.order.push(key);
        }
    }

    fn into_key_values(mut self) -> Vec<cri::KeyValue> {
        self.order
            .into_iter()
            .map(|key| {
                let value = self.values.remove(&key).unwrap_or_default();
                cri::KeyValue { key, value }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    fn objects() -> Objects {
        let mut o = Objects::default();
        o.configmaps.insert(
            "app".into(),
            Some(
                [
                    ("mode".into(), "fast".into()),
                    ("bad=key".into(), "x".into()),
                ]
                .into(),
            ),
        );
        o.configmaps.insert("gone".into(), None);
        o.secrets.insert(
            "db".into(),
            Some([("password".into(), "s3cret".into())].into()),
        );
        o
    }

    #[test]
    fn keys_and_whole_objects_resolve_and_missing_ones_name_what_is_missing() {
        let o = objects();
        assert_eq!(
            o.key(Kind::ConfigMap, "ns", "app", "mode", false).unwrap(),
            Some("fast".into())
        );
        assert_eq!(
            o.key(Kind::ConfigMap, "ns", "app", "nope", false)
                .unwrap_err(),
            "couldn't find key nope in ConfigMap ns/app"
        );
        assert_eq!(
            o.key(Kind::ConfigMap, "ns", "app", "nope", true).unwrap(),
            None
        );
        assert_eq!(
            o.key(Kind::ConfigMap, "ns", "gone", "mode", false)
                .unwrap_err(),
            "configmap \"gone\" not found"
        );
        assert_eq!(o.all(Kind::ConfigMap, "gone", true).unwrap(), None);
        assert_eq!(
            o.key(Kind::Secret, "ns", "other", "k", false).unwrap_err(),
            "secret \"other\" not found"
        );
        assert_eq!(
            o.key(Kind::Secret, "ns", "db", "password", false).unwrap(),
            Some("s3cret".into())
        );
    }

    #[test]
    fn names_lists_each_source_once() {
        let c = container(json!({"name": "c",
            "envFrom": [{"configMapRef": {"name": "app"}}, {"secretRef": {"name": "db"}}],
            "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "mode"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "tls", "key": "k"}}}]}));
        assert_eq!(
            names(&c),
            (
                vec!["app".to_string()],
                vec!["db".to_string(), "tls".to_string()]
            )
        );
    }

    #[test]
    fn resource_fields_round_up_in_units_of_the_divisor() {
        let c = container(json!({"name": "c", "resources": {
            "limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"memory": "64Mi"}}}));
        let cap: BTreeMap<String, Quantity> = [
            ("cpu".to_string(), Quantity("2".into())),
            ("ephemeral-storage".to_string(), Quantity("10Gi".into())),
        ]
        .into();
        let v = |r: &str, d: Option<&str>| {
            resource_value(&c, r, d.map(|d| Quantity(d.into())).as_ref(), &cap)
        };
        assert_eq!(v("limits.cpu", None).unwrap(), "1");
        assert_eq!(v("limits.cpu", Some("1m")).unwrap(), "500");
        assert_eq!(v("limits.memory", Some("1Mi")).unwrap(), "128");
        assert_eq!(v("requests.memory", Some("1Mi")).unwrap(), "64");
        // Unset request: the limit; unset limit: the node's capacity.
        assert_eq!(v("requests.cpu", Some("1m")).unwrap(), "500");
        assert_eq!(v("limits.ephemeral-storage", Some("1Gi")).unwrap(), "10");
        assert!(v("limits.gpu", None)
            .unwrap_err()
            .contains("not a supported resource"));
        assert!(v("limits.cpu", Some("0")).unwrap_err().contains("positive"));
    }

    #[test]
    fn references_expand_like_kubernetes() {
        let vars: HashMap<String, String> = [
            ("A".to_string(), "x".to_string()),
            ("B".to_string(), "$(A)".to_string()),
        ]
        .into();
        let e = |s: &str| expand(s, |n| vars.get(n).cloned());
        assert_eq!(e("$(A)-$(A)"), "x-x");
        assert_eq!(e("$(UNSET) stays"), "$(UNSET) stays");
        assert_eq!(e("$$(A) $$ $5 $"), "$(A) $ $5 $");
        assert_eq!(e("open $(A"), "open $(A");
        // A value is not expanded twice.
        assert_eq!(e("$(B)"), "$(A)");
        assert_eq!(e("no refs"), "no refs");
    }

    #[test]
    fn later_sources_win_and_each_name_appears_once() {
        let mut v = Vars::default();
        v.set("A".into(), "service".into());
        v.set("B".into(), "1".into());
        v.set("A".into(), "env".into());
        let kv: Vec<(String, String)> = v
            .into_key_values()
            .into_iter()
            .map(|k| (k.key, k.value))
            .collect();
        assert_eq!(
            kv,
            vec![("A".into(), "env".into()), ("B".into(), "1".into())]
        );
        assert!(valid_name("MY_VAR.x-1"));
        assert!(!valid_name("bad=key"));
        assert!(!valid_name(""));
    }
}
