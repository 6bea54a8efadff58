//! create: defaulting, validation, admission, allocation of names, Service IPs and NodePorts.

use serde_json::{json, Value};
use tracing::debug;

use crate::api::admission;
use crate::api::body::Decoded;
use crate::api::fieldmanager;
use crate::api::resources::ResourceInfo;
use crate::api::status::{ApiError, ApiResult, FieldError};
use crate::api::{encode, now_rfc3339, Api, Query};
use crate::store::{Precondition, StoreError};

use super::hooks::Hooks;
use super::{check_object_size, random_suffix, with_rv};

impl Api {
    pub async fn create_checked(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        body: Decoded,
        q: &Query,
        manager: &str,
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
        Ok((
            self.create_object(info, ns, obj, dry, Some(manager))
                .await?,
            warnings,
        ))
    }

    /// Admission and the store write of a new object.
    pub async fn create_object(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        mut obj: Value,
        dry: bool,
        manager: Option<&str>,
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
        let hooks = Hooks::of(info);
        if hooks.strips_status_on_create(info) {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        if hooks.counts_generations(info, &obj) {
            obj["metadata"]["generation"] = json!(1);
        }
        admission::default(info, &mut obj);
        admission::on_create(info, &mut obj);
        if hooks == Hooks::Pod {
            self.admit_pod_service_account(&mut obj).await?;
            self.admit_pod_priority(&mut obj).await?;
        }
        // Held until the object is stored: a quota's charge must not race another object's.
        let mut quota_guard = None;
        if info.namespaced {
            quota_guard = self
                .admit_quotas(info, ns.unwrap_or_default(), &mut obj)
                .await?;
        }
        if (info.group, info.kind) == ("scheduling.k8s.io", "PriorityClass") {
            self.check_global_default(&obj).await?;
        }
        if let Some(m) = manager {
            // The creator owns what it set, defaults included (as Kubernetes, which
            // defaults while decoding).
            let api_version = info.api_version();
            fieldmanager::track_update(&json!({}), &mut obj, m, &api_version, None, &now_rfc3339());
        }
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
        let claims = hooks.claim(self, &mut obj, None, None, &name).await?;
        let bytes = encode(&obj);
        if let Err(e) = check_object_size(&bytes) {
            for c in claims {
                self.release(c).await;
            }
            return Err(e);
        }
        let lease = hooks.lease(self).await?;
        match self
            .store
            .put(&key, bytes, Precondition::Absent, lease)
            .await
        {
            Ok((kv, _)) => {
                debug!(key, rev = kv.mod_revision, "created");
                // A new quota's status, or the quotas that counted the new object.
                if quota_guard.take().is_some() || hooks == Hooks::ResourceQuota {
                    self.refresh_quotas(ns.unwrap_or_default()).await;
                }
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
}
