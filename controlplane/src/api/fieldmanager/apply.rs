//! Server-side apply of one configuration: the merge, the conflicts with other managers
//! (refused, or taken over when forced), the removal of fields the manager stopped applying,
//! kubectl's move from client-side apply, and the checks a configuration must pass.

use serde_json::{json, Map, Value};

use super::fieldset::{self, display, FieldSet, Path};
use super::{entries_of, set_entries, value, Entry, Operation};
use crate::api::status::{ApiError, ApiResult};

/// How an apply request is made.
pub struct ApplyRequest<'a> {
    pub manager: &'a str,
    pub force: bool,
    pub api_version: &'a str,
    pub sub: Option<&'a str>,
    pub now: &'a str,
}

/// A conflict: a field the apply would change that another manager owns.
struct Conflict {
    manager: String,
    api_version: String,
    path: Path,
}

/// Server-side apply of `config` onto `live` (`None`: the object does not exist yet).
/// Returns the object to write, with its managedFields; a conflict is a 409 as Kubernetes
/// words it.
pub fn apply(live: Option<&Value>, config: &Value, req: &ApplyRequest) -> ApiResult<Value> {
    let mut config = config.clone();
    value::strip_nulls(&mut config);
    let applied = value::to_set(&config);
    let empty = json!({});
    let live = live.unwrap_or(&empty);
    let mut entries = entries_of(live);

    // A conflict: a field another manager owns whose value the apply would change. What
    // the merge changes is found in one walk (`value::diff`), not path by path.
    let mut out = live.clone();
    value::merge(&mut out, &config);
    let (would_change, _) = value::diff(live, &out);
    let contested = applied.intersection(&would_change);
    let mut conflicts = Vec::new();
    if !contested.is_empty() {
        for e in &entries {
            if e.manager == req.manager {
                continue;
            }
            for p in contested.intersection(&e.fields).paths() {
                let item = matches!(
                    p.last(),
                    Some(fieldset::PathElement::Key(_)) | Some(fieldset::PathElement::Value(_))
                );
                if !item {
                    conflicts.push(Conflict {
                        manager: e.manager.clone(),
                        api_version: e.api_version.clone(),
                        path: p,
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() {
        if !req.force && !upgrades_client_side_apply(live, req.manager, &conflicts) {
            return Err(conflict_error(&conflicts));
        }
        // Each manager loses its contested fields, in one difference.
        for e in entries.iter_mut() {
            let mut lost = FieldSet::default();
            for c in conflicts.iter().filter(|c| c.manager == e.manager) {
                lost.insert(&c.path);
            }
            if !lost.is_empty() {
                e.fields = e.fields.difference(&lost);
            }
        }
    }

    // Fields this manager applied before and no longer does go, unless another manager
    // owns them (or something under them). A list item nobody else holds goes whole (its
    // key fields with it); one that stays keeps its key fields.
    let previous = entries
        .iter()
        .find(|e| e.same_slot(req.manager, Operation::Apply, req.sub))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others = entries
        .iter()
        .filter(|e| !e.same_slot(req.manager, Operation::Apply, req.sub))
        .fold(FieldSet::default(), |acc, e| acc.union(&e.fields));
    let keep = others.union(&applied);
    let mut dropped = FieldSet::default();
    for p in previous.difference(&applied).paths() {
        if dropped.touches_prefix_of(&p)
            || others.touches(&p)
            || applied.touches(&p)
            || is_key_field_of_item(&p)
        {
            continue;
        }
        dropped.insert(&p);
    }
    value::remove_all(&mut out, &dropped, &keep);

    // An apply that changes nothing, not even what its manager owns, writes nothing: its
    // entry keeps its time and place.
    let (changed, gone) = value::diff(live, &out);
    let same = changed.is_empty() && gone.is_empty();
    for e in entries.iter_mut() {
        if e.same_slot(req.manager, Operation::Apply, req.sub) {
            if !(same && e.fields == applied && e.api_version == req.api_version) {
                e.time = req.now.to_string();
            }
            e.fields = applied.clone();
            e.api_version = req.api_version.to_string();
        }
    }
    if !entries
        .iter()
        .any(|e| e.same_slot(req.manager, Operation::Apply, req.sub))
    {
        entries.push(Entry {
            manager: req.manager.to_string(),
            operation: Operation::Apply,
            api_version: req.api_version.to_string(),
            time: req.now.to_string(),
            subresource: req.sub.map(String::from),
            fields: applied,
        });
    }
    entries.retain(|e| !e.fields.is_empty());
    keep_last_applied(&mut out, &config, req.manager);
    set_entries(&mut out, &entries);
    Ok(out)
}

/// kubectl's client-side apply manager, and the annotation it keeps the applied configuration
/// in.
pub(super) const CSA_MANAGER: &str = "kubectl-client-side-apply";
pub(super) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The move from `kubectl apply` to `kubectl apply --server-side`, as Kubernetes allows it:
/// kubectl's default manager may take over the fields client-side apply set, when every
/// conflict is with client-side apply and the last applied configuration names the field.
fn upgrades_client_side_apply(live: &Value, manager: &str, conflicts: &[Conflict]) -> bool {
    if manager != "kubectl" || conflicts.iter().any(|c| c.manager != CSA_MANAGER) {
        return false;
    }
    let Some(last) = live["metadata"]["annotations"][LAST_APPLIED].as_str() else {
        return false;
    };
    let Ok(last) = serde_json::from_str::<Value>(last) else {
        return false;
    };
    let last = value::to_set(&last);
    conflicts.iter().all(|c| last.has(&c.path))
}

/// After a server-side apply by kubectl, an object that carries the last-applied annotation
/// gets the configuration just applied in it, so that a later client-side `kubectl apply`
/// computes its patch from what was really applied (as Kubernetes does).
fn keep_last_applied(out: &mut Value, config: &Value, manager: &str) {
    if manager != "kubectl" || !out["metadata"]["annotations"][LAST_APPLIED].is_string() {
        return;
    }
    let mut applied = config.clone();
    if let Some(a) = applied["metadata"]
        .get_mut("annotations")
        .and_then(|a| a.as_object_mut())
    {
        a.remove(LAST_APPLIED);
    }
    out["metadata"]["annotations"][LAST_APPLIED] = Value::String(format!("{applied}\n"));
}

/// Whether `path` is a key field of the list item it ends in (`[name="web"].name`).
fn is_key_field_of_item(path: &[fieldset::PathElement]) -> bool {
    match path {
        [.., fieldset::PathElement::Key(k), fieldset::PathElement::Field(f)] => {
            serde_json::from_str::<Map<String, Value>>(k).is_ok_and(|m| m.contains_key(f))
        }
        _ => false,
    }
}

fn conflict_error(conflicts: &[Conflict]) -> ApiError {
    let n = conflicts.len();
    let mut by_manager: Vec<(String, String, Vec<String>)> = Vec::new();
    for c in conflicts {
        let path = display(&c.path);
        match by_manager
            .iter_mut()
            .find(|(m, v, _)| *m == c.manager && *v == c.api_version)
        {
            Some((_, _, paths)) => paths.push(path),
            None => by_manager.push((c.manager.clone(), c.api_version.clone(), vec![path])),
        }
    }
    let mut msg = format!(
        "Apply failed with {n} conflict{}: ",
        if n == 1 { "" } else { "s" }
    );
    let parts: Vec<String> = by_manager
        .iter()
        .map(|(m, v, paths)| {
            if paths.len() == 1 {
                format!("conflict with \"{m}\" using {v}: {}", paths[0])
            } else {
                format!(
                    "conflicts with \"{m}\" using {v}:\n- {}",
                    paths.join("\n- ")
                )
            }
        })
        .collect();
    msg.push_str(&parts.join("\n"));
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({"reason": "FieldManagerConflict",
                   "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                   "field": display(&c.path)})
        })
        .collect();
    let mut e = ApiError::new(409, "Conflict", msg);
    e.details = Some(json!({"causes": causes}));
    e
}

/// The configuration an apply may carry: the resource's own kind, and for the object
/// itself no status (a status is applied through `/status`), for `/status` nothing else.
pub fn check_config(
    config: &Value,
    api_version: &str,
    kind: &str,
    name: &str,
    sub: Option<&str>,
    has_status: bool,
) -> ApiResult<Value> {
    let Value::Object(m) = config else {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    };
    if m.get("apiVersion").and_then(Value::as_str) != Some(api_version)
        || m.get("kind").and_then(Value::as_str) != Some(kind)
    {
        return Err(ApiError::bad_request(format!(
            "the applied configuration must set apiVersion: {api_version} and kind: {kind} (got apiVersion {}, kind {})",
            m.get("apiVersion").unwrap_or(&Value::Null),
            m.get("kind").unwrap_or(&Value::Null)
        )));
    }
    match config["metadata"]["name"].as_str() {
        Some(n) if n == name => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "metadata.name of the applied configuration ({}) must match the name on the URL ({name})",
                other.unwrap_or("unset")
            )))
        }
    }
    let mut out = config.clone();
    let o = out.as_object_mut().unwrap();
    match sub {
        Some("status") => {
            o.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"))
        }
        _ if has_status => {
            o.remove("status");
        }
        _ => {}
    }
    if let Some(meta) = o.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
        if sub == Some("status") {
            meta.retain(|k, _| matches!(k.as_str(), "name" | "namespace"));
        }
    }
    Ok(out)
}
