//! delete, with finalizers, graceful deletion and a namespace's finalisation (its contents go
//! first).

use std::sync::Arc;

use serde_json::{json, Value};
use tracing::{info, warn};

use crate::api::resources::{self, ResourceInfo};
use crate::api::status::{ApiError, ApiResult, FieldError};
use crate::api::{decode, encode, Api, Query};
use crate::store::{KeyValue, Precondition, StoreError};

use super::hooks::Hooks;

impl Api {
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
        let hooks = Hooks::of(info);
        if hooks.protected(name) {
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
            let is_ns = hooks.finalized_in_background();
            let graceful_pod = hooks.graceful_delete(&obj, grace);
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
    pub(super) async fn replace_stored(
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

    pub(super) async fn after_delete(&self, info: &ResourceInfo, obj: &Value) {
        Hooks::of(info).removed(self, obj).await;
    }

    /// The namespace finalizer as a task (boxed: it deletes objects, which may start it).
    pub(super) fn finalize_namespace_task(
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
            for info in resources::RESOURCES
                .iter()
                .filter(|r| r.namespaced && !r.create_only)
            {
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
                    let forced = Hooks::of(info).forced_after(round);
                    let opts = json!({"propagationPolicy": "Background", "gracePeriodSeconds": if forced { 0 } else { 30 }});
                    if obj["metadata"]["deletionTimestamp"].is_null() || forced {
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
