//! The verbs: get, list, create, update, patch, delete, deletecollection (watch lives in
//! `watch.rs`), with the subresources status, scale, binding and finalize.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::admission;
use super::body::{parse_any, parse_object, Decoded};
use super::patch::{self, PatchType};
use super::resources::{self, ResourceInfo};
use super::selectors::{labels_of, FieldSelector, LabelSelector};
use super::status::{ApiError, ApiResult, FieldError};
use super::table;
use super::watch;
use super::{
    decode, encode, json_response, now_rfc3339, splice_rv, wants_table, Api, Query, Target,
};
use crate::store::{KeyValue, ListOptions, Precondition, StoreError};

pub async fn dispatch(
    api: &Arc<Api>,
    verb: &str,
    t: Target,
    q: Query,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    q.check_options(verb)?;
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
        ("watch", None) => watch::watch(api.clone(), info, ns, t.name, &q, headers).await,
        ("create", None) => {
            let obj = parse_object(info, headers, &body).await?;
            let (out, warnings) = api.create_checked(info, ns.as_deref(), obj, &q).await?;
            Ok(with_warnings(
                json_response(StatusCode::CREATED, &out),
                &warnings,
            ))
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
                    )
                    .await?;
                return Ok(json_response(StatusCode::OK, &out));
            }
            let obj = parse_object(info, headers, &body).await?;
            let (out, warnings) = api
                .update_checked(info, ns.as_deref(), name, obj, sub, &q)
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
            let kind = PatchType::from_content_type(ct).ok_or_else(|| {
                ApiError::unsupported_media(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got \"{ct}\")"
                ))
            })?;
            let out = api
                .patch(info, ns.as_deref(), name, sub, kind, &body, &q)
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
            if info.plural == "namespaces" {
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
    let selector = if info.kind == "ReplicationController" {
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

/// The namespaces the system lives in: never deleted (as Kubernetes' NamespaceLifecycle).
pub const PROTECTED_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

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
        m.remove("managedFields");
        m.remove("selfLink");
    }
    obj
}

fn random_suffix() -> String {
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

/// Decoded objects of a list, its revision and continue token.
pub struct Listed(pub Vec<Value>, pub i64, pub Option<String>);

#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: i64,
    start: String,
}

impl Api {
    pub async fn get_object(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<(Value, KeyValue)> {
        let kv = self
            .store
            .get(&info.key(ns.unwrap_or_default(), name))
            .await?
            .ok_or_else(|| ApiError::not_found(info.plural, info.group, name))?;
        Ok((decode(&kv), kv))
    }

    fn selectors(
        &self,
        info: &ResourceInfo,
        q: &Query,
    ) -> ApiResult<(LabelSelector, FieldSelector)> {
        let ls = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?;
        let fs = FieldSelector::parse(
            q.get("fieldSelector").unwrap_or_default(),
            &info.field_selectable(),
        )
        .map_err(ApiError::bad_request)?;
        Ok((ls, fs))
    }

    /// Objects matching the request's selectors, honouring limit and continue.
    pub async fn list_objects(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        q: &Query,
    ) -> ApiResult<Listed> {
        let (ls, fs) = self.selectors(info, q)?;
        let limit = q.count("limit")?.unwrap_or(0) as usize;
        let prefix = info.list_prefix(ns);
        let (mut rv, mut start) = match q.get("continue") {
            Some(tok) => {
                let c: Continue = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(tok)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "continue key is not valid: run the list again without it",
                        )
                    })?;
                (c.rv, Some(c.start))
            }
            None => (self.list_revision(q)?, None),
        };
        let mut out = Vec::new();
        loop {
            let page = self
                .store
                .list(ListOptions {
                    prefix: &prefix,
                    start_after: start.as_deref(),
                    limit: if limit > 0 { (limit - out.len()).max(64) } else { 0 },
                    revision: rv,
                })
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if q.get("continue").is_some() => ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                    e => e.into(),
                })?;
            rv = page.revision;
            let mut last = None;
            for kv in &page.kvs {
                last = Some(kv.key.clone());
                let obj = decode(kv);
                if (ls.is_empty() || ls.matches(&labels_of(&obj)))
                    && (fs.is_empty() || fs.matches(&obj))
                {
                    out.push(obj);
                    if limit > 0 && out.len() == limit {
                        let more = page.more || kv.key != page.kvs.last().unwrap().key;
                        let token = more.then(|| {
                            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
                                serde_json::to_vec(&Continue {
                                    rv,
                                    start: kv.key.clone(),
                                })
                                .unwrap(),
                            )
                        });
                        return Ok(Listed(out, rv, token));
                    }
                }
            }
            if !page.more || last.is_none() {
                return Ok(Listed(out, rv, None));
            }
            start = last;
        }
    }

    fn list_revision(&self, q: &Query) -> ApiResult<i64> {
        match (q.get("resourceVersion"), q.get("resourceVersionMatch")) {
            (Some(rv), Some("Exact")) => rv.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid resourceVersion \"{rv}\": must be an integer"
                ))
            }),
            (Some(rv), _) => {
                rv.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid resourceVersion \"{rv}\": must be an integer"
                    ))
                })?;
                Ok(0)
            }
            _ => Ok(0),
        }
    }

    async fn list(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        q: &Query,
        headers: &HeaderMap,
    ) -> ApiResult<Response> {
        let table = wants_table(headers);
        let plain = q.get("labelSelector").is_none()
            && q.get("fieldSelector").is_none()
            && q.get("limit").is_none()
            && q.get("continue").is_none();
        let kind = format!("{}List", info.kind);
        if plain && !table {
            // The fast path: stored bytes with the resource version spliced in, unparsed.
            let l = self
                .store
                .list(ListOptions {
                    prefix: &info.list_prefix(ns),
                    revision: self.list_revision(q)?,
                    ..Default::default()
                })
                .await?;
            let mut body =
                Vec::with_capacity(l.kvs.iter().map(|kv| kv.value.len() + 32).sum::<usize>() + 128);
            body.extend_from_slice(
                format!("{{\"kind\":\"{kind}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{}\"}},\"items\":[", info.api_version(), l.revision).as_bytes(),
            );
            for (i, kv) in l.kvs.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(&splice_rv(&kv.value, kv.mod_revision));
            }
            body.extend_from_slice(b"]}");
            return Ok((
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response());
        }
        let Listed(items, rv, token) = self.list_objects(info, ns, q).await?;
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if let Some(t) = token {
            meta["continue"] = json!(t);
        }
        if table {
            return Ok(json_response(
                StatusCode::OK,
                &table::table(info, &items, meta),
            ));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"kind": kind, "apiVersion": info.api_version(), "metadata": meta, "items": items}),
        ))
    }

    /// Decodes into the typed object (errors and unknown fields name the field) and returns
    /// the normalized object and the warnings to send.
    fn normalize(
        &self,
        info: &ResourceInfo,
        obj: Value,
        duplicates: &[String],
        q: &Query,
    ) -> ApiResult<(Value, Vec<String>)> {
        let mut input = obj;
        // Kubernetes ignores these on input; they are not decoding errors.
        if let Some(m) = input.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.remove("managedFields");
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

    async fn check_namespace(&self, ns: &str) -> ApiResult<()> {
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

    pub async fn create_checked(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        body: Decoded,
        q: &Query,
    ) -> ApiResult<(Value, Vec<String>)> {
        if body.value["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let (obj, warnings) = self.normalize(info, body.value, &body.duplicates, q)?;
        let dry = q.dry_run();
        Ok((self.create_object(info, ns, obj, dry).await?, warnings))
    }

    /// Admission and the store write of a new object.
    pub async fn create_object(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        mut obj: Value,
        dry: bool,
    ) -> ApiResult<Value> {
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let meta = &mut obj["metadata"];
        if info.namespaced {
            let url_ns = ns.unwrap_or_default();
            match meta["namespace"].as_str() {
                Some(n) if !n.is_empty() && n != url_ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
                _ => meta["namespace"] = json!(url_ns),
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        let name = match meta["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta["generateName"].as_str() {
                Some(g) if !g.is_empty() => format!("{g}{}", random_suffix()),
                _ => String::new(),
            },
        };
        meta["name"] = json!(name);
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["creationTimestamp"] = json!(now_rfc3339());
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("resourceVersion");
        }
        // Status is the system's: a create starts without one (defaults add pods' phase).
        if info.has_status() || info.plural == "namespaces" {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        if info.plural != "namespaces" && info.plural != "nodes" && obj.get("spec").is_some()
            || info.group == "apps"
        {
            obj["metadata"]["generation"] = json!(1);
        }
        admission::default(info, &mut obj);
        admission::on_create(info, &mut obj);
        let mut errs = admission::validate_name(info, &name);
        if let Some(g) = obj["metadata"]["generateName"].as_str() {
            if !name.is_empty() && !admission::is_dns1123_subdomain(&name) && errs.is_empty() {
                errs.push(FieldError::invalid(
                    "metadata.generateName",
                    format!("\"{g}\""),
                    "must be a DNS subdomain prefix",
                ));
            }
        }
        errs.extend(admission::validate(info, &obj, None));
        if !errs.is_empty() {
            return Err(ApiError::invalid(info.kind, info.group, &name, errs));
        }
        if info.namespaced {
            self.check_namespace(ns.unwrap_or_default()).await?;
        }
        let key = info.key(ns.unwrap_or_default(), &name);
        if dry {
            check_object_size(&encode(&obj))?;
            if self.store.get(&key).await?.is_some() {
                return Err(ApiError::already_exists(info.plural, info.group, &name));
            }
            return Ok(obj);
        }
        let claims = if info.kind == "Service" && info.group.is_empty() {
            self.allocate_service(&mut obj, None, &name).await?
        } else {
            Vec::new()
        };
        let bytes = encode(&obj);
        if let Err(e) = check_object_size(&bytes) {
            for c in claims {
                self.release(c).await;
            }
            return Err(e);
        }
        let lease = if info.kind == "Event" {
            self.event_lease().await?
        } else {
            0
        };
        match self
            .store
            .put(&key, bytes, Precondition::Absent, lease)
            .await
        {
            Ok((kv, _)) => {
                debug!(key, rev = kv.mod_revision, "created");
                Ok(with_rv(obj, kv.mod_revision))
            }
            Err(e) => {
                for c in claims {
                    self.release(c).await;
                }
                match e {
                    StoreError::AlreadyExists(_) => {
                        Err(ApiError::already_exists(info.plural, info.group, &name))
                    }
                    e => Err(e.into()),
                }
            }
        }
    }

    pub async fn update_checked(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        body: Decoded,
        sub: Option<&str>,
        q: &Query,
    ) -> ApiResult<(Value, Vec<String>)> {
        let (obj, warnings) = self.normalize(info, body.value, &body.duplicates, q)?;
        if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                obj["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .map(String::from);
        let want =
            match rv.as_deref() {
                None | Some("") => None,
                Some(r) => Some(r.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion \"{r}\""))
                })?),
            };
        let (cur, kv) = self.get_object(info, ns, name).await?;
        if let Some(w) = want {
            if w != kv.mod_revision {
                return Err(ApiError::conflict(info.plural, info.group, name));
            }
        }
        Ok((
            self.update_object(info, ns, name, obj, &cur, &kv, sub, q.dry_run())
                .await?,
            warnings,
        ))
    }

    /// Admission and the compare-and-swap write of a changed object.
    #[allow(clippy::too_many_arguments)]
    async fn update_object(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        new: Value,
        cur: &Value,
        cur_kv: &KeyValue,
        sub: Option<&str>,
        dry: bool,
    ) -> ApiResult<Value> {
        let cur_rev = cur_kv.mod_revision;
        let mut obj = match sub {
            Some("status") => {
                let mut o = cur.clone();
                o["status"] = new["status"].clone();
                o
            }
            _ => {
                let mut o = new;
                if info.has_status() {
                    o["status"] = cur["status"].clone();
                    if o["status"].is_null() {
                        o.as_object_mut().map(|m| m.remove("status"));
                    }
                }
                if sub == Some("finalize") {
                    o["status"] = cur["status"].clone();
                } else if info.plural == "namespaces" {
                    // spec.finalizers change only through /finalize.
                    o["spec"] = cur["spec"].clone();
                }
                o
            }
        };
        // System metadata is the server's.
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "name",
            "generation",
        ] {
            match cur["metadata"].get(f) {
                Some(v) => obj["metadata"][f] = v.clone(),
                None => {
                    obj["metadata"].as_object_mut().map(|m| m.remove(f));
                }
            }
        }
        admission::default(info, &mut obj);
        if spec_part(&obj) != spec_part(cur) && obj["metadata"]["generation"].is_i64() {
            obj["metadata"]["generation"] =
                json!(obj["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
        }
        let is_service = info.kind == "Service" && info.group.is_empty();
        if is_service && sub.is_none() {
            // Carry the allocated IP over before validating immutability.
            if obj["spec"]["clusterIP"]
                .as_str()
                .is_none_or(|s| s.is_empty())
            {
                if let Some(ip) = cur["spec"]["clusterIP"].as_str() {
                    obj["spec"]["clusterIP"] = json!(ip);
                    obj["spec"]["clusterIPs"] = cur["spec"]["clusterIPs"].clone();
                }
            }
        }
        let errs = admission::validate(info, &obj, Some(cur));
        if !errs.is_empty() {
            return Err(ApiError::invalid(info.kind, info.group, name, errs));
        }
        let finalizers_empty = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        let key = info.key(ns.unwrap_or_default(), name);
        if dry {
            return Ok(obj);
        }
        // A terminating object whose last finalizer went is deleted now; a pod only when it
        // has no grace period left (a kubelet is stopping the others).
        let no_grace = cur["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(0)
            == 0;
        if cur["metadata"]["deletionTimestamp"].is_string()
            && finalizers_empty
            && (info.plural != "pods" || no_grace)
        {
            return match self
                .store
                .delete(&key, Precondition::ModRevision(cur_rev))
                .await
            {
                Ok((kv, rev)) => {
                    self.after_delete(info, &decode(&kv)).await;
                    let mut out = obj;
                    out["metadata"]["resourceVersion"] = json!(rev.to_string());
                    Ok(out)
                }
                Err(StoreError::Conflict { .. }) => {
                    Err(ApiError::conflict(info.plural, info.group, name))
                }
                Err(e) => Err(e.into()),
            };
        }
        let claims = if is_service && sub.is_none() {
            self.allocate_service(&mut obj, Some(cur), name).await?
        } else {
            Vec::new()
        };
        let bytes = encode(&obj);
        if let Err(e) = check_object_size(&bytes) {
            for c in claims {
                self.release(c).await;
            }
            return Err(e);
        }
        if bytes == cur_kv.value && claims.is_empty() {
            // Nothing changed: no write, no new resourceVersion, no watch event.
            return Ok(with_rv(obj, cur_rev));
        }
        match self
            .store
            .put(
                &key,
                bytes,
                Precondition::ModRevision(cur_rev),
                cur_kv.lease,
            )
            .await
        {
            Ok((kv, _)) => {
                if is_service && sub.is_none() {
                    self.release_service(cur, Some(&obj)).await;
                }
                Ok(with_rv(obj, kv.mod_revision))
            }
            Err(e) => {
                for c in claims {
                    self.release(c).await;
                }
                match e {
                    StoreError::Conflict { .. } => {
                        Err(ApiError::conflict(info.plural, info.group, name))
                    }
                    StoreError::NotFound(_) => {
                        Err(ApiError::not_found(info.plural, info.group, name))
                    }
                    e => Err(e.into()),
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn patch(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        kind: PatchType,
        body: &[u8],
        q: &Query,
    ) -> ApiResult<Value> {
        // The server retries a patch that lost a race, as Kubernetes does, unless the patch
        // itself names the resource version it expects. Concurrent patches of one object
        // each win eventually; the request timeout bounds the loop.
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if attempt > 3 {
                // Many writers on one object: spread the retries out a little.
                let ms = rand::random::<u64>() % (u64::from(attempt.min(20)) * 2);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let (mut cur, kv) = self.get_object(info, ns, name).await?;
            if sub == Some("scale") {
                let scale = scale_of(info, &cur);
                let patched = patch::apply(kind, &scale, body)?;
                match self
                    .set_scale(info, ns, name, patched["spec"]["replicas"].as_i64(), None)
                    .await
                {
                    Err(e) if e.code == 409 && e.reason == "Conflict" => continue,
                    other => return other,
                }
            }
            // Patched without the current resourceVersion, so that one found afterwards is
            // the patch's own precondition (the revision to write over is `kv`'s).
            if let Some(m) = cur["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            let patched = patch::apply(kind, &cur, body)?;
            let expected = patched["metadata"]["resourceVersion"]
                .as_str()
                .map(String::from);
            if expected
                .as_deref()
                .is_some_and(|e| e != kv.mod_revision.to_string())
            {
                return Err(ApiError::conflict(info.plural, info.group, name));
            }
            // A patch cannot rename or re-home an object, nor give it another identity.
            let errs: Vec<FieldError> = ["name", "namespace", "uid"]
                .iter()
                .filter(|f| patched["metadata"][**f] != cur["metadata"][**f])
                .map(|f| {
                    FieldError::invalid(
                        format!("metadata.{f}"),
                        format!("{}", patched["metadata"][*f]),
                        "field is immutable",
                    )
                })
                .collect();
            if !errs.is_empty() {
                return Err(ApiError::invalid(info.kind, info.group, name, errs));
            }
            let (obj, _) = self.normalize(info, patched, &[], q)?;
            match self
                .update_object(info, ns, name, obj, &cur, &kv, sub, q.dry_run())
                .await
            {
                Err(e) if e.code == 409 && e.reason == "Conflict" && expected.is_none() => continue,
                other => return other,
            }
        }
    }

    async fn set_scale(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        replicas: Option<i64>,
        rv: Option<&str>,
    ) -> ApiResult<Value> {
        let replicas = replicas.ok_or_else(|| {
            ApiError::invalid(
                "Scale",
                "autoscaling",
                name,
                vec![FieldError::required("spec.replicas")],
            )
        })?;
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                "autoscaling",
                name,
                vec![FieldError::invalid(
                    "spec.replicas",
                    replicas,
                    "must be greater than or equal to 0",
                )],
            ));
        }
        let (cur, kv) = self.get_object(info, ns, name).await?;
        if rv.is_some_and(|r| !r.is_empty() && r != kv.mod_revision.to_string()) {
            return Err(ApiError::conflict(info.plural, info.group, name));
        }
        let mut obj = cur.clone();
        obj["spec"]["replicas"] = json!(replicas);
        let out = self
            .update_object(info, ns, name, obj, &cur, &kv, None, false)
            .await?;
        Ok(scale_of(info, &out))
    }

    /// pods/binding: assigns a pod to a node, once.
    async fn bind(&self, ns: &str, name: &str, binding: &Value) -> ApiResult<()> {
        let info = resources::find("", "v1", "pods").unwrap();
        let node = binding["target"]["name"].as_str().unwrap_or_default();
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding",
                "",
                name,
                vec![FieldError::required("target.name")],
            ));
        }
        for _ in 0..8 {
            let (cur, kv) = self.get_object(info, Some(ns), name).await?;
            if cur["metadata"]["deletionTimestamp"].is_string() {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("pod {name} is being deleted, cannot be assigned to a host"),
                ));
            }
            if let Some(n) = cur["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("pod {name} is already assigned to node \"{n}\""),
                ));
            }
            let mut obj = cur.clone();
            obj["spec"]["nodeName"] = json!(node);
            let conds = obj["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut conds: Vec<Value> = conds
                .into_iter()
                .filter(|c| c["type"] != "PodScheduled")
                .collect();
            conds.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now_rfc3339()}));
            obj["status"]["conditions"] = json!(conds);
            match self.replace_stored(&kv, &obj).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::conflict("pods", "", name))
    }

    /// Deletes an object, or marks it terminating when finalizers (or graceful pod
    /// termination) hold it; returns what to answer and whether it is gone.
    pub async fn delete_object(
        self: &Arc<Self>,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        opts: &Value,
        q: &Query,
    ) -> ApiResult<(Value, bool)> {
        let policy = opts["propagationPolicy"]
            .as_str()
            .or(q.get("propagationPolicy"))
            .map(String::from);
        if let Some(p) = &policy {
            if !["Background", "Foreground", "Orphan"].contains(&p.as_str()) {
                return Err(ApiError::invalid(
                    "DeleteOptions",
                    "",
                    "",
                    vec![FieldError::unsupported(
                        "propagationPolicy",
                        p,
                        &["Foreground", "Background", "Orphan"],
                    )],
                ));
            }
        }
        if info.plural == "namespaces" && PROTECTED_NAMESPACES.contains(&name) {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        let grace = opts["gracePeriodSeconds"]
            .as_i64()
            .or(q.count("gracePeriodSeconds")?.map(|g| g as i64));
        let dry = q.dry_run() || opts["dryRun"].as_array().is_some_and(|d| !d.is_empty());
        for _ in 0..8 {
            let (cur, kv) = self.get_object(info, ns, name).await?;
            if let Some(uid) = opts["preconditions"]["uid"].as_str() {
                if cur["metadata"]["uid"].as_str() != Some(uid) {
                    return Err(ApiError::new(409, "Conflict", format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", cur["metadata"]["uid"].as_str().unwrap_or_default())));
                }
            }
            if let Some(rv) = opts["preconditions"]["resourceVersion"].as_str() {
                if rv != kv.mod_revision.to_string() {
                    return Err(ApiError::new(409, "Conflict", format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", kv.mod_revision)));
                }
            }
            if dry {
                return Ok((cur, true));
            }
            let mut obj = cur.clone();
            let mut finalizers: Vec<String> = obj["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            match policy.as_deref() {
                Some("Foreground") if !finalizers.contains(&"foregroundDeletion".to_string()) => {
                    finalizers.push("foregroundDeletion".into())
                }
                Some("Orphan") if !finalizers.contains(&"orphan".to_string()) => {
                    finalizers.push("orphan".into())
                }
                _ => {}
            }
            let is_ns = info.plural == "namespaces";
            let graceful_pod = info.plural == "pods"
                && obj["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty())
                && grace != Some(0)
                && obj["status"]["phase"] != "Succeeded"
                && obj["status"]["phase"] != "Failed";
            if finalizers.is_empty() && !graceful_pod && !is_ns {
                match self
                    .store
                    .delete(&kv.key, Precondition::ModRevision(kv.mod_revision))
                    .await
                {
                    Ok((last, rev)) => {
                        let mut out = decode(&last);
                        out["metadata"]["resourceVersion"] = json!(rev.to_string());
                        self.after_delete(info, &out).await;
                        return Ok((out, true));
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(StoreError::NotFound(_)) => {
                        return Err(ApiError::not_found(info.plural, info.group, name))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if obj["metadata"]["deletionTimestamp"].is_string()
                && finalizers.len()
                    == obj["metadata"]["finalizers"]
                        .as_array()
                        .map_or(0, |f| f.len())
            {
                // Already terminating; a shorter grace period for a pod still applies.
                if !(graceful_pod && grace.is_some()) {
                    return Ok((cur, false));
                }
            }
            let secs = if graceful_pod {
                grace.unwrap_or_else(|| {
                    obj["spec"]["terminationGracePeriodSeconds"]
                        .as_i64()
                        .unwrap_or(30)
                })
            } else {
                0
            };
            let when = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
            obj["metadata"]["deletionTimestamp"] =
                json!(when.round(jiff::Unit::Second).unwrap_or(when).to_string());
            obj["metadata"]["deletionGracePeriodSeconds"] = json!(secs);
            if !finalizers.is_empty() {
                obj["metadata"]["finalizers"] = json!(finalizers);
            }
            if is_ns {
                obj["status"]["phase"] = json!("Terminating");
            }
            match self.replace_stored(&kv, &obj).await {
                Ok((kv, _)) => {
                    let out = decode(&kv);
                    if is_ns {
                        tokio::spawn(self.clone().finalize_namespace_task(name.to_string()));
                    }
                    return Ok((out, false));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::conflict(info.plural, info.group, name))
    }

    /// Writes `obj` over the stored `kv` if nobody changed it since (keeping its lease).
    async fn replace_stored(
        &self,
        kv: &KeyValue,
        obj: &Value,
    ) -> Result<(KeyValue, Option<KeyValue>), StoreError> {
        self.store
            .put(
                &kv.key,
                encode(obj),
                Precondition::ModRevision(kv.mod_revision),
                kv.lease,
            )
            .await
    }

    async fn after_delete(&self, info: &ResourceInfo, obj: &Value) {
        if info.kind == "Service" && info.group.is_empty() {
            self.release_service(obj, None).await;
        }
    }

    /// The namespace finalizer as a task (boxed: it deletes objects, which may start it).
    fn finalize_namespace_task(
        self: Arc<Self>,
        ns: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.finalize_namespace(&ns).await })
    }

    /// Removes everything in a terminating namespace, then the namespace.
    pub async fn finalize_namespace(self: &Arc<Self>, ns: &str) {
        info!(namespace = ns, "deleting the namespace's contents");
        let q = Query(Default::default());
        for round in 0..600 {
            let mut left = 0;
            for info in resources::RESOURCES.iter().filter(|r| r.namespaced) {
                let Ok(l) = self.list_objects(info, Some(ns), &q).await else {
                    continue;
                };
                for obj in l.0 {
                    left += 1;
                    let name = obj["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    // Pods go at once: no kubelet is asked to stop them gracefully here.
                    let opts = json!({"propagationPolicy": "Background", "gracePeriodSeconds": if info.plural == "pods" && round > 30 { 0 } else { 30 }});
                    if obj["metadata"]["deletionTimestamp"].is_null()
                        || (info.plural == "pods" && round > 30)
                    {
                        let _ = self.delete_object(info, Some(ns), &name, &opts, &q).await;
                    }
                }
            }
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let info = resources::find("", "v1", "namespaces").unwrap();
        if let Ok((_, kv)) = self.get_object(info, None, ns).await {
            if let Err(e) = self
                .store
                .delete(&kv.key, Precondition::ModRevision(kv.mod_revision))
                .await
            {
                warn!(namespace = ns, error = %e, "removing the namespace");
            } else {
                info!(namespace = ns, "namespace deleted");
            }
        }
    }
}
