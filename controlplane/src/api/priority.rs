//! Pod priority, as Kubernetes' Priority admission plugin: PriorityClasses
//! (`scheduling.k8s.io/v1`; the two system classes created at start), a pod's
//! `priorityClassName` (or the one global default) resolved into `spec.priority` and
//! `spec.preemptionPolicy` when it is created, a pod naming a missing class refused. The
//! scheduler does not preempt; the value is what workloads and tools read.

use serde_json::{json, Value};

use super::resources;
use super::status::{ApiError, ApiResult, FieldError};
use super::{Api, Query};

/// The highest value a user-defined class may have; above it are the system classes'.
pub const HIGHEST_USER_PRIORITY: i64 = 1_000_000_000;

const SYSTEM_CLASSES: [(&str, i64, &str); 2] = [
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
];

/// The system classes, created when missing.
pub fn bootstrap_classes() -> Vec<Value> {
    SYSTEM_CLASSES
        .iter()
        .map(|(name, value, description)| {
            json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                   "metadata": {"name": name}, "value": value, "description": description,
                   "preemptionPolicy": "PreemptLowerPriority"})
        })
        .collect()
}

/// A PriorityClass's own checks (those that need no other object).
pub fn validate_class(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let value = obj["value"].as_i64().unwrap_or(0);
    let system = SYSTEM_CLASSES.iter().find(|(n, _, _)| *n == name);
    match system {
        Some((_, v, _)) if value != *v => errs.push(FieldError::invalid(
            "value",
            value,
            &format!("the value of the system class {name} is {v}"),
        )),
        None if name.starts_with("system-") => errs.push(FieldError::forbidden(
            "metadata.name",
            "priority class names with 'system-' prefix are reserved",
        )),
        None if value > HIGHEST_USER_PRIORITY => errs.push(FieldError::forbidden(
            "value",
            &format!("maximum allowed value of a user defined priority is {HIGHEST_USER_PRIORITY}"),
        )),
        _ => {}
    }
    if let Some(old) = old {
        if obj["value"] != old["value"] {
            errs.push(FieldError::forbidden(
                "value",
                "may not be changed in an update.",
            ));
        }
    }
}

impl Api {
    async fn priority_classes(&self) -> ApiResult<Vec<Value>> {
        let info = resources::find("scheduling.k8s.io", "v1", "priorityclasses")
            .expect("priority classes are served");
        Ok(self.list_objects(info, None, &Query::parse(None)).await?.0)
    }

    /// Only one class may be the global default.
    pub(super) async fn check_global_default(&self, class: &Value) -> ApiResult<()> {
        if class["globalDefault"] != true {
            return Ok(());
        }
        let name = class["metadata"]["name"].as_str().unwrap_or_default();
        if let Some(other) = self
            .priority_classes()
            .await?
            .into_iter()
            .find(|c| c["globalDefault"] == true && c["metadata"]["name"] != name)
        {
            let other = other["metadata"]["name"].as_str().unwrap_or_default();
            return Err(ApiError::invalid(
                "PriorityClass",
                "scheduling.k8s.io",
                name,
                vec![FieldError::invalid(
                    "globalDefault",
                    true,
                    &format!("PriorityClass {other} is already marked as default. Only one default can exist"),
                )],
            ));
        }
        Ok(())
    }

    /// Resolves a new pod's priority from its class (or the global default).
    pub(super) async fn admit_pod_priority(&self, pod: &mut Value) -> ApiResult<()> {
        let pod_name = pod["metadata"]["name"]
            .as_str()
            .or(pod["metadata"]["generateName"].as_str())
            .unwrap_or_default()
            .to_string();
        let asked = pod["spec"]["priorityClassName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let classes = self.priority_classes().await?;
        let class = if asked.is_empty() {
            classes.into_iter().find(|c| c["globalDefault"] == true)
        } else {
            Some(
                classes
                    .into_iter()
                    .find(|c| c["metadata"]["name"] == asked.as_str())
                    .ok_or_else(|| {
                        ApiError::forbidden(format!(
                            "pods \"{pod_name}\" is forbidden: no PriorityClass with name {asked} was found"
                        ))
                    })?,
            )
        };
        let (value, policy) = match &class {
            Some(c) => (
                c["value"].as_i64().unwrap_or(0),
                c["preemptionPolicy"]
                    .as_str()
                    .unwrap_or("PreemptLowerPriority")
                    .to_string(),
            ),
            None => (0, "PreemptLowerPriority".to_string()),
        };
        if let Some(given) = pod["spec"]["priority"].as_i64() {
            if given != value {
                return Err(ApiError::forbidden(format!(
                    "pods \"{pod_name}\" is forbidden: the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name"
                )));
            }
        }
        if let Some(c) = &class {
            pod["spec"]["priorityClassName"] = c["metadata"]["name"].clone();
        }
        pod["spec"]["priority"] = json!(value);
        pod["spec"]["preemptionPolicy"] = json!(policy);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(obj: Value, old: Option<Value>) -> Vec<String> {
        let mut e = Vec::new();
        validate_class(&obj, old.as_ref(), &mut e);
        e.into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn classes_keep_to_the_user_range_and_their_value() {
        let class = |name: &str, value: i64| json!({"metadata": {"name": name}, "value": value});
        assert!(errs(class("high", HIGHEST_USER_PRIORITY), None).is_empty());
        assert!(errs(class("high", HIGHEST_USER_PRIORITY + 1), None)[0]
            .contains("maximum allowed value of a user defined priority is 1000000000"));
        assert!(errs(class("system-mine", 5), None)[0].contains("reserved"));
        for c in bootstrap_classes() {
            assert!(errs(c, None).is_empty());
        }
        assert!(errs(class("system-node-critical", 5), None)[0].contains("2000001000"));
        let e = errs(class("high", 2), Some(class("high", 1)));
        assert!(e[0].contains("may not be changed in an update"), "{e:?}");
    }
}
