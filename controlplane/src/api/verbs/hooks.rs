//! What a kind of resource adds to the generic verbs, in one place instead of `if` branches on
//! its name inside each verb: a Service's cluster IP and node ports, an Event's lease,
//! a namespace's finalisation and protection, a pod's graceful deletion, which kinds carry a
//! status the client may not set, which count generations, whose selector is a plain map.

use serde_json::Value;

use crate::api::resources::ResourceInfo;
use crate::api::status::ApiResult;
use crate::api::Api;

/// The namespaces the system lives in: never deleted (as Kubernetes' NamespaceLifecycle).
pub const PROTECTED_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// The kinds with behaviour of their own; everything else is `Plain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hooks {
    Service,
    Event,
    Namespace,
    Pod,
    Node,
    ReplicationController,
    ResourceQuota,
    Plain,
}

impl Hooks {
    pub(super) fn of(info: &ResourceInfo) -> Hooks {
        match (info.group, info.kind) {
            ("", "Service") => Hooks::Service,
            ("", "Event") => Hooks::Event,
            ("", "Namespace") => Hooks::Namespace,
            ("", "Pod") => Hooks::Pod,
            ("", "Node") => Hooks::Node,
            ("", "ReplicationController") => Hooks::ReplicationController,
            ("", "ResourceQuota") => Hooks::ResourceQuota,
            _ => Hooks::Plain,
        }
    }

    /// A create starts without a status (the system writes it; defaults add a pod's phase).
    pub(super) fn strips_status_on_create(self, info: &ResourceInfo) -> bool {
        info.has_status() || self == Hooks::Namespace
    }

    /// Whether `metadata.generation` counts changes of the object's spec.
    pub(super) fn counts_generations(self, info: &ResourceInfo, obj: &Value) -> bool {
        !matches!(self, Hooks::Namespace | Hooks::Node) && obj.get("spec").is_some()
            || info.group == "apps"
    }

    /// An update leaves the spec as it was (a namespace's `spec.finalizers` change only
    /// through `/finalize`).
    pub(super) fn spec_only_through_finalize(self) -> bool {
        self == Hooks::Namespace
    }

    /// `spec.selector` is a plain label map (not a LabelSelector): what the scale
    /// subresource's selector string is made from.
    pub(super) fn selector_is_a_map(self) -> bool {
        self == Hooks::ReplicationController
    }

    /// Deleting this object is refused outright.
    pub(super) fn protected(self, name: &str) -> bool {
        self == Hooks::Namespace && PROTECTED_NAMESPACES.contains(&name)
    }

    /// Delete marks the object terminating and finishes it in the background (a namespace's
    /// contents go first).
    pub(super) fn finalized_in_background(self) -> bool {
        self == Hooks::Namespace
    }

    /// Deleting a pod that runs somewhere waits for its kubelet to stop it.
    pub(super) fn graceful_delete(self, obj: &Value, grace: Option<i64>) -> bool {
        self == Hooks::Pod
            && obj["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty())
            && grace != Some(0)
            && obj["status"]["phase"] != "Succeeded"
            && obj["status"]["phase"] != "Failed"
    }

    /// A terminating object whose last finalizer went is removed now, unless it is a pod
    /// with grace left (its kubelet is stopping it).
    pub(super) fn removed_when_finalized(self, cur: &Value) -> bool {
        self != Hooks::Pod
            || cur["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                == 0
    }

    /// Whether the namespace finaliser forces this kind's objects after `round` rounds.
    pub(super) fn forced_after(self, round: u32) -> bool {
        self == Hooks::Pod && round > 30
    }

    /// Claims what the object needs before it is written (a Service's cluster IP and node
    /// ports); the claims are released if the write fails. `cur` is the stored object of an
    /// update; `sub` a subresource (which allocates nothing).
    pub(super) async fn claim(
        self,
        api: &Api,
        obj: &mut Value,
        cur: Option<&Value>,
        sub: Option<&str>,
        name: &str,
    ) -> ApiResult<Vec<String>> {
        match (self, sub) {
            (Hooks::Service, None) => api.allocate_service(obj, cur, name).await,
            _ => Ok(Vec::new()),
        }
    }

    /// After an update was written: gives back what the old object held and the new does not.
    pub(super) async fn updated(self, api: &Api, cur: &Value, new: &Value, sub: Option<&str>) {
        if self == Hooks::Service && sub.is_none() {
            api.release_service(cur, Some(new)).await;
        }
        // A pod that finished stops counting against its namespace's quotas.
        let finished =
            |p: &Value| matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
        // A quota whose limits changed gets its status at once.
        let hard_changed = self == Hooks::ResourceQuota
            && sub.is_none()
            && cur["spec"]["hard"] != new["spec"]["hard"];
        if self == Hooks::Pod && finished(new) && !finished(cur) || hard_changed {
            let ns = new["metadata"]["namespace"].as_str().unwrap_or_default();
            api.refresh_quotas_boxed(ns).await;
        }
    }

    /// After the object was removed from the store: gives back what it held.
    pub(super) async fn removed(self, api: &Api, obj: &Value) {
        if self == Hooks::Service {
            api.release_service(obj, None).await;
        }
        // Any namespaced object may be counted by a quota of its namespace.
        if let Some(ns) = obj["metadata"]["namespace"]
            .as_str()
            .filter(|n| !n.is_empty())
        {
            api.refresh_quotas_boxed(ns).await;
        }
    }

    /// Before validating an update: a Service keeps its allocated cluster IP when the update
    /// leaves it out, and drops what its new type no longer uses.
    pub(super) fn carry_over(self, obj: &mut Value, cur: &Value, sub: Option<&str>) {
        if self == Hooks::Service && sub.is_none() {
            crate::api::alloc::carry_over_service(obj, cur);
        }
    }

    /// The lease the object is stored under (Events expire with theirs).
    pub(super) async fn lease(self, api: &Api) -> ApiResult<i64> {
        match self {
            Hooks::Event => api.event_lease().await,
            _ => Ok(0),
        }
    }
}
