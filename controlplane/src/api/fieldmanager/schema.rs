//! How ownership divides an object, as the Kubernetes schema says
//! (`x-kubernetes-list-type`, `x-kubernetes-list-map-keys`, `x-kubernetes-map-type`): which
//! lists are associative (items owned one by one, by key fields), which are sets, which are
//! atomic (owned whole), and which objects are atomic. Fields are found by name and by the
//! names of the fields above them, as the built-in kinds use them.

use serde_json::{Map, Value};

use super::fieldset::{canonical, PathElement};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced and owned as a whole (the default, as in Kubernetes).
    Atomic,
    /// Items are scalars, each owned on its own (`metadata.finalizers`).
    Set,
    /// Items are objects named by these key fields.
    Map(&'static [&'static str]),
}

const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

/// The type of the list field `field` of the object found at `parent` (field names from the
/// root, list items not counted).
pub fn list_type(parent: &[String], field: &str) -> ListType {
    let last = parent.last().map(String::as_str).unwrap_or_default();
    let in_pod_spec = || {
        last == "spec"
            && (parent.len() == 1 || parent.ends_with(&["template".into(), "spec".into()]))
    };
    match field {
        "finalizers" if last == "metadata" => ListType::Set,
        "ownerReferences" if last == "metadata" => ListType::Map(&["uid"]),
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" if in_pod_spec() => {
            ListType::Map(&["name"])
        }
        "imagePullSecrets" | "resourceClaims" if in_pod_spec() => ListType::Map(&["name"]),
        "hostAliases" if in_pod_spec() => ListType::Map(&["ip"]),
        "topologySpreadConstraints" if in_pod_spec() => {
            ListType::Map(&["topologyKey", "whenUnsatisfiable"])
        }
        "env" if CONTAINER_LISTS.contains(&last) => ListType::Map(&["name"]),
        "volumeMounts" if CONTAINER_LISTS.contains(&last) => ListType::Map(&["mountPath"]),
        "volumeDevices" if CONTAINER_LISTS.contains(&last) => ListType::Map(&["devicePath"]),
        "ports" if CONTAINER_LISTS.contains(&last) => ListType::Map(&["containerPort", "protocol"]),
        "ports" if parent == ["spec"] => ListType::Map(&["port", "protocol"]),
        "conditions" if last == "status" => ListType::Map(&["type"]),
        _ => ListType::Atomic,
    }
}

/// Objects owned as a whole: label selectors and the maps marked `mapType=atomic`.
pub fn atomic_object(parent: &[String], field: &str) -> bool {
    match field {
        "selector" | "namespaceSelector" | "podSelector" | "labelSelector" => true,
        "nodeSelector" => parent.last().is_some_and(|l| l == "spec"),
        _ => false,
    }
}

/// Key fields that have a default when an item omits them.
fn key_default(field: &str) -> Option<Value> {
    (field == "protocol").then(|| Value::String("TCP".into()))
}

/// The path element of an associative list's item, or None when the item lacks a key field
/// with no default (the list is then treated as atomic).
pub fn item_key(item: &Value, keys: &[&str]) -> Option<PathElement> {
    let obj = item.as_object()?;
    let mut k = Map::new();
    for f in keys {
        let v = match obj.get(*f) {
            Some(v) if !v.is_null() => v.clone(),
            _ => key_default(f)?,
        };
        k.insert((*f).to_string(), v);
    }
    Some(PathElement::Key(canonical(&Value::Object(k))))
}

/// The element of a set-like list's item.
pub fn item_value(item: &Value) -> PathElement {
    PathElement::Value(canonical(item))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn list_types_follow_the_kubernetes_schema() {
        assert_eq!(
            list_type(&p(&["spec", "template", "spec"]), "containers"),
            ListType::Map(&["name"])
        );
        assert_eq!(
            list_type(&p(&["spec"]), "containers"),
            ListType::Map(&["name"])
        );
        assert_eq!(
            list_type(&p(&["spec", "template", "spec", "containers"]), "ports"),
            ListType::Map(&["containerPort", "protocol"])
        );
        assert_eq!(
            list_type(&p(&["spec"]), "ports"),
            ListType::Map(&["port", "protocol"])
        );
        assert_eq!(list_type(&p(&["subsets"]), "ports"), ListType::Atomic);
        assert_eq!(
            list_type(&p(&["spec", "template", "spec", "containers"]), "args"),
            ListType::Atomic
        );
        assert_eq!(list_type(&p(&["metadata"]), "finalizers"), ListType::Set);
        assert!(atomic_object(&p(&["spec"]), "selector"));
        assert!(!atomic_object(&p(&["metadata"]), "labels"));
        assert_eq!(
            item_key(&json!({"port": 80, "name": "http"}), &["port", "protocol"]),
            Some(PathElement::Key(
                "{\"port\":80,\"protocol\":\"TCP\"}".into()
            ))
        );
        assert_eq!(item_key(&json!({"image": "x"}), &["name"]), None);
    }
}
