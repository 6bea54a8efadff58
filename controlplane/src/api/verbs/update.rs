//! update and patch, with the subresources status, scale and binding.

use serde_json::{json, Value};

use crate::api::admission;
use crate::api::body::Decoded;
use crate::api::fieldmanager;
use crate::api::patch::{self, PatchType};
use crate::api::resources::{self, ResourceInfo};
use crate::api::status::{ApiError, ApiResult, FieldError};
use crate::api::{decode, encode, now_rfc3339, Api, Query};
use crate::store::{KeyValue, Precondition, StoreError};

use super::hooks::Hooks;
use super::{check_object_size, scale_of, spec_part, with_rv};

impl Api {
    #[allow(clippy::too_many_arguments)]
    pub async fn update_checked(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        body: Decoded,
        sub: Option<&str>,
        q: &Query,
        manager: &str,
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
            self.update_object(
                info,
                ns,
                name,
                obj,
                &cur,
                &kv,
                sub,
                q.dry_run(),
                Some(manager),
            )
            .await?,
            warnings,
        ))
    }

    /// Admission and the compare-and-swap write of a changed object.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn update_object(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        new: Value,
        cur: &Value,
        cur_kv: &KeyValue,
        sub: Option<&str>,
        dry: bool,
        manager: Option<&str>,
    ) -> ApiResult<Value> {
        let cur_rev = cur_kv.mod_revision;
        let mut obj = match sub {
            Some("status") => {
                let mut o = cur.clone();
                o["status"] = new["status"].clone();
                if let Some(mf) = new["metadata"].get("managedFields") {
                    o["metadata"]["managedFields"] = mf.clone();
                }
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
                } else if Hooks::of(info).spec_only_through_finalize() {
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
        let hooks = Hooks::of(info);
        // Carry what was allocated over before validating immutability.
        hooks.carry_over(&mut obj, cur, sub);
        if let Some(m) = manager {
            let api_version = info.api_version();
            fieldmanager::track_update(cur, &mut obj, m, &api_version, sub, &now_rfc3339());
        }
        let errs = admission::validate(info, &obj, Some(cur));
        if !errs.is_empty() {
            return Err(ApiError::invalid(info.kind, info.group, name, errs));
        }
        if (info.group, info.kind) == ("scheduling.k8s.io", "PriorityClass") {
            self.check_global_default(&obj).await?;
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
        if cur["metadata"]["deletionTimestamp"].is_string()
            && finalizers_empty
            && hooks.removed_when_finalized(cur)
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
        let claims = hooks.claim(self, &mut obj, Some(cur), sub, name).await?;
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
                hooks.updated(self, cur, &obj, sub).await;
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
    pub(super) async fn patch(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        kind: PatchType,
        body: &[u8],
        q: &Query,
        manager: &str,
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
                    .set_scale(
                        info,
                        ns,
                        name,
                        patched["spec"]["replicas"].as_i64(),
                        None,
                        manager,
                    )
                    .await
                {
                    Err(e) if e.code == 409 && e.reason == "Conflict" => continue,
                    other => return other,
                }
            }
            // Merge patches apply to the object without its resourceVersion, so that one
            // found afterwards is the patch's own precondition (the revision to write over
            // is `kv`'s). A JSON patch sees it, as in Kubernetes: its `test` operations may
            // check it (kubectl's move to server-side apply does).
            let current = kv.mod_revision.to_string();
            if kind != PatchType::Json {
                if let Some(m) = cur["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
            }
            let patched = patch::apply(kind, &cur, body)?;
            let expected = patched["metadata"]["resourceVersion"]
                .as_str()
                .filter(|r| kind != PatchType::Json || *r != current)
                .map(String::from);
            if expected.as_deref().is_some_and(|e| e != current) {
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
                .update_object(
                    info,
                    ns,
                    name,
                    obj,
                    &cur,
                    &kv,
                    sub,
                    q.dry_run(),
                    Some(manager),
                )
                .await
            {
                Err(e) if e.code == 409 && e.reason == "Conflict" && expected.is_none() => continue,
                other => return other,
            }
        }
    }

    pub(super) async fn set_scale(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        replicas: Option<i64>,
        rv: Option<&str>,
        manager: &str,
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
            .update_object(info, ns, name, obj, &cur, &kv, None, false, Some(manager))
            .await?;
        Ok(scale_of(info, &out))
    }

    /// pods/binding: assigns a pod to a node, once.
    pub(super) async fn bind(&self, ns: &str, name: &str, binding: &Value) -> ApiResult<()> {
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
}
