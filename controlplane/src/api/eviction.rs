//! `pods/eviction` (policy/v1 Eviction), what `kubectl drain` asks for each pod: the pod is
//! deleted unless a PodDisruptionBudget selecting it allows no disruption now, in which case the
//! answer is 429 with Kubernetes' message and cause, so the client retries. An allowed eviction
//! first takes one disruption from the budget's status (compare-and-swap on the budget, so two
//! evictions cannot spend the same one) and records the pod in `disruptedPods`, which the
//! disruption controller counts as unhealthy until the pod is gone.

use std::sync::Arc;

use ferry_common::selectors::{labels_of, LabelSelector};
use serde_json::{json, Value};

use super::resources;
use super::status::{ApiError, ApiResult};
use super::{Api, Query};

fn budget_refusal(cause: String) -> ApiError {
    let mut e = ApiError::new(
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );
    e.details = Some(json!({"causes": [{"reason": "DisruptionBudget", "message": cause}]}));
    e
}

impl Api {
    /// Evicts pod `ns/name` as the Eviction `body` asks (its `deleteOptions` apply to the
    /// deletion).
    pub(super) async fn evict(
        self: &Arc<Self>,
        ns: &str,
        name: &str,
        body: &Value,
    ) -> ApiResult<Value> {
        let pods = resources::find("", "v1", "pods").expect("pods are served");
        let budgets = resources::find("policy", "v1", "poddisruptionbudgets").expect("served");
        let (pod, _) = self.get_object(pods, Some(ns), name).await?;
        let finished = matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        if !finished {
            let labels = labels_of(&pod);
            let matching: Vec<Value> = self
                .list_objects(budgets, Some(ns), &Query::parse(None))
                .await?
                .0
                .into_iter()
                .filter(|b| LabelSelector::selects(&b["spec"]["selector"], &labels))
                .collect();
            if matching.len() > 1 {
                return Err(ApiError::internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ));
            }
            if let Some(b) = matching.into_iter().next() {
                self.spend_disruption(budgets, ns, name, &b).await?;
            }
        }
        let opts = body.get("deleteOptions").cloned().unwrap_or(json!({}));
        self.delete_object(pods, Some(ns), name, &opts, &Query::parse(None))
            .await?;
        Ok(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        )
    }

    async fn spend_disruption(
        &self,
        budgets: &'static resources::ResourceInfo,
        ns: &str,
        pod: &str,
        budget: &Value,
    ) -> ApiResult<()> {
        let bname = budget["metadata"]["name"].as_str().unwrap_or_default();
        let (cur, kv) = self.get_object(budgets, Some(ns), bname).await?;
        let st = &cur["status"];
        let generation = cur["metadata"]["generation"].as_i64().unwrap_or(0);
        if st["observedGeneration"].as_i64().unwrap_or(-1) < generation {
            return Err(budget_refusal(format!(
                "The disruption budget {bname} is still being processed by the server."
            )));
        }
        let allowed = st["disruptionsAllowed"].as_i64().unwrap_or(0);
        if allowed < 1 {
            return Err(budget_refusal(format!(
                "The disruption budget {bname} needs {} healthy pods and has {} currently",
                st["desiredHealthy"].as_i64().unwrap_or(0),
                st["currentHealthy"].as_i64().unwrap_or(0)
            )));
        }
        let mut new = cur.clone();
        new["status"]["disruptionsAllowed"] = json!(allowed - 1);
        new["status"]["disruptedPods"][pod] = json!(jiff::Timestamp::now().to_string());
        match self
            .update_object(
                budgets,
                Some(ns),
                bname,
                new,
                &cur,
                &kv,
                Some("status"),
                false,
                Some(super::SERVER_MANAGER),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Another eviction spent it first: the client asks again.
            Err(e) if e.code == 409 => Err(budget_refusal(format!(
                "The disruption budget {bname} changed while this eviction was decided; try again."
            ))),
            Err(e) => Err(e),
        }
    }
}
