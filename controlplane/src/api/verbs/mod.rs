//! The verbs: get, list, create, update, patch, delete, deletecollection (watch lives in
//! `watch.rs`, which reads through `read`), with the subresources status, scale, binding and
//! finalize. `dispatch` routes a request to its verb; each verb has its file.

mod apply;
mod create;
mod delete;
mod hooks;
mod read;
mod update;

pub use read::Listed;

use hooks::Hooks;

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};
use tracing::debug;

use crate::api::body::{parse_any, parse_apply, parse_object};
use crate::api::fieldmanager;
use crate::api::patch::PatchType;
use crate::api::resources::{self, ResourceInfo};
use crate::api::status::{ApiError, ApiResult};
use crate::api::table;
use crate::api::{decode, json_response, wants_table, Api, Query, Target};

pub async fn dispatch(
    api: &Arc<Api>,
    verb: &str,
    t: Target,
    q: Query,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    q.check_options(verb)?;
    let manager = if matches!(verb, "create" | "update" | "patch") {
        fieldmanager::manager_of(
            q.get("fieldManager"),
            headers
                .get(axum::http::header::USER_AGENT)
                .and_then(|u| u.to_str().ok()),
        )?
    } else {
        String::new()
    };
    let info = t.info;
    let ns = t.ns.clone();
    let sub = t.sub.as_deref();
    match (verb, sub) {
        ("get", None) => {
            let (obj, _) = api
                .get_object(info, ns.as_deref(), t.name.as_deref().unwrap())
                .await?;
            if wants_table(headers) {
                let rv = obj["metadata"]["resourceVersion"].clone();
                return Ok(json_response(
                    StatusCode::OK,
                    &table::table(info, &[obj], json!({"resourceVersion": rv})),
                ));
            }
            Ok(json_response(StatusCode::OK, &obj))
        }
        ("get", Some("log")) => {
            api.pod_log(
                ns.as_deref().unwrap_or_default(),
                t.name.as_deref().unwrap(),
                &q,
            )
            .await
        }
        ("get", Some("status")) => {
            let (obj, _) = api
                .get_object(info, ns.as_deref(), t.name.as_deref().unwrap())
                .await?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        ("get", Some("scale")) => {
            let (obj, _) = api
                .get_object(info, ns.as_deref(), t.name.as_deref().unwrap())
                .await?;
            Ok(json_response(StatusCode::OK, &scale_of(info, &obj)))
        }
        ("list", None) => api.list(info, ns.as_deref(), &q, headers).await,
        ("create", None) => {
            let obj = parse_object(info, headers, &body).await?;
            let (out, warnings) = api
                .create_checked(info, ns.as_deref(), obj, &q, &manager)
                .await?;
            Ok(with_warnings(
                json_response(StatusCode::CREATED, &out),
                &warnings,
            ))
        }
        ("create", Some("token")) => {
            let req = parse_any(headers, &body).await?.value;
            let out = api
                .request_token(
                    ns.as_deref().unwrap_or_default(),
                    t.name.as_deref().unwrap(),
                    &req,
                )
                .await?;
            Ok(json_response(StatusCode::CREATED, &out))
        }
        ("create", Some("eviction")) => {
            let req = parse_any(headers, &body).await?.value;
            let out = api
                .evict(
                    ns.as_deref().unwrap_or_default(),
                    t.name.as_deref().unwrap(),
                    &req,
                )
                .await?;
            Ok(json_response(StatusCode::CREATED, &out))
        }
        ("create", Some("binding")) => {
            let b = parse_any(headers, &body).await?.value;
            api.bind(
                ns.as_deref().unwrap_or_default(),
                t.name.as_deref().unwrap(),
                &b,
            )
            .await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        ("update", sub) => {
            let name = t
                .name
                .as_deref()
                .ok_or_else(|| ApiError::method_not_allowed("PUT needs an object name"))?;
            if sub == Some("scale") {
                let s = parse_any(headers, &body).await?.value;
                let out = api
                    .set_scale(
                        info,
                        ns.as_deref(),
                        name,
                        s["spec"]["replicas"].as_i64(),
                        s["metadata"]["resourceVersion"].as_str(),
                        &manager,
                    )
                    .await?;
                return Ok(json_response(StatusCode::OK, &out));
            }
            let obj = parse_object(info, headers, &body).await?;
            let (out, warnings) = api
                .update_checked(info, ns.as_deref(), name, obj, sub, &q, &manager)
                .await?;
            Ok(with_warnings(
                json_response(StatusCode::OK, &out),
                &warnings,
            ))
        }
        ("patch", sub) => {
            let name = t
                .name
                .as_deref()
                .ok_or_else(|| ApiError::method_not_allowed("PATCH needs an object name"))?;
            let ct = headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or_default();
            if PatchType::is_apply(ct) {
                if q.get("fieldManager").is_none() {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    ));
                }
                let force = match q.get("force") {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "invalid value for force: {other:?}: must be true or false"
                        )))
                    }
                };
                let config = parse_apply(&body).await?;
                let (out, created) = api
                    .apply_patch(info, ns.as_deref(), name, sub, config, &manager, force, &q)
                    .await?;
                let code = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                return Ok(json_response(code, &out));
            }
            if q.get("force").is_some() {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch",
                ));
            }
            let kind = PatchType::from_content_type(ct).ok_or_else(|| {
                ApiError::unsupported_media(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got \"{ct}\")"
                ))
            })?;
            let out = api
                .patch(info, ns.as_deref(), name, sub, kind, &body, &q, &manager)
                .await?;
            Ok(json_response(StatusCode::OK, &out))
        }
        ("delete", None) => {
            let opts = delete_options(headers, &body).await?;
            let (out, gone) = api
                .delete_object(info, ns.as_deref(), t.name.as_deref().unwrap(), &opts, &q)
                .await?;
            Ok(json_response(
                if gone {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                },
                &out,
            ))
        }
        ("deletecollection", None) => {
            if Hooks::of(info).finalized_in_background() {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource: delete namespaces one by one",
                ));
            }
            let opts = delete_options(headers, &body).await?;
            let l = api.list_objects(info, ns.as_deref(), &q).await?;
            let mut n = 0;
            for obj in l.0 {
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let ons = obj["metadata"]["namespace"].as_str().map(String::from);
                match api
                    .delete_object(info, ons.as_deref(), &name, &opts, &q)
                    .await
                {
                    Ok(_) => n += 1,
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            debug!(resource = info.plural, n, "deletecollection");
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{verb} is not supported on {}/{}",
            info.plural,
            sub.unwrap_or("")
        ))),
    }
}

/// DeleteOptions from the body (or none); its dryRun must be `All` if given.
async fn delete_options(headers: &HeaderMap, body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    let opts = parse_any(headers, body).await?.value;
    if let Some(d) = opts.get("dryRun") {
        let ok = d
            .as_array()
            .is_some_and(|a| a.iter().all(|v| v.as_str() == Some("All")));
        if !ok {
            return Err(super::query::invalid_dry_run(&d.to_string()));
        }
    }
    Ok(opts)
}

fn with_warnings(mut r: Response, warnings: &[String]) -> Response {
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "\\\""))) {
            r.headers_mut().append("Warning", v);
        }
    }
    r
}

fn scale_of(info: &ResourceInfo, obj: &Value) -> Value {
    let sel = &obj["spec"]["selector"];
    let selector = if Hooks::of(info).selector_is_a_map() {
        sel.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    } else {
        let mut parts: Vec<String> = sel["matchLabels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        parts.sort();
        parts.join(",")
    };
    let m = &obj["metadata"];
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector}})
}

/// Largest stored object (etcd's default request limit, which Kubernetes objects live under).
pub const MAX_OBJECT: usize = 1536 * 1024;

fn check_object_size(bytes: &[u8]) -> ApiResult<()> {
    if bytes.len() > MAX_OBJECT {
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!(
                "Request entity too large: the object is {} bytes, the limit is {MAX_OBJECT}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// The object as stored at revision `rv` (what a read would return).
fn with_rv(mut obj: Value, rv: i64) -> Value {
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("selfLink");
    }
    obj
}

pub(super) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<u32>() as usize % ALPHABET.len()] as char)
        .collect()
}

/// Everything outside metadata and status: a change bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

impl Api {
    /// Decodes into the typed object (errors and unknown fields name the field) and returns
    /// the normalized object and the warnings to send.
    pub(super) fn normalize(
        &self,
        info: &ResourceInfo,
        obj: Value,
        duplicates: &[String],
        q: &Query,
    ) -> ApiResult<(Value, Vec<String>)> {
        let mut input = obj;
        // Kubernetes ignores it on input; it is not a decoding error. (managedFields are
        // the field manager's: `fieldmanager::track_update` judges them.)
        if let Some(m) = input.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.remove("selfLink");
        }
        let out = (info.normalize)(input.clone()).map_err(|e| {
            ApiError::bad_request(format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: {e}",
                kind = info.kind,
                v = info.version
            ))
        })?;
        let unknown = resources::unknown_fields(&input, &out);
        let mut warnings = Vec::new();
        if !unknown.is_empty() || !duplicates.is_empty() {
            let msgs: Vec<String> = duplicates
                .iter()
                .map(|f| format!("duplicate field \"{f}\""))
                .chain(unknown.iter().map(|f| format!("unknown field \"{f}\"")))
                .collect();
            match q.get("fieldValidation").unwrap_or("Warn") {
                "Strict" => {
                    return Err(ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                        info.kind,
                        info.version,
                        info.kind,
                        msgs.join(", ")
                    )))
                }
                "Ignore" => {}
                _ => warnings = msgs,
            }
        }
        Ok((out, warnings))
    }

    pub(super) async fn check_namespace(&self, ns: &str) -> ApiResult<()> {
        let info = resources::find("", "v1", "namespaces").unwrap();
        match self.store.get(&info.key("", ns)).await? {
            None => Err(ApiError::not_found("namespaces", "", ns)),
            Some(kv) => {
                let obj = decode(&kv);
                if obj["metadata"]["deletionTimestamp"].is_string() {
                    let mut e = ApiError::forbidden(format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    ));
                    e.details = Some(
                        json!({"causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}),
                    );
                    return Err(e);
                }
                Ok(())
            }
        }
    }
}
