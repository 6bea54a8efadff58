//! What an object's fields are, as paths: the set of paths an object sets, the value at a
//! path, the merge of an applied configuration into a live object, and the removal of a path.

use serde_json::{Map, Value};

use super::fieldset::{canonical, FieldSet, PathElement};
use super::schema::{atomic_object, item_key, item_value, list_type, ListType};

/// Metadata the server sets: never owned by a manager.
const SERVER_METADATA: [&str; 11] = [
    "managedFields",
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "name",
    "namespace",
    "generateName",
];

/// The paths an object sets: leaves (scalars, atomic lists and objects, empty objects), and
/// the items of associative and set-like lists (which are also walked into).
pub fn to_set(obj: &Value) -> FieldSet {
    let mut set = FieldSet::default();
    if let Value::Object(m) = obj {
        walk_object(m, &mut Vec::new(), &mut set);
    }
    set
}

/// Fields no manager owns: the type, and the metadata the server sets.
fn unowned(path: &[String], k: &str) -> bool {
    match path {
        [] => k == "apiVersion" || k == "kind",
        [m] => m == "metadata" && SERVER_METADATA.contains(&k),
        _ => false,
    }
}

fn walk_object(m: &Map<String, Value>, path: &mut Vec<String>, set: &mut FieldSet) {
    for (k, v) in m {
        if !unowned(path, k) {
            walk_field(k, v, path, set);
        }
    }
}

fn walk_field(k: &str, v: &Value, path: &mut Vec<String>, set: &mut FieldSet) {
    let pe = PathElement::Field(k.to_string());
    match v {
        Value::Object(o) if !o.is_empty() && !atomic_object(path, k) => {
            let mut c = FieldSet::default();
            path.push(k.to_string());
            walk_object(o, path, &mut c);
            path.pop();
            // `metadata` with only the server's fields is owned by no one.
            attach(set, &pe, c);
        }
        Value::Array(items) if !items.is_empty() => match list_type(path, k) {
            ListType::Set if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
                let child = set.child(pe);
                for i in items {
                    child.insert(&[item_value(i)]);
                }
            }
            ListType::Map(keys) => {
                let ks: Option<Vec<PathElement>> =
                    items.iter().map(|i| item_key(i, keys)).collect();
                let Some(ks) = ks else {
                    set.insert(&[pe]);
                    return;
                };
                path.push(k.to_string());
                let child = set.child(pe);
                for (i, kpe) in items.iter().zip(ks) {
                    child.insert(std::slice::from_ref(&kpe));
                    if let Value::Object(o) = i {
                        walk_object(o, path, child.child(kpe));
                    }
                }
                path.pop();
            }
            _ => set.insert(&[pe]),
        },
        _ => set.insert(&[pe]),
    }
}

/// What changed from `old` to `new`, as two sets: `changed` holds the paths `new` sets that
/// `old` did not set or set to another value (and items of lists that appeared), `removed`
/// the paths `old` set and `new` does not. Equal subtrees are skipped without a walk.
pub fn diff(old: &Value, new: &Value) -> (FieldSet, FieldSet) {
    let (mut changed, mut removed) = (FieldSet::default(), FieldSet::default());
    let empty = Map::new();
    diff_objects(
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
        &mut Vec::new(),
        &mut changed,
        &mut removed,
    );
    (changed, removed)
}

fn diff_objects(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    path: &mut Vec<String>,
    changed: &mut FieldSet,
    removed: &mut FieldSet,
) {
    for (k, nv) in new {
        if !unowned(path, k) {
            diff_field(k, old.get(k), Some(nv), path, changed, removed);
        }
    }
    for (k, ov) in old {
        if !new.contains_key(k) && !unowned(path, k) {
            diff_field(k, Some(ov), None, path, changed, removed);
        }
    }
}

fn diff_field(
    k: &str,
    old: Option<&Value>,
    new: Option<&Value>,
    path: &mut Vec<String>,
    changed: &mut FieldSet,
    removed: &mut FieldSet,
) {
    if old == new {
        return;
    }
    let pe = PathElement::Field(k.to_string());
    let (o, n) = match (old, new) {
        (None, Some(n)) => return walk_field(k, n, path, changed),
        (Some(o), None) => return walk_field(k, o, path, removed),
        (Some(o), Some(n)) => (o, n),
        (None, None) => return,
    };
    match (o, n) {
        (Value::Object(om), Value::Object(nm))
            if !om.is_empty() && !nm.is_empty() && !atomic_object(path, k) =>
        {
            let (mut c, mut r) = (FieldSet::default(), FieldSet::default());
            path.push(k.to_string());
            diff_objects(om, nm, path, &mut c, &mut r);
            path.pop();
            attach(changed, &pe, c);
            attach(removed, &pe, r);
        }
        (Value::Array(oa), Value::Array(na)) if !oa.is_empty() && !na.is_empty() => {
            if !diff_lists(k, oa, na, path, changed, removed) {
                changed.insert(&[pe]);
            }
        }
        _ => {
            // The shape changed (or a leaf's value): what new sets is changed, what only old
            // set is removed.
            let (mut c, mut r) = (FieldSet::default(), FieldSet::default());
            walk_field(k, n, path, &mut c);
            walk_field(k, o, path, &mut r);
            let r = r.difference(&c);
            *changed = changed.union(&c);
            *removed = removed.union(&r);
        }
    }
}

/// Adds `sub` (a set relative to `pe`) under `pe`.
fn attach(set: &mut FieldSet, pe: &PathElement, sub: FieldSet) {
    if !sub.is_empty() {
        let child = set.child(pe.clone());
        *child = child.union(&sub);
    }
}

/// Item by item for associative and set-like lists; false for atomic lists (or items
/// without their keys), which the caller treats as one leaf.
fn diff_lists(
    k: &str,
    old: &[Value],
    new: &[Value],
    path: &mut Vec<String>,
    changed: &mut FieldSet,
    removed: &mut FieldSet,
) -> bool {
    let pe = PathElement::Field(k.to_string());
    match list_type(path, k) {
        ListType::Set
            if old
                .iter()
                .chain(new)
                .all(|i| !i.is_object() && !i.is_array()) =>
        {
            let ov: std::collections::HashSet<String> = old.iter().map(canonical).collect();
            let nv: std::collections::HashSet<String> = new.iter().map(canonical).collect();
            let (mut c, mut r) = (FieldSet::default(), FieldSet::default());
            for v in nv.difference(&ov) {
                c.insert(&[PathElement::Value(v.clone())]);
            }
            for v in ov.difference(&nv) {
                r.insert(&[PathElement::Value(v.clone())]);
            }
            attach(changed, &pe, c);
            attach(removed, &pe, r);
            true
        }
        ListType::Map(keys) => {
            let keyed = |items: &[Value]| -> Option<Vec<(PathElement, Value)>> {
                items
                    .iter()
                    .map(|i| Some((item_key(i, keys)?, i.clone())))
                    .collect()
            };
            let (Some(ok), Some(nk)) = (keyed(old), keyed(new)) else {
                return false;
            };
            let old_by: std::collections::HashMap<&PathElement, &Value> =
                ok.iter().map(|(p, v)| (p, v)).collect();
            let new_keys: std::collections::HashSet<&PathElement> =
                nk.iter().map(|(p, _)| p).collect();
            let (mut c, mut r) = (FieldSet::default(), FieldSet::default());
            path.push(k.to_string());
            for (kpe, item) in &nk {
                match old_by.get(kpe) {
                    None => {
                        c.insert(std::slice::from_ref(kpe));
                        if let Value::Object(o) = item {
                            walk_object(o, path, c.child(kpe.clone()));
                        }
                    }
                    Some(prev) if *prev == item => {}
                    Some(prev) => {
                        let (mut ic, mut ir) = (FieldSet::default(), FieldSet::default());
                        let empty = Map::new();
                        diff_objects(
                            prev.as_object().unwrap_or(&empty),
                            item.as_object().unwrap_or(&empty),
                            path,
                            &mut ic,
                            &mut ir,
                        );
                        attach(&mut c, kpe, ic);
                        attach(&mut r, kpe, ir);
                    }
                }
            }
            for (kpe, item) in &ok {
                if !new_keys.contains(kpe) {
                    r.insert(std::slice::from_ref(kpe));
                    if let Value::Object(o) = item {
                        walk_object(o, path, r.child(kpe.clone()));
                    }
                }
            }
            path.pop();
            attach(changed, &pe, c);
            attach(removed, &pe, r);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
fn find_item(items: &[Value], pe: &PathElement) -> Option<usize> {
    match pe {
        PathElement::Key(k) => {
            let want: Map<String, Value> = serde_json::from_str(k).ok()?;
            let keys: Vec<&str> = want.keys().map(String::as_str).collect();
            // The item's key as the schema computes it (key defaults included).
            items
                .iter()
                .position(|i| item_key(i, &keys).as_ref() == Some(pe))
        }
        PathElement::Value(v) => items.iter().position(|i| &canonical(i) == v),
        PathElement::Index(n) => (*n < items.len()).then_some(*n),
        PathElement::Field(_) => None,
    }
}

/// The value at `path`, if the object has one.
#[cfg(test)]
pub fn get<'a>(obj: &'a Value, path: &[PathElement]) -> Option<&'a Value> {
    let mut cur = obj;
    for pe in path {
        cur = match (pe, cur) {
            (PathElement::Field(f), Value::Object(m)) => m.get(f)?,
            (_, Value::Array(items)) => &items[find_item(items, pe)?],
            _ => return None,
        };
    }
    Some(cur)
}

/// Removes every path of `drop` from the object (a list item whole when its own path is in
/// `drop`), then each object or list emptied by it unless `keep` owns it itself. One walk
/// over what `drop` names, each list indexed once.
pub fn remove_all(obj: &mut Value, drop: &FieldSet, keep: &FieldSet) {
    if let Value::Object(m) = obj {
        remove_in_object(m, drop, Some(keep), &mut Vec::new());
    }
}

fn emptied(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn remove_in_object(
    m: &mut Map<String, Value>,
    drop: &FieldSet,
    keep: Option<&FieldSet>,
    path: &mut Vec<String>,
) {
    for pe in drop.elements() {
        let PathElement::Field(k) = pe else { continue };
        if drop.has_member(pe) {
            m.remove(k);
            continue;
        }
        let (Some(sub), Some(v)) = (drop.sub(pe), m.get_mut(k)) else {
            continue;
        };
        let keep_sub = keep.and_then(|kp| kp.sub(pe));
        match v {
            Value::Object(o) => {
                path.push(k.clone());
                remove_in_object(o, sub, keep_sub, path);
                path.pop();
            }
            Value::Array(items) => remove_in_list(items, k, sub, keep_sub, path),
            _ => {}
        }
        if emptied(v) && !keep.is_some_and(|kp| kp.has_member(pe)) {
            m.remove(k);
        }
    }
}

fn remove_in_list(
    items: &mut Vec<Value>,
    k: &str,
    drop: &FieldSet,
    keep: Option<&FieldSet>,
    path: &mut Vec<String>,
) {
    let element = |i: &Value| -> Option<PathElement> {
        match list_type(path, k) {
            ListType::Map(keys) => item_key(i, keys),
            ListType::Set => Some(item_value(i)),
            ListType::Atomic => None,
        }
    };
    let pes: Vec<Option<PathElement>> = items.iter().map(element).collect();
    path.push(k.to_string());
    let mut gone = vec![false; items.len()];
    for (at, pe) in pes.iter().enumerate() {
        let Some(pe) = pe else { continue };
        if drop.has_member(pe) {
            gone[at] = true;
        } else if let Some(sub) = drop.sub(pe) {
            if let Value::Object(o) = &mut items[at] {
                remove_in_object(o, sub, keep.and_then(|kp| kp.sub(pe)), path);
                gone[at] = o.is_empty() && !keep.is_some_and(|kp| kp.has_member(pe));
            }
        }
    }
    path.pop();
    let mut at = 0;
    items.retain(|_| {
        at += 1;
        !gone[at - 1]
    });
}

/// Merges an applied configuration into the live object: objects field by field,
/// associative lists item by item (live order kept, new items appended), sets as a union,
/// everything else replaced.
pub fn merge(live: &mut Value, config: &Value) {
    if let (Value::Object(l), Value::Object(c)) = (&mut *live, config) {
        merge_object(l, c, &mut Vec::new());
    }
}

fn merge_object(live: &mut Map<String, Value>, cfg: &Map<String, Value>, path: &mut Vec<String>) {
    for (k, cv) in cfg {
        match cv {
            Value::Object(co) if !co.is_empty() && !atomic_object(path, k) => {
                let slot = live
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                path.push(k.clone());
                merge_object(slot.as_object_mut().unwrap(), co, path);
                path.pop();
            }
            Value::Array(items) => {
                let merged = match (list_type(path, k), live.get_mut(k)) {
                    (ListType::Set, Some(Value::Array(cur))) => {
                        let mut seen: std::collections::HashSet<String> =
                            cur.iter().map(canonical).collect();
                        for i in items {
                            if seen.insert(canonical(i)) {
                                cur.push(i.clone());
                            }
                        }
                        true
                    }
                    (ListType::Map(keys), Some(Value::Array(cur))) => {
                        let index: Option<std::collections::HashMap<PathElement, usize>> = cur
                            .iter()
                            .enumerate()
                            .map(|(at, i)| Some((item_key(i, keys)?, at)))
                            .collect();
                        let applied: Option<Vec<PathElement>> =
                            items.iter().map(|i| item_key(i, keys)).collect();
                        match (index, applied) {
                            (Some(mut index), Some(applied)) => {
                                path.push(k.clone());
                                for (item, pe) in items.iter().zip(applied) {
                                    match index.get(&pe) {
                                        Some(&at) => match (&mut cur[at], item) {
                                            (Value::Object(l), Value::Object(c)) => {
                                                merge_object(l, c, path)
                                            }
                                            (slot, _) => *slot = item.clone(),
                                        },
                                        None => {
                                            index.insert(pe, cur.len());
                                            cur.push(item.clone());
                                        }
                                    }
                                }
                                path.pop();
                                true
                            }
                            _ => false,
                        }
                    }
                    _ => false,
                };
                if !merged {
                    live.insert(k.clone(), cv.clone());
                }
            }
            _ => {
                live.insert(k.clone(), cv.clone());
            }
        }
    }
}

/// The configuration without null values (an applied null sets nothing).
pub fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(s: &str) -> PathElement {
        PathElement::Field(s.into())
    }

    #[test]
    fn sets_of_a_deployment() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "uid": "u", "labels": {"app": "d"}, "finalizers": ["a"]},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "d"}},
                "template": {"spec": {"containers": [{"name": "web", "image": "nginx",
                    "ports": [{"containerPort": 80}], "args": ["a", "b"]}],
                    "volumes": [{"name": "v", "emptyDir": {}}]}}}});
        let s = to_set(&d);
        let paths: Vec<String> = s
            .paths()
            .iter()
            .map(|p| super::super::fieldset::display(p))
            .collect();
        assert_eq!(
            paths,
            [
                ".metadata.finalizers[=\"a\"]",
                ".metadata.labels.app",
                ".spec.replicas",
                ".spec.selector",
                ".spec.template.spec.containers[name=\"web\"]",
                ".spec.template.spec.containers[name=\"web\"].args",
                ".spec.template.spec.containers[name=\"web\"].image",
                ".spec.template.spec.containers[name=\"web\"].name",
                ".spec.template.spec.containers[name=\"web\"].ports[containerPort=80,protocol=\"TCP\"]",
                ".spec.template.spec.containers[name=\"web\"].ports[containerPort=80,protocol=\"TCP\"].containerPort",
                ".spec.template.spec.volumes[name=\"v\"]",
                ".spec.template.spec.volumes[name=\"v\"].emptyDir",
                ".spec.template.spec.volumes[name=\"v\"].name",
            ]
        );
        let web = PathElement::Key("{\"name\":\"web\"}".into());
        let port = PathElement::Key("{\"containerPort\":80,\"protocol\":\"TCP\"}".into());
        let path = [
            f("spec"),
            f("template"),
            f("spec"),
            f("containers"),
            web,
            f("ports"),
            port,
            f("containerPort"),
        ];
        assert_eq!(get(&d, &path), Some(&json!(80)));
        let mut d2 = d.clone();
        let mut drop = FieldSet::default();
        drop.insert(&path);
        remove_all(&mut d2, &drop, &FieldSet::default());
        // The emptied port item, then the emptied ports list, went with it.
        assert!(d2["spec"]["template"]["spec"]["containers"][0]
            .get("ports")
            .is_none());
        assert_eq!(
            d2["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx"
        );
    }

    #[test]
    fn merge_by_keys_sets_and_atomics() {
        let mut live = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["x"]},
            "spec": {"selector": {"matchLabels": {"a": "1", "b": "2"}},
                "ports": [{"port": 80, "name": "http"}, {"port": 443, "protocol": "TCP"}]}});
        merge(
            &mut live,
            &json!({"metadata": {"labels": {"b": "2"}, "finalizers": ["y"]},
            "spec": {"selector": {"matchLabels": {"c": "3"}},
                "ports": [{"port": 443, "name": "tls"}, {"port": 53, "protocol": "UDP"}]}}),
        );
        assert_eq!(live["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        assert_eq!(live["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(
            live["spec"]["selector"],
            json!({"matchLabels": {"c": "3"}}),
            "selectors are atomic"
        );
        assert_eq!(
            live["spec"]["ports"],
            json!([{"port": 80, "name": "http"},
            {"port": 443, "protocol": "TCP", "name": "tls"}, {"port": 53, "protocol": "UDP"}])
        );
    }

    /// `diff` against its definition by sets: changed = what new sets with another value
    /// (or list items new sets that old did not), removed = what old sets and new does not.
    #[test]
    fn diff_agrees_with_its_definition_by_sets() {
        let base = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "uid": "u", "labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"containers": [{"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}],
                "ports": [{"containerPort": 80}]}, {"name": "log", "image": "busybox"}],
                "tolerations": [{"key": "k"}], "nodeName": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}], "phase": "Pending"}});
        let mut variants = Vec::new();
        let mut v = base.clone();
        v["metadata"]["labels"]["a"] = json!("9");
        v["metadata"]["labels"].as_object_mut().unwrap().remove("b");
        v["metadata"]["finalizers"] = json!(["y"]);
        variants.push(v);
        let mut v = base.clone();
        v["spec"]["containers"][0]["env"][0]["value"] = json!("2");
        v["spec"]["containers"].as_array_mut().unwrap().remove(1);
        v["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "side", "image": "envoy"}));
        v["spec"]["tolerations"] = json!([{"key": "j"}]);
        variants.push(v);
        let mut v = base.clone();
        v["status"]["conditions"][0]["status"] = json!("True");
        v["status"]["phase"] = json!({"odd": "shape"});
        v["spec"]["nodeName"] = json!(null);
        variants.push(v);
        variants.push(json!({"metadata": {"name": "p"}}));
        for new in variants {
            for (old, new) in [(&base, &new), (&new, &base)] {
                let (changed, removed) = diff(old, new);
                let (os, ns) = (to_set(old), to_set(new));
                let mut want = FieldSet::default();
                for p in ns.paths() {
                    let differs = match p.last() {
                        Some(PathElement::Key(_)) | Some(PathElement::Value(_)) => !os.has(&p),
                        _ => get(old, &p) != get(new, &p),
                    };
                    if differs {
                        want.insert(&p);
                    }
                }
                assert_eq!(changed, want, "changed, from {old} to {new}");
                assert_eq!(removed, os.difference(&ns), "removed, from {old} to {new}");
            }
        }
    }
}
