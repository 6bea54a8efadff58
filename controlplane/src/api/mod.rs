//! The API server: authentication, authorization, routing of Kubernetes REST paths, and the
//! object lifecycle (admission, optimistic concurrency, finalizers) over the [`Store`].
//!
//! Objects are stored as JSON under `/registry/<group>/<plural>/[<namespace>/]<name>`, with
//! `metadata` first and without `resourceVersion`: the store's mod revision is the resource
//! version, spliced into the bytes on the way out, so a list of unfiltered objects is served
//! without parsing them.

pub mod admission;
mod alloc;
pub mod auth;
mod body;
pub mod cluster_dns;
pub mod discovery;
mod eviction;
mod fieldmanager;
mod impersonation;
mod kubelet_client;
pub use kubelet_client::kubelet_tls;
pub mod kubernetes_service;
mod logs;
pub mod metadata;
mod metrics;
pub mod node;
pub mod openapi;
pub mod patch;
mod priority;
mod protobuf;
mod query;
mod quota;
mod resource_metrics;
pub mod resources;
mod reviews;
pub mod serviceaccount;
pub mod status;
mod streaming;
pub mod table;
mod verbs;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use ipnetwork::Ipv4Network;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::store::{KeyValue, ListOptions, Store};
use auth::{Attributes, Rbac, User};
pub use query::Query;
use resources::ResourceInfo;
use status::{ApiError, ApiResult};

/// Largest request body accepted (Kubernetes' limit is 3 MiB as well).
pub const MAX_BODY: usize = 3 << 20;
/// The field manager of the API server's own writes (bootstrap objects, the `kubernetes`
/// and cluster DNS Services, quota and budget status).
pub const SERVER_MANAGER: &str = "ferry-controlplane";

pub struct Config {
    pub service_cidr: Ipv4Network,
    pub node_ports: (u16, u16),
    /// Bearer tokens from the token file.
    pub tokens: HashMap<String, User>,
    /// The address and port clients use: discovery's server address, and the endpoint of the
    /// `kubernetes` Service.
    pub advertise: std::net::SocketAddrV4,
    pub limits: RequestLimits,
    /// The Node authorizer and NodeRestriction for `system:node:<name>` users
    /// (`--authorization-mode=Node,RBAC`).
    pub node_authorizer: bool,
    /// Signs and verifies service account tokens (None: TokenRequest is not served and only
    /// the token file's tokens authenticate).
    pub signer: Option<serviceaccount::Signer>,
    /// TLS toward kubelets, with the API server's kubelet client certificate (None: logs
    /// and streams are not served).
    pub kubelet_tls: Option<Arc<rustls::ClientConfig>>,
}

/// What requests may make the server hold (kube-apiserver's flags of the same names).
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Reads in flight at once (`--max-requests-inflight`); more get 429.
    pub max_requests_inflight: usize,
    /// Writes in flight at once (`--max-mutating-requests-inflight`); more get 429.
    pub max_mutating_requests_inflight: usize,
    /// A request that is not a watch or a followed log must finish within this
    /// (`--request-timeout`); it gets 504 otherwise.
    pub request_timeout: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_requests_inflight: 400,
            max_mutating_requests_inflight: 200,
            request_timeout: Duration::from_secs(60),
        }
    }
}

pub struct Api {
    pub store: Arc<dyn Store>,
    pub cfg: Config,
    rbac: RwLock<Rbac>,
    /// The lease events are attached to, and when it was granted (shared for a minute).
    event_lease: tokio::sync::Mutex<Option<(i64, std::time::Instant)>>,
    reads_in_flight: Arc<tokio::sync::Semaphore>,
    writes_in_flight: Arc<tokio::sync::Semaphore>,
    metrics: metrics::Metrics,
    /// Serializes pod admissions in namespaces with ResourceQuotas (`quota.rs`).
    quota_gate: tokio::sync::Mutex<()>,
}

/// Events expire this long after they are written, as with Kubernetes' default --event-ttl.
const EVENT_TTL: Duration = Duration::from_secs(3600);

/// A verified client certificate's user, attached to each request of its connection.
#[derive(Clone, Default)]
pub struct Peer(pub Option<User>);

impl Api {
    pub async fn new(store: Arc<dyn Store>, cfg: Config) -> anyhow::Result<Arc<Api>> {
        let api = Arc::new(Api {
            store,
            rbac: RwLock::new(Rbac::default()),
            event_lease: Default::default(),
            reads_in_flight: Arc::new(tokio::sync::Semaphore::new(
                cfg.limits.max_requests_inflight.max(1),
            )),
            writes_in_flight: Arc::new(tokio::sync::Semaphore::new(
                cfg.limits.max_mutating_requests_inflight.max(1),
            )),
            metrics: metrics::Metrics::default(),
            quota_gate: tokio::sync::Mutex::new(()),
            cfg,
        });
        api.bootstrap().await?;
        api.load_rbac().await?;
        let weak = Arc::downgrade(&api);
        tokio::spawn(async move { watch_rbac(weak).await });
        api.reconcile_kubernetes_service()
            .await
            .map_err(|e| anyhow::anyhow!("creating the kubernetes Service: {}", e.message))?;
        tokio::spawn(kubernetes_service::keep(Arc::downgrade(&api)));
        api.create_cluster_dns_service()
            .await
            .map_err(|e| anyhow::anyhow!("creating the cluster DNS Service: {}", e.message))?;
        Ok(api)
    }

    /// Default namespaces, the bootstrap RBAC policy and the system priority classes, created
    /// when missing.
    async fn bootstrap(&self) -> anyhow::Result<()> {
        let mut objs: Vec<Value> = ["default", "kube-system", "kube-public", "kube-node-lease"]
            .iter()
            .map(|n| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}))
            .collect();
        objs.extend(auth::bootstrap_policy());
        objs.extend(priority::bootstrap_classes());
        for obj in objs {
            let info = resources::by_kind(
                obj["apiVersion"].as_str().unwrap_or_default(),
                obj["kind"].as_str().unwrap_or_default(),
            )
            .expect("bootstrap objects are of served kinds");
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if self.store.get(&info.key("", &name)).await?.is_none() {
                match self
                    .create_object(info, None, obj, false, Some(SERVER_MANAGER))
                    .await
                {
                    Ok(_) => debug!(kind = info.kind, name, "bootstrap object created"),
                    Err(e) if e.code == 409 => {}
                    Err(e) => {
                        anyhow::bail!("creating bootstrap {} {name}: {}", info.kind, e.message)
                    }
                }
            } else if info.kind == "ClusterRole" {
                // A bootstrap role follows this version's rules, as Kubernetes reconciles
                // them, unless its owner opted out.
                let (cur, kv) = self
                    .get_object(info, None, &name)
                    .await
                    .map_err(|e| anyhow::anyhow!("reading ClusterRole {name}: {}", e.message))?;
                let opted_out = cur["metadata"]["annotations"]
                    ["rbac.authorization.kubernetes.io/autoupdate"]
                    == "false";
                // Compared as stored (decoded into the typed object and back).
                let want = (info.normalize)(obj.clone()).unwrap_or(obj);
                if !opted_out && cur["rules"] != want["rules"] {
                    let mut new = cur.clone();
                    new["rules"] = want["rules"].clone();
                    self.update_object(
                        info,
                        None,
                        &name,
                        new,
                        &cur,
                        &kv,
                        None,
                        false,
                        Some(SERVER_MANAGER),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("updating ClusterRole {name}: {}", e.message))?;
                    info!(name, "bootstrap ClusterRole brought up to date");
                }
            }
        }
        Ok(())
    }

    async fn load_rbac(&self) -> anyhow::Result<i64> {
        let mut rbac = Rbac::default();
        let mut rev = 0;
        for kind in ["ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"] {
            let info = resources::by_kind("rbac.authorization.k8s.io/v1", kind).unwrap();
            let l = self
                .store
                .list(ListOptions {
                    prefix: &info.prefix(),
                    ..Default::default()
                })
                .await?;
            rev = rev.max(l.revision);
            for kv in l.kvs {
                rbac.add(kind, &decode(&kv));
            }
        }
        *self.rbac.write().unwrap() = rbac;
        Ok(rev)
    }

    /// The store lease for new events: one per minute of writes, living an hour past it.
    pub async fn event_lease(&self) -> ApiResult<i64> {
        let mut cur = self.event_lease.lock().await;
        if let Some((id, at)) = *cur {
            if at.elapsed() < Duration::from_secs(60) {
                return Ok(id);
            }
        }
        let id = self
            .store
            .grant_lease(EVENT_TTL.as_secs() as i64 + 60)
            .await?;
        *cur = Some((id, std::time::Instant::now()));
        Ok(id)
    }

    /// The authorizers in turn, as every request meets them: the node authorizer for a node's
    /// identity (when on), then RBAC. `Err` carries the node authorizer's reason when it is the
    /// one that refused (`None`: RBAC grants nothing). `one` is the single object asked about.
    async fn decide(
        &self,
        user: &User,
        a: &Attributes,
        one: Option<&str>,
    ) -> Result<(), Option<String>> {
        if let Some(n) = node::node_of(user).filter(|_| self.cfg.node_authorizer) {
            match node::authorize(self, n, a, one).await {
                node::Decision::Allow => return Ok(()),
                node::Decision::Deny(why) => return Err(Some(why)),
                node::Decision::NoOpinion => {}
            }
        }
        if self.rbac.read().unwrap().allows(user, a) {
            Ok(())
        } else {
            Err(None)
        }
    }

    fn authorize(&self, user: &User, a: &Attributes) -> ApiResult<()> {
        if self.rbac.read().unwrap().allows(user, a) {
            Ok(())
        } else {
            debug!(user = %user.name, verb = %a.verb, resource = %a.resource, ns = %a.namespace, "denied");
            let mut e = ApiError::forbidden(auth::forbidden_message(user, a));
            e.details = Some(json!({"name": a.name, "group": a.group, "kind": a.resource}));
            Err(e)
        }
    }
}

/// Rebuilds the RBAC snapshot whenever an RBAC object changes.
async fn watch_rbac(api: std::sync::Weak<Api>) {
    let prefix = "/registry/rbac.authorization.k8s.io/";
    loop {
        let Some(a) = api.upgrade() else { return };
        let rev = match a.load_rbac().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "loading RBAC objects");
                drop(a);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut w = match a.store.watch(prefix, rev).await {
            Ok(w) => w,
            Err(_) => continue,
        };
        drop(a);
        while let Some(Ok(_)) = w.next().await {
            let Some(a) = api.upgrade() else { return };
            if let Err(e) = a.load_rbac().await {
                warn!(error = %format!("{e:#}"), "reloading RBAC objects");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Stored form

/// The stored bytes of an object: `{"metadata":{...},...}` without resourceVersion.
pub fn encode(obj: &Value) -> Bytes {
    let mut o = obj.as_object().cloned().unwrap_or_default();
    let mut meta = o.remove("metadata").unwrap_or_else(|| json!({}));
    if let Some(m) = meta.as_object_mut() {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let rest = serde_json::to_vec(&Value::Object(o)).unwrap_or_default();
    let mut out = Vec::with_capacity(meta.len() + rest.len() + 16);
    out.extend_from_slice(b"{\"metadata\":");
    out.extend_from_slice(&meta);
    if rest.len() > 2 {
        out.push(b',');
        out.extend_from_slice(&rest[1..]);
    } else {
        out.push(b'}');
    }
    Bytes::from(out)
}

/// The object's JSON with `metadata.resourceVersion` set, without parsing it.
pub fn splice_rv(raw: &[u8], rv: i64) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"metadata\":{";
    let mut out = Vec::with_capacity(raw.len() + 32);
    if raw.starts_with(HEAD) {
        out.extend_from_slice(HEAD);
        out.extend_from_slice(format!("\"resourceVersion\":\"{rv}\"").as_bytes());
        if raw.get(HEAD.len()) != Some(&b'}') {
            out.push(b',');
        }
        out.extend_from_slice(&raw[HEAD.len()..]);
    } else {
        let mut v: Value = serde_json::from_slice(raw).unwrap_or(json!({}));
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        out = serde_json::to_vec(&v).unwrap_or_default();
    }
    out
}

pub fn decode(kv: &KeyValue) -> Value {
    let mut v: Value = serde_json::from_slice(&kv.value).unwrap_or_else(|e| {
        warn!(key = %kv.key, error = %e, "stored object is not JSON");
        json!({})
    });
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        m.insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
    }
    v
}

/// An object as [`decode`] reads it, without `metadata.managedFields`, which are cut from
/// the stored bytes before parsing (a table or an internal reader never needs them, and
/// they are often half of an object's bytes).
pub fn decode_without_managed_fields(kv: &KeyValue) -> Value {
    match fieldmanager::cut_managed_fields(&kv.value) {
        Some(raw) => decode(&KeyValue {
            value: raw.into(),
            ..kv.clone()
        }),
        None => decode(kv),
    }
}

pub use ferry_common::time::now_rfc3339;

// ---------------------------------------------------------------------------------------
// Requests

/// What a resource path names.
pub struct Target {
    pub info: &'static ResourceInfo,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    /// The legacy `/watch/` path prefix.
    pub watch_path: bool,
}

fn parse_target(path: &str) -> ApiResult<Option<Target>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => ("", *v, rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => return Ok(None),
    };
    let (watch_path, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let namespace_sub = |p: &str| group.is_empty() && (p == "status" || p == "finalize");
    let (ns, plural, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !namespace_sub(plural) => {
            (Some(ns.to_string()), *plural, tail)
        }
        [plural, tail @ ..] => (None, *plural, tail),
        [] => return Err(not_found()),
    };
    if tail.len() > 2 {
        return Err(not_found());
    }
    let (name, sub) = (tail.first().copied(), tail.get(1).copied());
    let info = resources::find(group, version, plural).ok_or_else(not_found)?;
    // Cluster-scoped resources have no namespace; a namespaced object is named in one.
    if (!info.namespaced && ns.is_some()) || (info.namespaced && ns.is_none() && name.is_some()) {
        return Err(not_found());
    }
    if let Some(s) = sub {
        if !info.subresources.contains(&s) {
            return Err(not_found());
        }
    }
    Ok(Some(Target {
        info,
        ns,
        name: name.map(String::from),
        sub: sub.map(String::from),
        watch_path,
    }))
}

fn verb_of(method: &Method, t: &Target, q: &Query) -> &'static str {
    if t.sub
        .as_deref()
        .is_some_and(|s| streaming::STREAMING.contains(&s))
    {
        return "create";
    }
    match (method.as_str(), t.name.is_some()) {
        ("GET", _) if t.watch_path || q.flag("watch") => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

pub fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

pub fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

async fn authenticate(api: &Api, headers: &HeaderMap, peer: &Peer) -> ApiResult<User> {
    if let Some(h) = headers.get(axum::http::header::AUTHORIZATION) {
        let h = h.to_str().unwrap_or_default();
        if let Some(token) = h.strip_prefix("Bearer ") {
            let token = token.trim();
            if let Some(u) = api.cfg.tokens.get(token) {
                return Ok(u.clone());
            }
            if serviceaccount::looks_like_jwt(token) {
                if let Some(u) = api.authenticate_token(token).await {
                    return Ok(u);
                }
            }
            return Err(ApiError::unauthorized());
        }
    }
    peer.0.clone().ok_or_else(ApiError::unauthorized)
}

/// Watches and followed logs stream for as long as the client wants: no request timeout, no
/// in-flight slot (as kube-apiserver's long-running requests).
fn long_running(method: &Method, path: &str, q: Option<&str>) -> bool {
    if method != Method::GET {
        return false;
    }
    let q = Query::parse(q);
    path.contains("/watch/") || q.flag("watch") || (path.ends_with("/log") && q.flag("follow"))
}

/// Every request comes here.
pub async fn handle(api: Arc<Api>, peer: Peer, req: Request<Body>) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let labels = metrics::request_labels(&method, &path, req.uri().query());
    let health = matches!(
        path.trim_end_matches('/'),
        "/healthz" | "/livez" | "/readyz"
    );
    let streams = long_running(&method, &path, req.uri().query());
    let resp = if health || streams {
        serve(&api, &peer, req).await
    } else {
        let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        let sem = if mutating {
            &api.writes_in_flight
        } else {
            &api.reads_in_flight
        };
        match sem.clone().try_acquire_owned() {
            Err(_) => {
                debug!(%method, %path, "too many requests in flight");
                let mut r = ApiError::new(
                    429,
                    "TooManyRequests",
                    "Too many requests, please try again later.",
                )
                .into_response();
                r.headers_mut()
                    .insert("Retry-After", axum::http::HeaderValue::from_static("1"));
                return r;
            }
            Ok(_permit) => {
                match tokio::time::timeout(api.cfg.limits.request_timeout, serve(&api, &peer, req))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(ApiError::new(
                        504,
                        "Timeout",
                        "Timeout: request did not complete within the allotted timeout",
                    )),
                }
            }
        }
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let code = resp.status().as_u16();
    api.metrics
        .answered(&labels, code, started.elapsed().as_secs_f64());
    debug!(%method, %path, code, ms = started.elapsed().as_millis() as u64, "request");
    if streams && resp.status().is_success() {
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, api.metrics.long_running(&labels, body));
    }
    resp
}

async fn serve(api: &Arc<Api>, peer: &Peer, req: Request<Body>) -> ApiResult<Response> {
    let real = authenticate(api, req.headers(), peer).await?;
    let user = impersonation::effective_user(api, real, req.headers())?;
    let path = req.uri().path().to_string();
    let q = Query::parse(req.uri().query());
    if let Some(m) = resource_metrics::parse(&path) {
        if req.method() != Method::GET {
            return Err(ApiError::method_not_allowed(format!(
                "{} {path}: resource metrics are read-only (get, list)",
                req.method()
            )));
        }
        let verb = if m.name.is_some() { "get" } else { "list" };
        api.authorize(&user, &m.attributes(verb))?;
        return api.resource_metrics(&m, &q).await;
    }
    let target = parse_target(&path)?;
    let Some(t) = target else {
        return non_resource(api, &user, req.method(), &path);
    };
    let verb = verb_of(req.method(), &t, &q);
    let mut attrs = Attributes {
        verb: verb.into(),
        group: t.info.group.into(),
        resource: t.info.plural.into(),
        subresource: t.sub.clone().unwrap_or_default(),
        namespace: t.ns.clone().unwrap_or_default(),
        name: t.name.clone().unwrap_or_default(),
        path: None,
    };
    if t.info.plural == "namespaces" {
        attrs.namespace = attrs.name.clone();
    }
    let node = node::node_of(&user).filter(|_| api.cfg.node_authorizer);
    let one = t
        .name
        .clone()
        .or_else(|| node::single_name(q.get("fieldSelector")));
    if let Err(why) = api.decide(&user, &attrs, one.as_deref()).await {
        debug!(user = %user.name, verb, resource = %attrs.resource, ns = %attrs.namespace, ?why, "denied");
        let msg = auth::forbidden_message(&user, &attrs);
        let mut e = ApiError::forbidden(match why {
            Some(why) => format!("{msg} ({why})"),
            None => msg,
        });
        e.details = Some(json!({"name": attrs.name, "group": attrs.group, "kind": attrs.resource}));
        return Err(e);
    }
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::too_large(MAX_BODY));
    }
    let (mut parts, body) = req.into_parts();
    if let (Some(sub), Some(name)) = (t.sub.as_deref(), t.name.as_deref()) {
        if t.info.plural == "pods" && streaming::STREAMING.contains(&sub) {
            let ns = t.ns.clone().unwrap_or_default();
            return api.stream(&ns, name, sub, &mut parts).await;
        }
    }
    let body = if matches!(
        parts.method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        axum::body::to_bytes(body, MAX_BODY)
            .await
            .map_err(|_| ApiError::too_large(MAX_BODY))?
    } else {
        Bytes::new()
    };
    if t.info.create_only {
        if verb != "create" {
            return Err(ApiError::method_not_allowed(format!(
                "{} are answered, not stored: only create (POST) is served",
                t.info.plural
            )));
        }
        return api.review(&user, &t, &parts.headers, &body).await;
    }
    if let Some(n) = node {
        let proposed = node::proposed(api, &attrs, &parts.headers, &body).await?;
        node::admit(api, &user, n, &attrs, proposed.as_ref()).await?;
    }
    if verb == "watch" && t.sub.is_none() {
        q.check_options(verb)?;
        return watch::watch(api.clone(), t.info, t.ns, t.name, &q, &parts.headers).await;
    }
    verbs::dispatch(api, verb, t, q, &parts.headers, body).await
}

fn non_resource(api: &Api, user: &User, method: &Method, path: &str) -> ApiResult<Response> {
    let attrs = Attributes {
        verb: method.as_str().to_lowercase(),
        path: Some(path.to_string()),
        ..Default::default()
    };
    api.authorize(user, &attrs)?;
    if method != Method::GET {
        return Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {path}"
        )));
    }
    let trimmed = path.trim_end_matches('/');
    let v = match trimmed {
        "/version" => discovery::version(),
        "/healthz" | "/livez" | "/readyz" => {
            return Ok((StatusCode::OK, "ok").into_response());
        }
        "/metrics" => {
            let used = |sem: &tokio::sync::Semaphore, max: usize| {
                max.saturating_sub(sem.available_permits()) as i64
            };
            let text = api.metrics.render(
                used(
                    &api.reads_in_flight,
                    api.cfg.limits.max_requests_inflight.max(1),
                ),
                used(
                    &api.writes_in_flight,
                    api.cfg.limits.max_mutating_requests_inflight.max(1),
                ),
            );
            return Ok((
                StatusCode::OK,
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                text,
            )
                .into_response());
        }
        "/api" => discovery::api_versions(&api.cfg.advertise.to_string()),
        "/apis" => discovery::api_group_list(),
        "/openapi/v3" => openapi::root(),
        p => {
            let segs: Vec<&str> = p.trim_matches('/').split('/').collect();
            let found = match segs.as_slice() {
                ["api", v] => discovery::resource_list("", v),
                ["apis", g] => discovery::api_group(g),
                ["apis", g, v] => discovery::resource_list(g, v),
                ["openapi", "v3", rest @ ..] => openapi::group_version(&rest.join("/")),
                _ => None,
            };
            found.ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
            })?
        }
    };
    Ok(json_response(StatusCode::OK, &v))
}

pub fn log_start(cfg: &Config) {
    info!(service_cidr = %cfg.service_cidr, node_ports = ?cfg.node_ports, tokens = cfg.tokens.len(), "API server configured");
}
