//! Server-side apply: PATCH with `application/apply-patch+yaml`. The field manager
//! (`fieldmanager`) merges the configuration and judges conflicts; this verb reads the
//! object, writes the result through the same admission and compare-and-swap as every
//! update, and creates the object when it does not exist yet.

use std::collections::HashMap;

use serde_json::Value;

use crate::api::fieldmanager::{self, ApplyRequest};
use crate::api::resources::ResourceInfo;
use crate::api::status::{ApiError, ApiResult};
use crate::api::{now_rfc3339, Api, Query};

/// Attempts at a write that lost a race with another writer before giving up.
const ATTEMPTS: u32 = 8;

impl Api {
    /// Returns the object and whether the apply created it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn apply_patch(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        body: Value,
        manager: &str,
        force: bool,
        q: &Query,
    ) -> ApiResult<(Value, bool)> {
        if !matches!(sub, None | Some("status")) {
            return Err(ApiError::method_not_allowed(format!(
                "apply is served on objects and their status, not on {}",
                sub.unwrap_or_default()
            )));
        }
        if sub == Some("status") && !info.has_status() {
            return Err(ApiError::not_found(info.plural, info.group, name));
        }
        let api_version = info.api_version();
        let config = fieldmanager::check_config(
            &body,
            &api_version,
            info.kind,
            name,
            sub,
            info.has_status(),
        )?;
        if let (true, Some(n)) = (info.namespaced, config["metadata"]["namespace"].as_str()) {
            if Some(n) != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        // A resourceVersion in the configuration is a precondition.
        let expected = body["metadata"]["resourceVersion"]
            .as_str()
            .filter(|r| !r.is_empty())
            .map(String::from);
        // Applied objects are decoded strictly: an unknown field is an error, not a warning.
        let strict = Query(HashMap::from([(
            "fieldValidation".to_string(),
            "Strict".to_string(),
        )]));
        let now = now_rfc3339();
        let req = ApplyRequest {
            manager,
            force,
            api_version: &api_version,
            sub,
            now: &now,
        };
        for _ in 0..ATTEMPTS {
            let (cur, kv) = match self.get_object(info, ns, name).await {
                Err(e) if e.code == 404 && sub.is_none() && expected.is_none() => {
                    let obj = fieldmanager::apply(None, &config, &req)?;
                    let (obj, _) = self.normalize(info, obj, &[], &strict)?;
                    match self.create_object(info, ns, obj, q.dry_run(), None).await {
                        // Created meanwhile by someone else: apply onto theirs.
                        Err(e) if e.code == 409 && e.reason == "AlreadyExists" => continue,
                        other => return other.map(|o| (o, true)),
                    }
                }
                other => other?,
            };
            if expected
                .as_deref()
                .is_some_and(|e| e != kv.mod_revision.to_string())
            {
                return Err(ApiError::conflict(info.plural, info.group, name));
            }
            let obj = fieldmanager::apply(Some(&cur), &config, &req)?;
            let (obj, _) = self.normalize(info, obj, &[], &strict)?;
            match self
                .update_object(info, ns, name, obj, &cur, &kv, sub, q.dry_run(), None)
                .await
            {
                // The object changed under us: merge again onto the new one.
                Err(e) if e.code == 409 && e.reason == "Conflict" && expected.is_none() => continue,
                other => return other.map(|o| (o, false)),
            }
        }
        Err(ApiError::conflict(info.plural, info.group, name))
    }
}
