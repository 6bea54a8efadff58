//! The three patch types of PATCH requests: JSON merge (RFC 7386) and JSON patch (RFC 6902)
//! through the `json-patch` crate, and Kubernetes' strategic merge patch, which no library
//! does: lists of objects merge by a key per field (containers by name, ports by port...),
//! with the directives kubectl sends (`$patch`, `$setElementOrder/`, `$retainKeys`,
//! `$deleteFromPrimitiveList/`).

use serde_json::{Map, Value};

use super::status::{ApiError, ApiResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
}

impl PatchType {
    /// Server-side apply (`verbs/apply.rs`), not a patch of this module.
    pub fn is_apply(ct: &str) -> bool {
        ct.split(';').next().unwrap_or_default().trim() == "application/apply-patch+yaml"
    }

    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            _ => None,
        }
    }
}

pub fn apply(kind: PatchType, target: &Value, patch: &[u8]) -> ApiResult<Value> {
    match kind {
        PatchType::Merge => {
            let p: Value = parse(patch)?;
            if !p.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut out = target.clone();
            json_patch::merge(&mut out, &p);
            Ok(out)
        }
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_slice(patch).map_err(|e| {
                ApiError::bad_request(format!("the JSON patch is not a list of operations: {e}"))
            })?;
            apply_json_patch(target, p)
        }
        PatchType::Strategic => {
            let p: Value = parse(patch)?;
            let Value::Object(p) = p else {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            };
            let mut out = target.clone();
            strategic_merge(&mut out, &p, "")?;
            Ok(out)
        }
    }
}

/// Most operations in one JSON patch (as Kubernetes).
pub const MAX_JSON_PATCH_OPS: usize = 10_000;
/// Most bytes that the `copy` operations of one JSON patch may add, together (as Kubernetes:
/// the request body limit). Without it, a few `copy` ops of a map into itself double the
/// object each time: a 2 KB patch could ask for gigabytes.
pub const MAX_COPY_BYTES: usize = super::MAX_BODY;

fn apply_json_patch(target: &Value, p: json_patch::Patch) -> ApiResult<Value> {
    if p.0.len() > MAX_JSON_PATCH_OPS {
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!(
                "The request entity is too large: the JSON patch has {} operations, the limit is {MAX_JSON_PATCH_OPS}",
                p.0.len()
            ),
        ));
    }
    let mut out = target.clone();
    let mut copied = 0usize;
    for op in p.0 {
        if let json_patch::PatchOperation::Copy(c) = &op {
            let budget = MAX_COPY_BYTES - copied;
            let size = out
                .pointer(c.from.as_str())
                .map_or(0, |v| json_size_capped(v, budget + 1));
            if size > budget {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "the JSON patch failed: unable to copy {}: the copy operations together would add more than {MAX_COPY_BYTES} bytes",
                        c.from
                    ),
                ));
            }
            copied += size;
        }
        json_patch::patch(&mut out, &[op])
            .map_err(|e| ApiError::new(422, "Invalid", format!("the JSON patch failed: {e}")))?;
    }
    Ok(out)
}

/// The size of `v` as compact JSON, counted no further than `cap`.
fn json_size_capped(v: &Value, cap: usize) -> usize {
    fn walk(v: &Value, n: &mut usize, cap: usize) {
        if *n >= cap {
            return;
        }
        match v {
            Value::Null => *n += 4,
            Value::Bool(b) => *n += if *b { 4 } else { 5 },
            Value::Number(x) => *n += x.to_string().len(),
            Value::String(s) => *n += s.len() + 2,
            Value::Array(a) => {
                *n += 2 + a.len().saturating_sub(1);
                for x in a {
                    walk(x, n, cap);
                }
            }
            Value::Object(m) => {
                *n += 2 + m.len().saturating_sub(1);
                for (k, x) in m {
                    *n += k.len() + 3;
                    walk(x, n, cap);
                }
            }
        }
    }
    let mut n = 0;
    walk(v, &mut n, cap);
    n.min(cap)
}

fn parse(patch: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))
}

/// The merge key of a list field (by the field's name and its parent's), or None when the
/// list is replaced as a whole.
fn merge_key(path: &str, field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "readinessGates" => "conditionType",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" if path.ends_with("ontainers") => "containerPort",
        "ports" if path == "spec" => "port",
        "conditions" => "type",
        "addresses" if path.ends_with("status") => "type",
        "ownerReferences" => "uid",
        "taints" => "key",
        "tolerations" => return None,
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "finalizers" => return Some(""),
        _ => return None,
    })
}

fn strategic_merge(target: &mut Value, patch: &Map<String, Value>, path: &str) -> ApiResult<()> {
    if let Some(d) = patch.get("$patch").and_then(|d| d.as_str()) {
        match d {
            "replace" => {
                let mut p = patch.clone();
                p.remove("$patch");
                *target = Value::Object(p);
                return Ok(());
            }
            "delete" => {
                *target = Value::Null;
                return Ok(());
            }
            "merge" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown $patch directive \"{other}\" at {path}"
                )))
            }
        }
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let mut retain: Option<Vec<String>> = None;
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, v) in patch {
        if k == "$patch" {
            continue;
        }
        if k == "$retainKeys" {
            retain = Some(
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
            );
            continue;
        }
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            orders.push((field.to_string(), v.as_array().cloned().unwrap_or_default()));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let obj = target.as_object_mut().unwrap();
            if let Some(Value::Array(list)) = obj.get_mut(field) {
                let drop = v.as_array().cloned().unwrap_or_default();
                list.retain(|x| !drop.contains(x));
            }
            continue;
        }
        let obj = target.as_object_mut().unwrap();
        let child_path = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        match v {
            Value::Null => {
                obj.remove(k);
            }
            Value::Object(pm) => {
                let slot = obj.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(slot, pm, &child_path)?;
                if slot.is_null() {
                    obj.remove(k);
                }
            }
            Value::Array(items) => match merge_key(path, k) {
                Some(key) => {
                    let cur = match obj.remove(k) {
                        Some(Value::Array(a)) => a,
                        _ => Vec::new(),
                    };
                    obj.insert(
                        k.clone(),
                        Value::Array(merge_list(cur, items, key, &child_path)?),
                    );
                }
                None => {
                    // A list without a merge strategy is replaced, unless it carries
                    // `$patch: replace` (same thing) items.
                    let cleaned: Vec<Value> = items
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .cloned()
                        .collect();
                    obj.insert(k.clone(), Value::Array(cleaned));
                }
            },
            other => {
                obj.insert(k.clone(), other.clone());
            }
        }
    }
    let obj = target.as_object_mut().unwrap();
    for (field, order) in orders {
        if let Some(Value::Array(list)) = obj.get_mut(&field) {
            let key = merge_key(path, &field).unwrap_or("");
            let pos = |item: &Value| {
                order.iter().position(|o| {
                    if key.is_empty() {
                        o == item
                    } else {
                        o.get(key).is_some() && o.get(key) == item.get(key)
                    }
                })
            };
            list.sort_by_key(|item| pos(item).unwrap_or(usize::MAX));
        }
    }
    if let Some(keys) = retain {
        obj.retain(|k, _| keys.contains(k));
    }
    Ok(())
}

/// Merges `patch` items into `cur`: objects by `key` (an empty key: a list of primitives
/// merged as a set), honouring `$patch: delete` and `$patch: replace` items.
fn merge_list(
    mut cur: Vec<Value>,
    patch: &[Value],
    key: &str,
    path: &str,
) -> ApiResult<Vec<Value>> {
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(|d| d.as_str()) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|p| p.get("$patch").is_none())
            .cloned()
            .collect());
    }
    for item in patch {
        if key.is_empty() || !item.is_object() {
            if !cur.contains(item) {
                cur.push(item.clone());
            }
            continue;
        }
        let Some(kv) = item.get(key) else {
            return Err(ApiError::bad_request(format!(
                "map in {path} has no merge key \"{key}\": {item}"
            )));
        };
        let found = cur.iter().position(|c| c.get(key) == Some(kv));
        let delete = item.get("$patch").and_then(|d| d.as_str()) == Some("delete");
        match (found, delete) {
            (Some(i), true) => {
                cur.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                strategic_merge(&mut cur[i], item.as_object().unwrap(), path)?;
            }
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge(&mut fresh, item.as_object().unwrap(), path)?;
                cur.push(fresh);
            }
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_patch_copies_cannot_blow_up_the_object() {
        let target = json!({"metadata": {"name": "c"}});
        let mut ops = vec![json!({"op": "add", "path": "/metadata/annotations",
            "value": {"a": "x".repeat(100)}})];
        for i in 0..40 {
            ops.push(json!({"op": "copy", "from": "/metadata/annotations",
                "path": format!("/metadata/annotations/k{i}")}));
        }
        let body = serde_json::to_vec(&ops).unwrap();
        assert!(body.len() < 4096);
        let e = apply(PatchType::Json, &target, &body).unwrap_err();
        assert_eq!(e.code, 422, "{}", e.message);
        assert!(e.message.contains("copy"), "{}", e.message);
        // A few honest copies still work.
        let ok = json!([{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
            {"op": "copy", "from": "/metadata/labels", "path": "/metadata/annotations"}]);
        let out = apply(PatchType::Json, &target, ok.to_string().as_bytes()).unwrap();
        assert_eq!(out["metadata"]["annotations"]["a"], "b");
        let many: Vec<Value> = (0..MAX_JSON_PATCH_OPS + 1)
            .map(|_| json!({"op": "test", "path": "/metadata/name", "value": "c"}))
            .collect();
        let e = apply(
            PatchType::Json,
            &target,
            &serde_json::to_vec(&many).unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.code, 413);
    }

    fn sm(target: Value, patch: Value) -> Value {
        apply(PatchType::Strategic, &target, patch.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_and_keeps_order() {
        let dep = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80}]},
            {"name": "log", "image": "busybox"}]}}}});
        let out = sm(
            dep.clone(),
            json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "web"}, {"name": "log"}],
            "containers": [{"name": "web", "image": "nginx:2"}]}}}}),
        );
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["image"], "nginx:2");
        assert_eq!(
            cs[0]["ports"][0]["containerPort"], 80,
            "untouched fields stay"
        );
        assert_eq!(cs[1]["name"], "log");
        // Delete one container by key; add one; reorder.
        let out = sm(
            dep,
            json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "web"}],
            "containers": [{"name": "log", "$patch": "delete"}, {"name": "side", "image": "envoy"}]}}}}),
        );
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        let names: Vec<_> = cs.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["side", "web"]);
    }

    #[test]
    fn strategic_merge_directives() {
        let obj = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]},
            "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
                     "ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}],
                     "args": ["a", "b"]}});
        let out = sm(
            obj.clone(),
            json!({
            "metadata": {"labels": {"a": null, "c": "3"}, "$deleteFromPrimitiveList/finalizers": ["x"], "finalizers": ["z"]},
            "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"},
                     "ports": [{"port": 443, "name": "tls"}],
                     "args": ["c"]}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"b": "2", "c": "3"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["y", "z"]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(
            out["spec"]["ports"][1]["name"], "tls",
            "service ports merge by port"
        );
        assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(
            out["spec"]["args"],
            json!(["c"]),
            "lists without a key are replaced"
        );
        let out = sm(obj, json!({"spec": {"$patch": "replace", "args": []}}));
        assert_eq!(out["spec"], json!({"args": []}));
    }

    #[test]
    fn merge_and_json_patches() {
        let obj = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}});
        let out = apply(
            PatchType::Merge,
            &obj,
            br#"{"metadata":{"labels":{"a":null,"b":"2"}}}"#,
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        let out = apply(
            PatchType::Json,
            &obj,
            br#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 3);
        let err = apply(
            PatchType::Json,
            &obj,
            br#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            apply(PatchType::Merge, &obj, b"{nope").unwrap_err().code,
            400
        );
    }
}
